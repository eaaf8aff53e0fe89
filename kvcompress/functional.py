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
  capturable): on a GPU cu_seqlens' values are then trusted, not read on
  the host (its dtype, shape and device are still checked), and backends
  that can verify it on the device do so (docs/semantics.md says what
  malformed values give there). On the CPU reading them costs nothing, so
  they are read and checked anyway, and total_windows must equal their
  window count (else ValueError). Without cu_seqlens it must be None.
- backend: "auto" (the highest-priority registered backend that supports
  the call) or a backend name.

Every function validates all arguments before computing, by one rule
(docs/semantics.md, "Errors"): a value of the wrong type raises TypeError
(a non-integer block_size, stride or total_windows, bool and float
included; a non-tensor; a non-str padding or activation; a non-float x; a
parameter or pe whose dtype differs from x's; cu_seqlens of a non-integer
dtype); a value of the right type that is out of range or of the wrong
rank, shape or device raises ValueError. Integers may be any
``numbers.Integral`` except bool (numpy integers included). Each message
starts with the function's name and names the argument.

A call without any window (T < L with padding "valid", T < S with "left",
or packed sequences all that short) returns the empty (B, H, 0, D_out)
output without running a backend, whatever block_size is: nothing is ever
allocated or looped over by L alone. The empty output is attached to
autograd (every input gets a zero gradient).
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
from ._windows import _num_windows, compressed_cu_seqlens, num_windows

__all__ = ["attention_pool", "compressed_cu_seqlens", "linear", "mean_pool", "mlp", "num_windows",
           "weighted_pool"]


def _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows):
    """Validate the common arguments; returns (block_size, stride,
    total_windows) normalised to ints and W, the number of output windows
    (None when it is not known on the host without a device read)."""
    check_x(fn, x)
    block_size, stride = check_window_args(fn, block_size, stride, padding)
    check_pe(fn, pe, x, block_size)
    total_windows = check_total_windows(fn, total_windows, cu_seqlens)
    if cu_seqlens is None:
        return block_size, stride, total_windows, _num_windows(x.shape[2], block_size, stride, padding)
    vals = check_cu_seqlens(fn, cu_seqlens, x, read_values=total_windows is None)
    if vals is None:           # values trusted on the device: total_windows is the count
        return block_size, stride, total_windows, total_windows
    W = sum(_num_windows(b - a, block_size, stride, padding) for a, b in zip(vals, vals[1:]))
    if total_windows is not None and total_windows != W:
        raise ValueError(f"{fn}: total_windows={total_windows}, but cu_seqlens gives {W} windows")
    return block_size, stride, total_windows, W


def _no_windows(x, d_out, *tensors):
    """The empty (B, H, 0, d_out) output of a call without windows, attached
    to autograd through every tensor input (each gets a zero gradient)."""
    y = x.new_zeros((x.shape[0], x.shape[1], 0, d_out))
    for t in (x, *tensors):
        if t is not None:
            y = y + t[:0].sum()
    return y


def _dispatch(kind, backend, total_windows, W, d_out, x, *args, **kwargs):
    """Pick the backend (validating ``backend``), then return the empty
    output if there is no window (W == 0), else the backend's result."""
    if not isinstance(backend, str):
        raise TypeError(f"{kind}: backend must be a str, 'auto' or a backend name, got {type(backend).__name__}")
    if backend == "auto":
        b = next((b for b in _backends.backends(kind) if b.accepts_auto(x, *args, **kwargs)), None)
        if b is None:
            raise ValueError(f"{kind}: no registered backend runs on device {x.device.type} with dtype {x.dtype}")
    else:
        b = _backends.get(kind, backend)
        if not b.accepts(x, *args, **kwargs):
            raise ValueError(f"{kind}: backend {backend!r} does not support this call (device {x.device.type}, "
                             f"dtype {x.dtype}; it runs on {b.devices} with {b.dtypes})")
    if W == 0:
        return _no_windows(x, d_out, *args, kwargs["pe"])
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
    block_size, stride, total_windows, W = _common("mean_pool", x, block_size, stride, padding, pe, cu_seqlens,
                                                   total_windows)
    return _dispatch("mean_pool", backend, total_windows, W, x.shape[3], x, block_size=block_size, stride=stride,
                     padding=padding, pe=pe, cu_seqlens=cu_seqlens)


def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None,
        backend="auto"):
    """Weighted sum of every window: y = sum_j weight[g, j] * X[j].

    x: (B, H, T, D); weight: (G, L). Returns (B, H, W, D) in x's dtype.
    """
    fn = "weighted_pool"
    block_size, stride, total_windows, W = _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    check_groups(fn, "weight", weight, x.shape[1])
    check_param(fn, "weight", weight, x, (weight.shape[0], block_size))
    return _dispatch(fn, backend, total_windows, W, x.shape[3], x, weight, block_size=block_size, stride=stride,
                     padding=padding, pe=pe, cu_seqlens=cu_seqlens)


def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
           total_windows=None, backend="auto"):
    """Per-window linear map (NSA eq. 7): y = sum_j X[j] @ weight[g, j] + bias[g].

    x: (B, H, T, D); weight: (G, L, D, D_out); bias: (G, D_out) or None.
    Returns (B, H, W, D_out) in x's dtype.
    """
    fn = "linear"
    block_size, stride, total_windows, W = _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    G = check_groups(fn, "weight", weight, x.shape[1])
    check_param(fn, "weight", weight, x, (G, block_size, x.shape[3], None))
    check_param(fn, "bias", bias, x, (G, weight.shape[3]), optional=True)
    return _dispatch(fn, backend, total_windows, W, weight.shape[3], x, weight, bias, block_size=block_size,
                     stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None,
        total_windows=None, backend="auto"):
    """Per-window two-layer MLP on the flattened window (token-major, the
    seed's ``(n d)``): y = act(flat(X) @ w1[g] + b1[g]) @ w2[g] + b2[g].

    x: (B, H, T, D); w1: (G, L*D, F); b1: (G, F) or None; w2: (G, F, D_out);
    b2: (G, D_out) or None; activation: "relu" (default), "gelu" (exact erf
    form) or "silu". Returns (B, H, W, D_out) in x's dtype.
    """
    fn = "mlp"
    block_size, stride, total_windows, W = _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    check_activation(fn, activation)
    G = check_groups(fn, "w1", w1, x.shape[1])
    check_param(fn, "w1", w1, x, (G, block_size * x.shape[3], None))
    F = w1.shape[2]
    check_param(fn, "b1", b1, x, (G, F), optional=True)
    check_param(fn, "w2", w2, x, (G, F, None))
    check_param(fn, "b2", b2, x, (G, w2.shape[2]), optional=True)
    return _dispatch(fn, backend, total_windows, W, w2.shape[2], x, w1, b1, w2, b2, activation=activation,
                     block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None,
        backend="auto"):
    """Attention pooling, one softmax over window positions per feature:
    Z = X @ weight[g]; y[c] = sum_j softmax_j(Z[:, c])[j] * X[j, c].

    x: (B, H, T, D); weight: (G, D, D). Returns (B, H, W, D) in x's dtype.
    The softmax is max-shifted: finite inputs whose logits fit the
    accumulation dtype (float32; float64 for float64 input) never give inf or
    NaN; a logit beyond it may make its window's output NaN
    (docs/semantics.md, "Numerics").
    """
    fn = "attention_pool"
    block_size, stride, total_windows, W = _common(fn, x, block_size, stride, padding, pe, cu_seqlens, total_windows)
    G = check_groups(fn, "weight", weight, x.shape[1])
    check_param(fn, "weight", weight, x, (G, x.shape[3], x.shape[3]))
    return _dispatch(fn, backend, total_windows, W, x.shape[3], x, weight, block_size=block_size, stride=stride,
                     padding=padding, pe=pe, cu_seqlens=cu_seqlens)


