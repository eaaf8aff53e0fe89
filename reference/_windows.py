"""Windowing, shared by every reference compressor: the definition of which
tokens form which window (SPEC section 2), written as plain loops.

Nothing here is vectorized on purpose: this file is read as the contract.
Arrays come in as NumPy arrays (float16/float32/float64 or ml_dtypes'
bfloat16), are turned into nested Python lists of float64, and every window
is assembled token by token.

Errors follow the library's rule (docs/semantics.md, "Errors"): TypeError
for a value of the wrong type (an integer argument that is not a
``numbers.Integral`` or is a bool; a non-str padding or activation; a
non-floating array; integer offsets of another dtype), ValueError for a
value of the right type out of range or of the wrong rank or shape.
"""

from __future__ import annotations

import numbers

import numpy as np

PADDINGS = ("valid", "left")


def _is_int(v):
    """An integer: any numbers.Integral (numpy integers included), never a bool."""
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_int(v, name, lo):
    """``v`` as an int >= lo: TypeError if not an integer, ValueError if below lo."""
    if not _is_int(v):
        raise TypeError(f"{name} must be an int >= {lo}, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def check_choice(v, name, choices):
    """``v`` one of the strings ``choices``: TypeError for a non-str, ValueError for another str."""
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(v).__name__} {v!r}")
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")


def check_window_args(block_size, stride, padding):
    """(block_size, stride) as ints with 1 <= stride <= block_size; padding one of PADDINGS."""
    L = check_int(block_size, "block_size", 1)
    if not _is_int(stride):
        raise TypeError(f"stride must be an int with 1 <= stride <= block_size={L}, got {type(stride).__name__} "
                        f"{stride!r}")
    if not 1 <= stride <= L:
        raise ValueError(f"stride must be an int with 1 <= stride <= block_size={L}, got {stride!r}")
    check_choice(padding, "padding", PADDINGS)
    return L, int(stride)


def num_windows(n, block_size, stride, padding="valid"):
    """Number of windows W in one sequence of ``n`` tokens (n >= 0).

    ``padding="valid"``: windows [i*S, i*S + L) inside the sequence, so
    W = (n - L) // S + 1 when n >= L, else 0.
    ``padding="left"``: L - S zero tokens are prepended (the seed's ZeroPad +
    Unfold), so W = n // S; the trailing n mod S tokens form no window.
    Raises TypeError/ValueError (naming n, block_size, stride or padding)
    by the rule above.
    """
    n = check_int(n, "n", 0)
    block_size, stride = check_window_args(block_size, stride, padding)
    if padding == "valid":
        return (n - block_size) // stride + 1 if n >= block_size else 0
    return n // stride


def window_start(i, block_size, stride, padding="valid"):
    """Position (relative to the sequence start) of token 0 of window ``i``;
    negative positions are left-padding zero tokens."""
    if padding == "valid":
        return i * stride
    return i * stride - (block_size - stride)


def compressed_cu_seqlens(cu_seqlens, block_size, stride, padding="valid"):
    """Offsets of each sequence's compressed tokens in a packed output.

    cu_seqlens: int array (N+1,), offsets of N packed sequences.
    Returns an array of the same dtype, (N+1,): entry k is the number of
    windows of sequences 0..k-1.
    """
    cu = np.asarray(cu_seqlens)
    _check_int_array(cu, "cu_seqlens")
    out = [0]
    for k in range(len(cu) - 1):
        n = int(cu[k + 1]) - int(cu[k])
        out.append(out[-1] + num_windows(n, block_size, stride, padding))
    return np.asarray(out, dtype=cu.dtype)


def _check_int_array(cu, name):
    if cu.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array of N+1 offsets, got dtype {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D integer array of N+1 offsets, got shape {cu.shape}")


def _check_float(a, name):
    a = np.asarray(a)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a floating array (float16/32/64 or bfloat16), got {a.dtype}")
    return a


def check_x(x):
    """x: a floating array (TypeError otherwise) of 4 dims (B, H, T, D) (ValueError otherwise)."""
    x = _check_float(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x must have 4 dims (B, H, T, D), got shape {x.shape}")
    return x


def check_param(a, name, ndim, *, optional=False):
    """A parameter: a floating array (TypeError otherwise) of ``ndim`` dims
    (ValueError otherwise); None only when ``optional``."""
    if a is None:
        if optional:
            return None
        raise TypeError(f"{name} is required, a floating array with {ndim} dims")
    a = _check_float(a, name)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {a.shape}")
    return a


def to_lists(a):
    """float64 nested lists of any floating array (bfloat16 included)."""
    return np.asarray(a).astype(np.float64).tolist()


def check_shape(a, shape, name):
    """Raise ValueError unless ``a.shape == shape``."""
    if a is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


def check_groups(groups, heads, name):
    """Raise ValueError unless the weight's leading dim G divides H."""
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"{name}.shape[0] (groups G={groups}) must divide the number of heads H={heads}")


def compress(x, window_fn, d_out, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Apply ``window_fn`` to every window of ``x``.

    x: (B, H, T, D) floating array. pe: (H, L, D) or None.
    cu_seqlens: (N+1,) integer offsets (then B must be 1) or None.
    window_fn(window, h) -> list of d_out floats, where window is a list of L
    tokens (each a list of D float64) with pe already added.
    Returns (B, H, W, d_out) in x's dtype, W summed over sequences.
    """
    x = check_x(x)
    B, H, T, D = x.shape
    L, S = check_window_args(block_size, stride, padding)
    if pe is not None:
        pe = _check_float(pe, "pe")
        check_shape(pe, (H, L, D), "pe")
        pe = to_lists(pe)
    if cu_seqlens is None:
        seqs = [(0, T)]
    else:
        cu = np.asarray(cu_seqlens)
        _check_int_array(cu, "cu_seqlens")
        if B != 1:
            raise ValueError(f"with cu_seqlens, x must have batch size 1, got B={B}")
        cu = [int(c) for c in cu]
        if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {cu}")
        seqs = list(zip(cu[:-1], cu[1:]))

    xs = to_lists(x)
    n_out = sum(num_windows(e - s, L, S, padding) for s, e in seqs)
    out = np.zeros((B, H, n_out, d_out), dtype=np.float64)
    for b in range(B):
        for h in range(H):
            w_out = 0
            for s, e in seqs:
                for i in range(num_windows(e - s, L, S, padding)):
                    start = s + window_start(i, L, S, padding)
                    window = []
                    for j in range(L):
                        t = start + j
                        assert t < e  # a window never reaches past its sequence
                        token = xs[b][h][t] if t >= s else [0.0] * D
                        if pe is not None:
                            token = [token[d] + pe[h][j][d] for d in range(D)]
                        window.append(token)
                    y = window_fn(window, h)
                    for c in range(d_out):
                        out[b, h, w_out, c] = y[c]
                    w_out += 1
    return out.astype(x.dtype)
