"""The compressors on torch tensors (docs/semantics.md), one function per
kind of ``kvcompress.kinds``, each validated by its kind's record.

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
  capturable) on the Triton backend (the torch backend's packed layout
  still reads its window count: docs/semantics.md, a known gap): on a GPU
  cu_seqlens' values are then trusted, not read on
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

import torch

from . import backends as _backends
from . import kinds as _kinds
from ._cache import bounded_put
from ._validate import (
    check_choice,
    check_cu_seqlens_layout,
    check_cu_seqlens_values,
    check_groups,
    check_param,
    check_pe,
    check_total_windows,
    check_window_args,
    check_x,
)
from ._windows import _num_windows, compressed_cu_seqlens, num_windows

__all__ = ["attention_pool", "compressed_cu_seqlens", "gated_pool", "linear", "mean_pool", "mlp", "num_windows",
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
    check_cu_seqlens_layout(fn, cu_seqlens, x)
    if total_windows is not None and cu_seqlens.device.type != "cpu":   # values trusted on the device
        return block_size, stride, total_windows, total_windows
    return block_size, stride, total_windows, _cu_values(fn, x, cu_seqlens, block_size, stride, padding,
                                                         total_windows)


def _check_kind_args(kind: _kinds.Kind, x, tensors: tuple, options: dict, block_size: int, stride: int) -> int:
    """Validate the kind's other inputs, options and parameters against its
    record (kvcompress/kinds.py); returns D_out. Order: inputs, options,
    the constraints between them, then the parameters in signature order,
    the first present one fixing G (it must divide H) and each dim a
    parameter gives (D_out, F) checked against every later one."""
    fn = kind.name
    n_in = len(kind.inputs) - 1
    for name, t in zip(kind.inputs[1:], tensors[:n_in]):
        check_param(fn, name, t, x, tuple(x.shape))
    for o in kind.options:
        v = options[o.name]
        if o.choices is not None:
            check_choice(fn, o.name, v, o.choices)
        elif not isinstance(v, bool):
            raise TypeError(f"{fn}: {o.name} must be a bool, got {type(v).__name__}")
    dims = {"L": block_size, "S": stride, "D": x.shape[3]}
    if kind.check is not None:
        kind.check(fn, dims, options)
    if kind.d_out is not None:
        dims["D_out"] = kind.d_out(dims, options)
    for p, t in zip(kind.params, tensors[n_in:]):
        if t is None and p.optional:
            continue
        if "G" not in dims and p.shape[0] == "G":
            dims["G"] = check_groups(fn, p.name, t, x.shape[1])
        # a product ("L*D") of known dims, a known dim, or None: a dim this parameter is the first to give
        shape = tuple(kind.dim(d, dims) if "*" in d else dims.get(d) for d in p.shape)
        check_param(fn, p.name, t, x, shape, optional=p.optional)
        dims.update((d, n) for d, n in zip(p.shape, t.shape) if d not in dims)
    return dims.get("D_out", x.shape[3])


# The validation fast path: the normalised results of a valid call's checks, keyed on everything the
# checks read (each tensor's exact type, shape, dtype and device; the plain ints, strs and bools; which
# optional tensors are given). Strides and values are not read by any check (cu_seqlens' values are, and
# are checked again on every call that reads them: _cu_values). A miss runs every check in order, so a
# bad call raises exactly what it always did; only a call that passed them all is remembered.
_VALID: dict[tuple, tuple] = {}
_VALID_MAX = 256        # cleared when full: a working set of a few shapes per kind stays cached
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PLAIN_OPTIONS = (str, bool)


def _valid_key(name, x, tensors, options, block_size, stride, padding, pe, cu_seqlens, total_windows):
    """The fast path's key of a call, or None when it must take the slow path:
    a tensor argument of another type (a subclass, fake or traced tensor, a
    non-tensor), a scalar that is not exactly an int / str / bool (True == 1
    and 4.0 == 4 would share a key), or torch.compile tracing."""
    if type(block_size) is not int or type(stride) is not int or type(padding) is not str \
            or (total_windows is not None and type(total_windows) is not int) or torch.compiler.is_compiling():
        return None
    key = [name, block_size, stride, padding, total_windows]
    for v in options.values():
        if type(v) not in _PLAIN_OPTIONS:
            return None
        key.append(v)
    # each tensor slot is None or (shape, dtype, device): never ambiguous, a torch.Size is never None
    for t in (x, pe, cu_seqlens, *tensors):
        if t is None:
            key.append(None)
        elif type(t) in _PLAIN_TENSORS:
            key += (t.shape, t.dtype, t.device)
        else:
            return None
    return tuple(key)


def _cu_values(fn, x, cu_seqlens, block_size, stride, padding, total_windows):
    """W of a packed call whose cu_seqlens values are read on the host, the
    value checks of ``_common`` (run on every call: values are never cached)."""
    vals = check_cu_seqlens_values(fn, cu_seqlens, x)
    W = sum(_num_windows(b - a, block_size, stride, padding) for a, b in zip(vals, vals[1:]))
    if total_windows is not None and total_windows != W:
        raise ValueError(f"{fn}: total_windows={total_windows}, but cu_seqlens gives {W} windows")
    return W


def _validate(name, x, tensors, options, block_size, stride, padding, pe, cu_seqlens, total_windows):
    """Every check of a call of kind ``name``, in order -> (block_size, stride,
    total_windows, W, d_out) normalised (``_common``, ``_check_kind_args``),
    from the fast path's cache when the same key passed them before."""
    key = _valid_key(name, x, tensors, options, block_size, stride, padding, pe, cu_seqlens, total_windows)
    hit = _VALID.get(key) if key is not None else None
    if hit is not None:
        block_size, stride, total_windows, W, d_out, reads_values = hit
        if reads_values:        # the only check whose outcome a key cannot fix: cu_seqlens' values
            W = _cu_values(name, x, cu_seqlens, block_size, stride, padding, total_windows)
        return block_size, stride, total_windows, W, d_out
    kind = _kinds.get(name)
    if not kind.pe and pe is not None:
        raise TypeError(f"{name}: takes no pe (got a {type(pe).__name__})")
    block_size, stride, total_windows, W = _common(name, x, block_size, stride, padding, pe, cu_seqlens,
                                                   total_windows)
    d_out = _check_kind_args(kind, x, tensors, options, block_size, stride)
    if key is not None:
        reads_values = cu_seqlens is not None and (total_windows is None or cu_seqlens.device.type == "cpu")
        bounded_put(_VALID, key, (block_size, stride, total_windows, None if reads_values else W, d_out, reads_values),
                    _VALID_MAX)
    return block_size, stride, total_windows, W, d_out


def _call(name, x, tensors, options, *, block_size, stride, padding, pe, cu_seqlens, total_windows, backend,
          lean=False):
    """Validate a call of kind ``name`` by its record, then dispatch it
    (``lean``: to a lean backend only, see _dispatch)."""
    block_size, stride, total_windows, W, d_out = _validate(name, x, tensors, options, block_size, stride, padding,
                                                            pe, cu_seqlens, total_windows)
    kw = dict(block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens, **options)
    if pe is not None or _kinds.get(name).pe:
        kw["pe"] = pe
    return _dispatch(name, backend, total_windows, W, d_out, x, *tensors, lean=lean, **kw)


def _no_windows(x, d_out, *tensors):
    """The empty (B, H, 0, d_out) output of a call without windows, attached
    to autograd through every tensor input (each gets a zero gradient)."""
    y = x.new_zeros((x.shape[0], x.shape[1], 0, d_out))
    for t in (x, *tensors):
        if t is not None:
            y = y + t[:0].sum()
    return y


def _dispatch(kind, backend, total_windows, W, d_out, x, *args, lean=False, **kwargs):
    """Pick the backend (validating ``backend``; with ``lean``, among the
    backends registered lean only), then return the empty output if there
    is no window (W == 0), else the backend's result."""
    if not isinstance(backend, str):
        raise TypeError(f"{kind}: backend must be a str, 'auto' or a backend name, got {type(backend).__name__}")
    if backend == "auto":
        b = next((b for b in _backends.backends(kind) if (b.lean or not lean) and b.accepts_auto(x, *args, **kwargs)),
                 None)
        if b is None and lean:
            raise ValueError(f"{kind}: memory='lean': no registered backend that keeps the hidden layer out of memory "
                             f"runs on device {x.device.type} with dtype {x.dtype} (the Triton backend does, on CUDA)")
        if b is None:
            raise ValueError(f"{kind}: no registered backend runs on device {x.device.type} with dtype {x.dtype}")
    else:
        b = _backends.get(kind, backend)
        if lean and not b.lean:
            raise ValueError(f"{kind}: memory='lean', but backend {backend!r} stores the hidden layer "
                             f"(use memory='auto', or a lean backend such as 'triton')")
        if not b.accepts(x, *args, **kwargs):
            raise ValueError(f"{kind}: backend {backend!r} does not support this call (device {x.device.type}, "
                             f"dtype {x.dtype}; it runs on {b.devices} with {b.dtypes})")
    if W == 0:
        return _no_windows(x, d_out, *args, kwargs.get("pe"))
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
    return _call("mean_pool", x, (), {}, block_size=block_size, stride=stride, padding=padding,
                 pe=pe, cu_seqlens=cu_seqlens, total_windows=total_windows, backend=backend)


def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None,
        backend="auto"):
    """Weighted sum of every window: y = sum_j weight[g, j] * X[j].

    x: (B, H, T, D); weight: (G, L). Returns (B, H, W, D) in x's dtype.
    """
    return _call("weighted_pool", x, (weight,), {}, block_size=block_size, stride=stride, padding=padding,
                 pe=pe, cu_seqlens=cu_seqlens, total_windows=total_windows, backend=backend)


def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
           total_windows=None, backend="auto"):
    """Per-window linear map (NSA eq. 7): y = sum_j X[j] @ weight[g, j] + bias[g].

    x: (B, H, T, D); weight: (G, L, D, D_out); bias: (G, D_out) or None.
    Returns (B, H, W, D_out) in x's dtype.
    """
    return _call("linear", x, (weight, bias), {}, block_size=block_size, stride=stride, padding=padding,
                 pe=pe, cu_seqlens=cu_seqlens, total_windows=total_windows, backend=backend)


def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None,
        total_windows=None, backend="auto", memory="auto"):
    """Per-window two-layer MLP on the flattened window (token-major, the
    seed's ``(n d)``): y = act(flat(X) @ w1[g] + b1[g]) @ w2[g] + b2[g].

    x: (B, H, T, D); w1: (G, L*D, F); b1: (G, F) or None; w2: (G, F, D_out);
    b2: (G, D_out) or None; activation: "relu" (default), "gelu" (exact erf
    form) or "silu". Returns (B, H, W, D_out) in x's dtype.

    memory: "auto" (default) lets backend="auto" take the fastest path,
    which on CUDA stores the hidden layer (B * H * W * F units in x's dtype)
    for the backward where it fits in what the process's CUDA allocator can
    still hand out and the call is large enough for cuBLAS to win (backend
    "gemm"; ``kvcompress.ops.mlp.gemm_impl.AUTO_MIN_GROUP_FLOPS``), and the
    fused Triton kernel otherwise; "lean" never
    stores it (the fused kernel: extra memory of the output's order, about
    1.5x the time), and raises ValueError where no lean backend runs (the
    CPU) or when ``backend`` names one that stores it.
    """
    check_choice("mlp", "memory", memory, ("auto", "lean"))
    return _call("mlp", x, (w1, b1, w2, b2), {"activation": activation}, block_size=block_size, stride=stride,
                 padding=padding, pe=pe, cu_seqlens=cu_seqlens, total_windows=total_windows, backend=backend,
                 lean=memory == "lean")


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
    return _call("attention_pool", x, (weight,), {}, block_size=block_size, stride=stride, padding=padding,
                 pe=pe, cu_seqlens=cu_seqlens, total_windows=total_windows, backend=backend)


def gated_pool(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None,
               total_windows=None, backend="auto"):
    """Gated pooling, DeepSeek-V4's compressor core (docs/semantics.md,
    "gated_pool"): one softmax over window positions per feature of the gate
    scores plus a position bias, pooling the values.

    Window position j reads feature chunk c = j // S with ``split`` (else
    0); s[j, f] = z[t, c*D_out + f] + bias[g, j, f], a pad position has
    weight 0; y[f] = sum_j softmax_j(s[:, f])[j] * x[t, c*D_out + f].

    x (values), z (gate scores): (B, H, T, D), any strides; bias:
    (G, L, D_out) or None; split (bool, default False): C = L / S chunks
    (S must divide L and C must divide D), D_out = D / C; without it
    D_out = D. No pe (the bias takes its place). Returns (B, H, W, D_out)
    in x's dtype. DeepSeek-V4: CSA (ratio R = 4) is block_size = 2R,
    stride = R, padding "left", split=True, bias[g, j, f] =
    ape[j mod R, (j // R) d + f]; HCA (R = 128) is block_size = stride = R,
    padding "valid", bias = ape.
    """
    return _call("gated_pool", x, (z, bias), {"split": split}, block_size=block_size, stride=stride,
                 padding=padding, pe=None, cu_seqlens=cu_seqlens, total_windows=total_windows, backend=backend)
