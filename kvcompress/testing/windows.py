"""A vectorized NumPy formulation of the five kinds, independent of the loop
reference and of kvcompress: windows gathered by index, then einsum.

Used twice: ``tests/test_reference.py`` checks the loop reference against it
(two independent readings of SPEC must agree), and the tolerance model runs
it on absolute values to get each output's magnitude.
"""

from __future__ import annotations

import math

import kvcompress_reference as reference
import numpy as np


def window_index(T, *, block_size, stride, padding, seqlens=None):
    """(idx, valid), each (W, L): token index of every window position, and
    whether it is a real token (False: a left-padding zero)."""
    L, S = block_size, stride
    seqs = [T] if seqlens is None else list(seqlens)
    idx, valid = [], []
    start = 0
    for n in seqs:
        for i in range(reference.num_windows(n, L, S, padding)):
            pos = reference.window_start(i, L, S, padding) + np.arange(L)
            valid.append(pos >= 0)
            idx.append(start + np.maximum(pos, 0))
        start += n
    if not idx:
        return np.zeros((0, L), np.int64), np.zeros((0, L), bool)
    return np.stack(idx), np.stack(valid)


def gather_windows(x, *, block_size, stride, padding, pe=None, seqlens=None):
    """x (B, H, T, D) float64 -> windows (B, H, W, L, D), pe added,
    left-pad tokens zero (+ pe). seqlens: lengths of packed sequences or None."""
    idx, valid = window_index(x.shape[2], block_size=block_size, stride=stride, padding=padding, seqlens=seqlens)
    win = np.where(valid[None, None, :, :, None], x[:, :, idx, :], 0.0)   # [B, H, W, L, D]
    if pe is not None:
        win = win + pe[None, :, None, :, :]
    return win


def scatter_windows(gwin, T, *, block_size, stride, padding, seqlens=None):
    """The adjoint of gather_windows for x: (B, H, W, L, D) -> (B, H, T, D),
    summing each window position into its token (pad positions dropped)."""
    B, H, W, L, D = gwin.shape
    idx, valid = window_index(T, block_size=block_size, stride=stride, padding=padding, seqlens=seqlens)
    out = np.zeros((B, H, T, D))
    np.add.at(out, (slice(None), slice(None), idx[valid]), gwin[:, :, valid])
    return out


_erf = np.vectorize(math.erf, otypes=[np.float64])


def group_of_head(G, H):
    """(H,) group index of each head: h // (H // G)."""
    return np.arange(H) // (H // G)


def act(name, z):
    if name == "relu":
        return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0))
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / np.sqrt(2.0)))
    return z * 0.5 * (1.0 + np.tanh(0.5 * z))   # z * sigmoid(z), without overflow


def mean_pool(win):
    return win.mean(axis=3)


def weighted_pool(win, weight):
    wh = weight[group_of_head(weight.shape[0], win.shape[1])]     # [H, L]
    return np.einsum("bhwld,hl->bhwd", win, wh)


def linear(win, weight, bias=None):
    H = win.shape[1]
    gh = group_of_head(weight.shape[0], H)
    y = np.einsum("bhwld,hldo->bhwo", win, weight[gh])
    return y if bias is None else y + bias[gh][None, :, None, :]


def mlp(win, w1, b1, w2, b2, activation="relu"):
    B, H, W, L, D = win.shape
    gh = group_of_head(w1.shape[0], H)
    pre = np.einsum("bhwk,hkf->bhwf", win.reshape(B, H, W, L * D), w1[gh])
    if b1 is not None:
        pre = pre + b1[gh][None, :, None, :]
    y = np.einsum("bhwf,hfo->bhwo", act(activation, pre), w2[gh])
    return y if b2 is None else y + b2[gh][None, :, None, :]


def attention_logits(win, weight):
    """Z (B, H, W, L, D) = X @ weight[g]."""
    gh = group_of_head(weight.shape[0], win.shape[1])
    return np.einsum("bhwld,hdc->bhwlc", win, weight[gh])


def attention_pool(win, weight):
    z = attention_logits(win, weight)
    z = z - z.max(axis=3, keepdims=True)
    p = np.exp(z)
    p = p / p.sum(axis=3, keepdims=True)
    return (p * win).sum(axis=3)


def gated_values(win, *, split=False, stride=None):
    """The features each window position reads (SPEC section 3b):
    (B, H, W, L, Dx) -> (B, H, W, L, D_out). Without ``split`` every
    position reads all Dx features (D_out = Dx); with it, position j reads
    chunk c = j // stride of the C = L // stride chunks of D_out = Dx // C."""
    if not split:
        return win
    B, H, W, L, Dx = win.shape
    C = L // stride
    chunks = win.reshape(B, H, W, L, C, Dx // C)                     # [B, H, W, L, C, D_out]
    j = np.arange(L)
    return chunks[:, :, :, j, j // stride, :]                        # [B, H, W, L, D_out]


def gated_logits(win_z, bias=None, *, valid, split=False, stride=None):
    """Scores s (B, H, W, L, D_out) of gated_pool: the chunk of z that each
    position reads, plus bias[g] (G, L, D_out) broadcast over windows; -inf
    at pad positions (``valid`` (W, L) False), so they weigh 0."""
    s = gated_values(win_z, split=split, stride=stride)
    if bias is not None:
        s = s + bias[group_of_head(bias.shape[0], win_z.shape[1])][None, :, None, :, :]
    return np.where(valid[None, None, :, :, None], s, -np.inf)


def gated_pool(win_x, win_z, bias=None, *, valid, split=False, stride=None):
    """gated_pool on gathered windows: win_x, win_z (B, H, W, L, Dx) from
    ``gather_windows`` (no pe), valid (W, L) from ``window_index``, bias
    (G, L, D_out) or None; ``stride`` is needed only with ``split``.
    Returns (B, H, W, D_out): sum_j softmax_j(s)[j] * v[j], max-shifted."""
    v = gated_values(win_x, split=split, stride=stride)               # [B, H, W, L, D_out]
    s = gated_logits(win_z, bias, valid=valid, split=split, stride=stride)
    p = np.exp(s - s.max(axis=3, keepdims=True))
    p = p / p.sum(axis=3, keepdims=True)
    # a pad's value is 0 and its weight exactly 0; where() keeps a pad's
    # 0 * v from ever reading v (NaN-free even if a caller's pad were not 0)
    return np.where(valid[None, None, :, :, None], p * v, 0.0).sum(axis=3)


def gated_pool_tokens(x, z, bias=None, *, split=False, block_size, stride, padding, seqlens=None):
    """gated_pool from tokens, for a harness: x, z (B, H, T, Dx) float64,
    seqlens the packed sequences' lengths or None. Gathers the windows and
    their pad mask and calls ``gated_pool``; returns (B, H, W, D_out)."""
    kw = dict(block_size=block_size, stride=stride, padding=padding, seqlens=seqlens)
    _, valid = window_index(x.shape[2], **kw)
    return gated_pool(gather_windows(x, **kw), gather_windows(z, **kw), bias, valid=valid, split=split,
                      stride=stride)
