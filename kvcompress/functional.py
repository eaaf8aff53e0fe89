"""The five compressors on torch tensors (SPEC sections 2-4).

Each function has the reference's signature plus the keyword-only
``backend`` ("auto" or a registered name such as "torch"). Shapes use the
fixed letters: x (B, H, T, D); W windows; G weight groups (G divides H, head h
uses group h // (H // G)); L = block_size; S = stride.

Common keyword-only arguments:

- block_size (int >= 1), stride (int, 1 <= stride <= block_size).
- padding: "valid" (default; windows [i*S, i*S + L), W = (T - L) // S + 1
  if T >= L else 0) or "left" (L - S zero tokens prepended, W = T // S,
  window i covers [i*S - (L - S), (i+1)*S)).
- pe: (H, L, D) or None, added to every window position (pad tokens
  included) before compression.
- cu_seqlens: (N+1,) int32/int64 offsets of N sequences packed in x of
  batch size 1 (windows never cross a sequence boundary), or None; the
  output is packed in sequence order with offsets
  ``compressed_cu_seqlens(cu_seqlens, block_size, stride, padding)``.
- total_windows: with cu_seqlens, the packed output size W (the last entry
  of ``compressed_cu_seqlens``) if the caller knows it, else None. Knowing
  it makes a packed call free of host synchronisation (CUDA-graph
  capturable): cu_seqlens' values are then trusted, not read on the host
  (its dtype, shape and device are still checked), and backends that can
  verify it on the device do so. Without cu_seqlens it must be None.
- backend: "auto" (the highest-priority registered backend that supports
  the call) or a backend name.

Every function validates all arguments before computing: a wrong rank or
shape raises ValueError, a wrong type or a parameter whose dtype differs from
x's raises TypeError, a parameter on another device raises ValueError.
The output has x's dtype and device; accumulation is float32 (float64 for
float64 input). All functions are differentiable with respect to x, every
weight and pe.
"""

from __future__ import annotations

from . import backends as _backends
from ._validate import (
    check_activation,
    check_cu_seqlens,
    check_groups,
    check_param,
    check_pe,
    check_total_windows,
    check_window_args,
    check_x,
)
from ._windows import compressed_cu_seqlens, num_windows

__all__ = ["attention_pool", "compressed_cu_seqlens", "linear", "mean_pool", "mlp", "num_windows",
           "weighted_pool"]


def _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows):
    check_x(fn, x)
    check_window_args(fn, block_size, stride, padding)
    check_pe(fn, pe, x, block_size)
    check_total_windows(fn, total_windows, cu_seqlens)
    if cu_seqlens is not None:
        check_cu_seqlens(fn, cu_seqlens, x, read_values=total_windows is None)


def _dispatch(kind, backend, total_windows, x, *args, **kwargs):
    if backend == "auto":
        b = next((b for b in _backends.backends(kind) if b.accepts_auto(x, *args, **kwargs)), None)
        if b is None:
            raise ValueError(f"{kind}: no registered backend runs on device {x.device.type} with dtype {x.dtype}")
    else:
        b = _backends.get(kind, backend)
        if not b.accepts(x, *args, **kwargs):
            raise ValueError(f"{kind}: backend {backend!r} does not support this call (device {x.device.type}, "
                             f"dtype {x.dtype}; it runs on {b.devices} with {b.dtypes})")
    if total_windows is not None and b.takes_total_windows:
        return b.fn(x, *args, total_windows=total_windows, **kwargs)
    y = b.fn(x, *args, **kwargs)
    if total_windows is not None and y.shape[2] != total_windows:   # this backend synchronised anyway
        raise ValueError(f"{kind}: total_windows={total_windows}, but cu_seqlens gives {y.shape[2]} windows")
    return y


def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None,
        backend="auto"):
    """Mean of every window: y = (1/L) * sum_j X[j].

    x: (B, H, T, D). Returns (B, H, W, D) in x's dtype.
    """
    _common("mean_pool", x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    return _dispatch("mean_pool", backend, total_windows, x, block_size=block_size, stride=stride, padding=padding,
                     pe=pe, cu_seqlens=cu_seqlens)


def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None,
        backend="auto"):
    """Weighted sum of every window: y = sum_j weight[g, j] * X[j].

    x: (B, H, T, D); weight: (G, L). Returns (B, H, W, D) in x's dtype.
    """
    fn = "weighted_pool"
    _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    check_groups(fn, "weight", weight, x.shape[1])
    check_param(fn, "weight", weight, x, (weight.shape[0], block_size))
    return _dispatch(fn, backend, total_windows, x, weight, block_size=block_size, stride=stride, padding=padding,
                     pe=pe, cu_seqlens=cu_seqlens)


def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
           total_windows=None, backend="auto"):
    """Per-window linear map (NSA eq. 7): y = sum_j X[j] @ weight[g, j] + bias[g].

    x: (B, H, T, D); weight: (G, L, D, D_out); bias: (G, D_out) or None.
    Returns (B, H, W, D_out) in x's dtype.
    """
    fn = "linear"
    _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    G = check_groups(fn, "weight", weight, x.shape[1])
    check_param(fn, "weight", weight, x, (G, block_size, x.shape[3], None))
    check_param(fn, "bias", bias, x, (G, weight.shape[3]), optional=True)
    return _dispatch(fn, backend, total_windows, x, weight, bias, block_size=block_size, stride=stride,
                     padding=padding, pe=pe, cu_seqlens=cu_seqlens)


def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None,
        total_windows=None, backend="auto"):
    """Per-window two-layer MLP on the flattened window (token-major, the
    seed's ``(n d)``): y = act(flat(X) @ w1[g] + b1[g]) @ w2[g] + b2[g].

    x: (B, H, T, D); w1: (G, L*D, F); b1: (G, F) or None; w2: (G, F, D_out);
    b2: (G, D_out) or None; activation: "relu" (default), "gelu" (exact erf
    form) or "silu". Returns (B, H, W, D_out) in x's dtype.
    """
    fn = "mlp"
    _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    check_activation(fn, activation)
    G = check_groups(fn, "w1", w1, x.shape[1])
    check_param(fn, "w1", w1, x, (G, block_size * x.shape[3], None))
    F = w1.shape[2]
    check_param(fn, "b1", b1, x, (G, F), optional=True)
    check_param(fn, "w2", w2, x, (G, F, None))
    check_param(fn, "b2", b2, x, (G, w2.shape[2]), optional=True)
    return _dispatch(fn, backend, total_windows, x, w1, b1, w2, b2, activation=activation, block_size=block_size,
                     stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None,
        backend="auto"):
    """Attention pooling, one softmax over window positions per feature:
    Z = X @ weight[g]; y[c] = sum_j softmax_j(Z[:, c])[j] * X[j, c].

    x: (B, H, T, D); weight: (G, D, D). Returns (B, H, W, D) in x's dtype.
    The softmax is max-shifted: finite inputs never give inf or NaN.
    """
    fn = "attention_pool"
    _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    G = check_groups(fn, "weight", weight, x.shape[1])
    check_param(fn, "weight", weight, x, (G, x.shape[3], x.shape[3]))
    return _dispatch(fn, backend, total_windows, x, weight, block_size=block_size, stride=stride, padding=padding,
                     pe=pe, cu_seqlens=cu_seqlens)


