"""Device-side helpers (``@triton.jit``) the kernels call; fla naming: ``i_``
program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values.

- ``search_sorted``: per-row binary search in an offsets array.
- ``window_rows``: for window ids, the token of window position 0 and the
  first token of the window's sequence (left-pad positions lie before it).
- ``window_gemm``: the implicit GEMM of a tile of windows (linear's forward,
  mlp's first layer).
- ``chunk_rows``: the "chunk" rows every gather-style kernel tiles over: each
  sequence, left-padded, is cut into chunks of S tokens, so chunk q holds
  position j = c*S + r of window q - c (c = 0 .. C-1, C = ceil(L/S)).
- ``round_tf32``: float32 rounded to tf32, the same on a GPU and in the
  interpreter.

Index arithmetic that multiplies a row by a stride is done in int64, so
tensors past 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["chunk_rows", "round_tf32", "search_sorted", "window_gemm", "window_rows"]


@triton.jit
def search_sorted(p_off, n, o, N_STEPS):
    """Per element of ``o``: the largest i in [0, n) with off[i] <= o, for
    non-decreasing off (n+1 entries) and off[0] <= o < off[n]. Repeated
    offsets (empty sequences) are skipped: the answer is a non-empty segment.
    Runs ceil(log2 n) steps; every load stays inside off."""
    lo = tl.zeros_like(o)
    hi = tl.zeros_like(o) + n
    for _ in range(N_STEPS):
        active = hi - lo > 1
        mid = (lo + hi) // 2
        v = tl.load(p_off + mid)
        up = active & (v <= o)
        lo = tl.where(up, mid, lo)
        hi = tl.where(active & ~up, mid, hi)
    return lo


@triton.jit
def window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN: tl.constexpr):
    """Windows ``o_w`` [BLOCK] (row ids in one (b, h) row, or packed ids) ->
    (t0, bos, m): t0 int64 token of window position 0 (t0 + j < bos is a
    left-pad token), bos int64 first token of the window's sequence, m
    whether the window exists. Window positions never reach past their
    sequence's end."""
    m = o_w < W
    if IS_VARLEN:
        o = tl.where(m, o_w, 0).to(tl.int64)
        i_n = search_sorted(ccu, N, o, N_STEPS)
        bos = tl.load(cu + i_n).to(tl.int64)
        t0 = bos - PRE + (o - tl.load(ccu + i_n)) * S
    else:
        bos = tl.zeros_like(o_w).to(tl.int64)
        t0 = o_w.to(tl.int64) * S - PRE
    return t0, bos, m


@triton.jit
def window_gemm(acc, p_rows, t0, bos, m_w, sxt, sxd, p_cols, swj, swd, m_cols, L, D,
                BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """The implicit GEMM of a tile of windows: acc + sum over window
    positions j < L and D blocks of X_j [BLOCK_W, BLOCK_D] @ B_j [BLOCK_D,
    BLOCK_N], in float32 (linear's forward; mlp's first layer).

    X_j's rows are the tokens t0 + j (``window_rows``) at ``p_rows`` (a
    scalar or [BLOCK_W, 1] pointer: one (b, h) row or one per window), left
    pad tokens (t < bos) and missing windows (~m_w) masked to 0. B_j's
    element (d, n) is at p_cols + j * swj + d * swd, ``p_cols`` a [1,
    BLOCK_N] pointer holding the column offsets, columns ~m_cols masked.
    Positions j and j + S read the same rows shifted by one window, so x
    comes from device memory about once, the re-read from L2."""
    o_d = tl.arange(0, BLOCK_D)
    ND = tl.cdiv(D, BLOCK_D)
    for it in range(0, L * ND):
        j = it // ND
        o_dd = (it - j * ND) * BLOCK_D + o_d                                              # [BLOCK_D]
        m_dd = o_dd < D
        t = t0 + j
        m_t = m_w & (t >= bos)
        b_x = tl.load(p_rows + t[:, None] * sxt + o_dd[None, :] * sxd, mask=m_t[:, None] & m_dd[None, :],
                      other=0.)                                                           # [BLOCK_W, BLOCK_D]
        b_b = tl.load(p_cols + j * swj + o_dd[:, None] * swd, mask=m_dd[:, None] & m_cols[None, :],
                      other=0.)                                                           # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            b_x, b_b = b_x.to(tl.float32), b_b.to(tl.float32)
        acc = tl.dot(b_x, b_b, acc, input_precision="ieee")
    return acc


@triton.jit
def chunk_rows(o_q, cu, ccu, cq, N, N_STEPS, T, W, NQ, S, PRE, IS_VARLEN: tl.constexpr):
    """Chunk rows ``o_q`` [BLOCK] -> (t_base, bos, eos, q, n_win, win_base, m).

    A sequence [bos, eos), preceded by PRE pad tokens, is cut into chunks of
    S tokens; chunk q starts at token t_base = bos - PRE + q*S (chunk q, phase
    r is token t_base + r, real if bos <= t < eos). Window i of the sequence
    is chunks i .. i+C-1, so chunk q holds position c*S + r of window q - c.
    The sequence has n_win windows; its window i is output row win_base + i.
    m: the row exists. All int64 except m.
    """
    if IS_VARLEN:
        m = o_q < tl.load(cq + N)
        o = tl.where(m, o_q, 0).to(tl.int64)
        i_n = search_sorted(cq, N, o, N_STEPS)
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        q = o - tl.load(cq + i_n)
        win_base = tl.load(ccu + i_n)
        n_win = tl.load(ccu + i_n + 1) - win_base
    else:
        m = o_q < NQ
        q = o_q.to(tl.int64)
        bos = tl.zeros_like(q)
        eos = bos + T
        win_base = bos
        n_win = bos + W
    t_base = bos - PRE + q * S
    return t_base, bos, eos, q, n_win, win_base, m


@triton.jit
def round_tf32(v):
    """float32 v rounded to tf32 (10 mantissa bits; to nearest, ties away from
    zero), kept as float32: the same value on a GPU and in the interpreter,
    and exact when a tensor core converts it to tf32. inf stays inf, NaN
    stays NaN (the bit trick alone would turn 0x7FFFFFFF, CUDA's NaN, into
    -0.0 by overflow; hence the where), the largest finite floats round to inf."""
    u = v.to(tl.uint32, bitcast=True)
    r = ((u + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(v == v, r, v)
