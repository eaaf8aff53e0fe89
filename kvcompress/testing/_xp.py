"""One array namespace for the tolerance model: NumPy arrays or torch tensors
on any device (CUDA included), the same code.

The model (tolerance.py, gradients.py) is written against the few functions
below, in the style of the Array API's ``array_namespace(x)``: ``xp =
namespace(a, b, ...)`` gives NumPy's functions for NumPy arrays and torch's
for tensors, with the differences papered over (``axis=`` vs ``dim=``,
minimum against a scalar, scatter-add, erf, index arrays on the tensor's
device). Everything the model computes is float64; on a GPU the model then
runs where the tensors are, with no round trip through host memory at NSA
sizes (scripts/gpu_check.py).

Also here, written once for both: the window gather and its adjoint (SPEC
section 2, indices from ``windows.window_index``), the group of each head,
the activations and their derivatives, and the five kinds on gathered
windows (the exact output, and on absolute values the model's magnitudes).
"""

from __future__ import annotations

import math
import types

import numpy as np

from . import windows

_erf = np.vectorize(math.erf, otypes=[np.float64])


class _Numpy:
    name = "numpy"
    inf = np.inf

    def __init__(self):   # instance attributes: NumPy's functions are not bound as methods
        self.abs, self.exp, self.expm1, self.tanh, self.sqrt = np.abs, np.exp, np.expm1, np.tanh, np.sqrt
        self.isfinite, self.isnan, self.where, self.maximum = np.isfinite, np.isnan, np.where, np.maximum
        self.minimum, self.einsum, self.broadcast_to = np.minimum, np.einsum, np.broadcast_to

    @staticmethod
    def erf(a):
        return _erf(a)

    @staticmethod
    def sum(a, axis=None, keepdims=False):
        return a.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def max(a, axis=None, keepdims=False):
        return a.max(axis=axis, keepdims=keepdims)

    @staticmethod
    def f64(a):
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def index(a, like):
        return np.asarray(a)

    @staticmethod
    def zeros(shape, like):
        return np.zeros(shape)

    @staticmethod
    def full(shape, value, like):
        return np.full(shape, value, dtype=np.float64)

    @staticmethod
    def arange(n, like):
        return np.arange(n)

    @staticmethod
    def add_at(out, axis2_index, values):
        """out[:, :, axis2_index] += values, repeated indices summed."""
        np.add.at(out, (slice(None), slice(None), axis2_index), values)
        return out

    @staticmethod
    def all(a) -> bool:
        return bool(np.all(a))

    @staticmethod
    def to_numpy(a):
        return np.asarray(a)


class _Torch:
    name = "torch"
    inf = math.inf

    def __init__(self):
        import torch
        self.t = torch
        self.abs, self.exp, self.expm1, self.tanh, self.sqrt = torch.abs, torch.exp, torch.expm1, torch.tanh, torch.sqrt
        self.isfinite, self.isnan, self.erf, self.einsum = torch.isfinite, torch.isnan, torch.erf, torch.einsum
        self.broadcast_to = torch.broadcast_to

    def where(self, c, a, b):
        t = self.t
        like = next(v for v in (a, b, c) if isinstance(v, t.Tensor))
        a, b = (v if isinstance(v, t.Tensor) else t.tensor(v, dtype=t.float64, device=like.device) for v in (a, b))
        return t.where(c, a, b)

    def maximum(self, a, b):
        return self.t.maximum(a, b) if isinstance(b, self.t.Tensor) else a.clamp(min=b)

    def minimum(self, a, b):
        return self.t.minimum(a, b) if isinstance(b, self.t.Tensor) else a.clamp(max=b)

    def sum(self, a, axis=None, keepdims=False):
        return a.sum() if axis is None else a.sum(dim=axis, keepdim=keepdims)

    def max(self, a, axis=None, keepdims=False):
        return a.max() if axis is None else a.amax(dim=axis, keepdim=keepdims)

    def f64(self, a):
        return a.to(self.t.float64)

    def index(self, a, like):
        return self.t.as_tensor(np.asarray(a), device=like.device)

    def zeros(self, shape, like):
        return self.t.zeros(shape, dtype=self.t.float64, device=like.device)

    def full(self, shape, value, like):
        return self.t.full(shape, value, dtype=self.t.float64, device=like.device)

    def arange(self, n, like):
        return self.t.arange(n, device=like.device)

    def add_at(self, out, axis2_index, values):
        return out.index_add_(2, axis2_index, values)

    def all(self, a) -> bool:
        return bool(self.t.all(a)) if isinstance(a, self.t.Tensor) else bool(a)

    @staticmethod
    def to_numpy(a):
        return a.detach().cpu().numpy()


_NUMPY = _Numpy()
_TORCH = None


def namespace(*arrays):
    """The namespace of ``arrays`` (None entries ignored): torch's if any is a
    torch tensor, else NumPy's. Mixing a tensor with a NumPy array is an
    error the caller makes, and fails in the first operation that mixes."""
    global _TORCH
    for a in arrays:
        if a is not None and type(a).__module__.startswith("torch"):
            if _TORCH is None:
                _TORCH = _Torch()
            return _TORCH
    return _NUMPY


def float64_inputs(x, params: dict, pe=None):
    """A stand-in for the harness's Inputs (kvcompress.testing.cases) holding
    only what the model reads: ``x64`` (B, H, T, D), ``params64`` (name ->
    array or None, in signature order) and ``pe64`` (H, L, D) or None, as
    float64 arrays of the same kind and device as x (a tensor of any dtype
    and strides: its values are what the implementation under test read)."""
    xp = namespace(x)

    def f(a):
        return None if a is None else xp.f64(a)
    return types.SimpleNamespace(x64=f(x), params64={k: f(v) for k, v in params.items()}, pe64=f(pe))


# --------------------------------------------------------------------------- windows


def window_index(xp, like, T, *, block_size, stride, padding, seqlens=None):
    """``windows.window_index`` (idx, valid), each (W, L), on ``like``'s device."""
    idx, valid = windows.window_index(T, block_size=block_size, stride=stride, padding=padding, seqlens=seqlens)
    return xp.index(idx, like), xp.index(valid, like)


def gather(x, *, block_size, stride, padding, pe=None, seqlens=None):
    """x (B, H, T, D) float64 -> windows (B, H, W, L, D), pe (H, L, D) added,
    left-pad tokens zero (+ pe): ``windows.gather_windows`` in any namespace."""
    xp = namespace(x)
    idx, valid = window_index(xp, x, x.shape[2], block_size=block_size, stride=stride, padding=padding,
                              seqlens=seqlens)
    win = xp.where(valid[None, None, :, :, None], x[:, :, idx, :], 0.0)            # [B, H, W, L, D]
    return win if pe is None else win + pe[None, :, None, :, :]


def scatter(gwin, T, *, block_size, stride, padding, seqlens=None):
    """The adjoint of ``gather`` for x: (B, H, W, L, D) -> (B, H, T, D), each
    window position summed into its token (pad positions dropped)."""
    xp = namespace(gwin)
    B, H, W, L, D = gwin.shape
    idx, valid = window_index(xp, gwin, T, block_size=block_size, stride=stride, padding=padding, seqlens=seqlens)
    return xp.add_at(xp.zeros((B, H, T, D), gwin), idx[valid], gwin[:, :, valid])


def heads(xp, a, H):
    """A per-group parameter (G, ...) as per-head (H, ...): group h // (H // G)."""
    G = a.shape[0]
    return a[xp.arange(H, a) // (H // G)]


def groups(a, G):
    """Per-head sums (H, ...) -> per-group sums (G, ...)."""
    return a.reshape((G, a.shape[0] // G) + tuple(a.shape[1:])).sum(1)


def act(xp, name, z):
    """relu (NaN kept), exact-erf gelu, silu, in float64."""
    if name == "relu":
        return xp.where(z > 0, z, xp.where(xp.isnan(z), z, 0.0))
    if name == "gelu":
        return 0.5 * z * (1.0 + xp.erf(z / math.sqrt(2.0)))
    return z * 0.5 * (1.0 + xp.tanh(0.5 * z))   # z * sigmoid(z), without overflow


def act_prime(xp, name, z):
    """The derivative of ``act`` (relu: 0 at 0)."""
    if name == "relu":
        return xp.where(z > 0, 1.0, 0.0)
    if name == "gelu":
        return 0.5 * (1.0 + xp.erf(z / math.sqrt(2.0))) + z * xp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    s = 0.5 * (1.0 + xp.tanh(0.5 * z))   # sigmoid without overflow
    return s * (1.0 + z * (1.0 - s))


# --------------------------------------------------------------------------- the kinds on windows


def mlp_pre(win, w1, b1):
    """mlp's pre-activation (B, H, W, F) = flat(X) @ w1[g] + b1[g]."""
    xp = namespace(win)
    B, H, W, L, D = win.shape
    pre = xp.einsum("bhwk,hkf->bhwf", win.reshape(B, H, W, L * D), heads(xp, w1, H))
    return pre if b1 is None else pre + heads(xp, b1, H)[None, :, None, :]


def attention_logits(win, weight):
    """Z (B, H, W, L, D) = X @ weight[g]."""
    xp = namespace(win)
    return xp.einsum("bhwld,hdc->bhwlc", win, heads(xp, weight, win.shape[1]))


def softmax_positions(z):
    """softmax over window positions (axis 3), max-shifted."""
    xp = namespace(z)
    p = xp.exp(z - xp.max(z, axis=3, keepdims=True))
    return p / xp.sum(p, axis=3, keepdims=True)


def on_windows(kind, win, params: list, *, activation="relu"):
    """The output (B, H, W, D_out) of ``kind`` on gathered windows
    (B, H, W, L, D), params in signature order: the exact output on the
    values, the model's magnitude on absolute values (mlp with relu)."""
    xp = namespace(win)
    H = win.shape[1]
    if kind == "mean_pool":
        return xp.sum(win, axis=3) / win.shape[3]
    if kind == "weighted_pool":
        return xp.einsum("bhwld,hl->bhwd", win, heads(xp, params[0], H))
    if kind == "linear":
        weight, bias = params
        y = xp.einsum("bhwld,hldo->bhwo", win, heads(xp, weight, H))
        return y if bias is None else y + heads(xp, bias, H)[None, :, None, :]
    if kind == "mlp":
        w1, b1, w2, b2 = params
        y = xp.einsum("bhwf,hfo->bhwo", act(xp, activation, mlp_pre(win, w1, b1)), heads(xp, w2, H))
        return y if b2 is None else y + heads(xp, b2, H)[None, :, None, :]
    if kind == "attention_pool":
        return xp.sum(softmax_positions(attention_logits(win, params[0])) * win, axis=3)
    raise ValueError(f"unknown kind {kind!r}")
