"""The pooling kernels of mean_pool and weighted_pool (they differ only in
their weights: a_j = 1/L or weight[g, j]); docs/triton-perf.md gives the
measurements that chose them.

Per call (fixed length; packed batches the same with chunk rows):

- forward, one launch (``pool_fwd_kernel``): a program owns BLOCK_K chunk
  rows x BLOCK_D features (the D blocks of one tile launched side by side)
  and loads each of its tokens once, phase by phase
  (chunk q, phase r is position c*S + r of window q - c), adding
  a_{c*S+r} x[t] into C_PAD per-offset partial sums; a shift by c rows
  (``tl.gather``) then sums them into windows. A tile of BLOCK_K rows
  completes BLOCK_K - C + 1 windows (neighbouring tiles overlap by C - 1
  chunks, about 1 + C / BLOCK_K reads per token in all). pe's share
  sum_j a_j pe[h, j] is the same for every window of head h: each program
  computes it from pe (L x BLOCK_D values, L2 hits), so no x + pe is formed
  and no second kernel runs.
- backward, two launches: ``pool_bwd_kernel`` runs P programs per (b, h)
  row, each looping over the chunk-row tiles i_p, i_p + P, ... (P fills the
  GPU about twice, independent of the tile, so the autotuner may pick any
  tile); a tile is BLOCK_K chunks of S tokens, taken BLOCK_R phases per
  step as a 2-D block of token rows x BLOCK_D (one vectorised layout for x,
  dy and dx), all steps one loop that ``num_stages`` may prefetch; it
  writes dx once, and accumulates in registers, over all its steps, the
  partial weight gradient
  sum dy[q - c] . x[t] per window position and the partial column sums of
  dy (for pe), stored once per program. ``pool_bwd_kernel_finalize`` (one
  program per group and block of positions) sums the partials in a fixed
  order (deterministic, no atomics) and writes dweight and dpe in x's
  dtype, pe's shares included.

Both kinds' ``torch.library`` ops (``_custom_op.kernel_op``) share their
window inputs and fake output (``POOL_INPUTS``, ``pool_fake``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton.alloc import empty, empty_like
from ._triton.env import INTERPRET, num_sms
from ._triton.lang import chunk_rows
from ._triton.launch import (
    Direct,
    Launcher,
    cache_put,
    cdiv,
    interpret_block,
    jit_kernel,
    kernel_args,
    next_pow2,
    size_class,
    small_tiles_active,
    strides,
)
from ._triton.plan import WINDOW_INPUTS, SeqPlan, window_fake

__all__ = [
    "POOL_BWD_CONFIGS", "POOL_FWD_CONFIGS", "POOL_INPUTS", "bwd_programs", "pool_backward", "pool_bwd_kernel",
    "pool_bwd_kernel_finalize", "pool_bwd_launcher", "pool_fake", "pool_forward", "pool_fwd_kernel",
    "pool_fwd_launcher",
]

# the pools' op inputs after x, weight and pe (``_custom_op.kernel_op`` syntax)
POOL_INPUTS = WINDOW_INPUTS + ", SymInt total_windows"
# the CPU's answer of num_sms: tests then run programs that loop over several tiles
CPU_SMS = 2


def pool_fake(x, cu_seqlens, block_size, stride, padding, total_windows, **_):
    """The pools' fake output (B, H, W, D)."""
    return window_fake(x, x.shape[3], cu_seqlens=cu_seqlens, block_size=block_size, stride=stride,
                       padding=padding, total_windows=total_windows)


# --------------------------------------------------------------------------- forward


@jit_kernel
def pool_fwd_kernel(x, wt, pe, y, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                    sxb, sxh, sxt, sxd, syb, syh, syw, syd, swg, swl, sph, spj, spd, H, HG, D, C, WORK,
                    UNIT: tl.constexpr, HAS_PE: tl.constexpr, IS_VARLEN: tl.constexpr, C_PAD: tl.constexpr,
                    PE_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """y[w] = sum_j a_j (X_w[j] + pe[h, j]) for a tile of windows; a_j = 1/L
    (UNIT, mean_pool) or wt[g, j]. Grid (tiles x D blocks, 1, B*H).

    The tile's chunk rows are loaded once, phase by phase: chunk q, phase r
    (token t_base + r) is position c*S + r of window q - c, so
    acc[c, q] += a_{c*S+r} * x[t] for c < C; then y[q] = sum_c acc[c, q + c]
    (a shift by c rows: tl.gather). A tile of BLOCK_K rows completes its
    first BLOCK_K - C + 1 windows. A pad token contributes 0 (masked, never a
    zero weight times the token: 0 * NaN would leak a NaN into a window that
    lacks the token). pe's share, the same for every window of the head, is
    summed from pe PE_J positions at a time. WORK is only an autotuning key.

    Grid axis 0 is (tile, D block) with the D block fastest: the programs
    that read the two halves of one token row (BLOCK_D = 64 of D = 128) run
    side by side, so each DRAM page is opened once rather than once per half.
    """
    ND = tl.cdiv(D, BLOCK_D)
    i_td, i_bh = tl.program_id(0), tl.program_id(2)
    i_t, i_d = i_td // ND, i_td % ND
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    BW = BLOCK_K - C + 1                                   # windows completed per tile
    o_k = tl.arange(0, BLOCK_K)
    o_c = tl.arange(0, C_PAD)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BW + o_k, cu, ccu, cq, N, N_STEPS, T, W, NQ,
                                                           S, PRE, IS_VARLEN)
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh + o_d[None, :].to(tl.int64) * sxd   # [1, BLOCK_D]
    b_acc = tl.zeros([C_PAD, BLOCK_K, BLOCK_D], dtype=tl.float32)
    # STAGES > 1 software-pipelines the phase loads (more bytes in flight; an autotuning choice)
    for r in tl.range(0, S, num_stages=STAGES):
        t = t_base + r                                                                # [BLOCK_K]
        m_t = m_q & (t >= bos) & (t < eos)
        b_x = tl.load(p_x + t[:, None] * sxt, mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
        o_j = o_c * S + r                                                             # [C_PAD] window position
        m_j = (o_c < C) & (o_j < L)
        if UNIT:
            b_a = tl.where(m_j, 1.0, 0.0)
        else:
            b_a = tl.load(wt + i_g.to(tl.int64) * swg + o_j * swl, mask=m_j, other=0.).to(tl.float32)
        b_acc += tl.where(m_j[:, None, None], b_a[:, None, None] * b_x[None, :, :], 0.)  # [C_PAD, BLOCK_K, BLOCK_D]
    o_src = o_c[:, None, None] * BLOCK_K + tl.minimum(o_k[None, :, None] + o_c[:, None, None], BLOCK_K - 1) \
        + 0 * o_d[None, None, :]                                                      # [C_PAD, BLOCK_K, BLOCK_D]
    b_sh = tl.gather(tl.reshape(b_acc, (C_PAD * BLOCK_K, BLOCK_D)), tl.reshape(o_src, (C_PAD * BLOCK_K, BLOCK_D)), 0)
    b_y = tl.sum(tl.reshape(b_sh, (C_PAD, BLOCK_K, BLOCK_D)), axis=0)                 # [BLOCK_K, BLOCK_D]
    if HAS_PE:
        b_c = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, L, PE_J):
            o_pj = j0 + tl.arange(0, PE_J)
            m_pj = o_pj < L
            b_pe = tl.load(pe + i_h.to(tl.int64) * sph + o_pj[:, None] * spj + o_d[None, :] * spd,
                           mask=m_pj[:, None] & m_d[None, :], other=0.).to(tl.float32)  # [PE_J, BLOCK_D]
            if UNIT:
                b_c += tl.sum(b_pe, axis=0)
            else:
                b_pa = tl.load(wt + i_g.to(tl.int64) * swg + o_pj * swl, mask=m_pj, other=0.).to(tl.float32)
                b_c += tl.sum(b_pa[:, None] * b_pe, axis=0)
        b_y += b_c[None, :]
    if UNIT:
        b_y = b_y / L
    m_y = m_q & (o_k < BW) & (q < n_win)
    p_y = y + i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh + (win_base + q)[:, None] * syw \
        + o_d[None, :].to(tl.int64) * syd
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_y[:, None] & m_d[None, :])


# (BLOCK_K, BLOCK_D, warps, stages): sized for D = 128, C = 2 (L = 32, S = 16) and smaller
POOL_FWD_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd, "STAGES": st}, num_warps=nw)
                    for bk, bd, nw, st in [(64, 64, 4, 1), (64, 64, 4, 3), (64, 128, 8, 1), (32, 128, 4, 3),
                                           (128, 64, 8, 1), (32, 64, 4, 1), (16, 64, 4, 1), (16, 32, 4, 1),
                                           # run 11: more bytes in flight per SM (stages, 8 warps)
                                           (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (32, 128, 4, 2),
                                           (64, 64, 8, 2), (128, 32, 4, 1)]]
POOL_FWD_KEY = ["D", "C_PAD", "WORK", "UNIT", "HAS_PE", "IS_VARLEN"]


def _pool_fwd_prune(configs, kw):
    """Tiles whose C_PAD partial sums fit 16384 float32 registers per program
    and complete at least half their rows (BLOCK_K >= 2 C_PAD), BLOCK_D <=
    max(32, next_pow2(D)); when C is so large (S << L) that none does, one
    tile built to fit."""
    C_PAD, D = kw["C_PAD"], kw["D"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] >= 2 * C_PAD
            and C_PAD * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_D"] <= 16384
            and c.kwargs["BLOCK_D"] <= max(32, next_pow2(D))]
    if not kept:
        rows = 2 * C_PAD
        kept = [triton.Config({"BLOCK_K": rows, "BLOCK_D": max(8, next_pow2(16384 // (C_PAD * rows) + 1) // 2),
                               "STAGES": 1}, num_warps=4)]
    return kept


def _pool_fwd_interpret_meta(kw):
    rows = max(8, 2 * kw["C_PAD"])
    return {"BLOCK_K": rows if small_tiles_active() else max(rows, 32), "BLOCK_D": interpret_block(kw["D"], 64),
            "STAGES": 1}


def pool_fwd_launcher() -> Launcher:
    """A Launcher of ``pool_fwd_kernel`` (one per kind, each with its own autotuning cache)."""
    return Launcher(pool_fwd_kernel, configs=POOL_FWD_CONFIGS, key=POOL_FWD_KEY,
                    interpret_meta=_pool_fwd_interpret_meta, prune=_pool_fwd_prune)


def pool_forward(launcher: Launcher, x: torch.Tensor, weight: torch.Tensor | None, pe: torch.Tensor | None,
                 plan: SeqPlan) -> torch.Tensor:
    """One launch: y (B, H, W, D) in x's dtype, contiguous. weight (G, L) or
    None (mean_pool); pe (H, L, D) or None."""
    B, H, T, D = x.shape
    y = empty((B, H, plan.W, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    key = (x.shape, x.stride(), None if weight is None else (weight.shape, weight.stride()),
           None if pe is None else (pe.shape, pe.stride()), plan.varlen, *plan.seq_args()[3:])
    launch = _FWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_FWD_LAUNCH, key, _fwd_launch(x, weight, pe, y, plan))
    ints, grid, constexprs = launch
    launcher(grid, x, weight if weight is not None else x, pe if pe is not None else x, y, plan.cu, plan.ccu, plan.cq,
             *ints, **constexprs)
    return y


# The launches' arguments after their tensors, their grid and constexprs depend only on shapes, strides and
# the plan's sizes: built once per key (``_fwd_launch``, ``_bwd_launch``) instead of ~40 named arguments a
# call (host time, issue 14 item 2). Each kernel takes its tensors first, in this order.
assert pool_fwd_kernel.runtime_args[:7] == ("x", "wt", "pe", "y", "cu", "ccu", "cq")
_FWD_LAUNCH: dict[tuple, tuple] = {}

def _fwd_launch(x, weight, pe, y, plan):
    """(integer arguments, grid, constexprs) of pool_forward's launch."""
    B, H, T, D = x.shape
    G = 1 if weight is None else weight.shape[0]
    rows = plan.NQ if plan.varlen else plan.W    # packed: every chunk row may start a window
    C = plan.C

    def grid(meta):    # axis 0: (tile, D block), D block fastest (see pool_fwd_kernel)
        return (cdiv(rows, meta["BLOCK_K"] - C + 1) * cdiv(D, meta["BLOCK_D"]), 1, B * H)
    args = kernel_args(pool_fwd_kernel, x=x, wt=weight if weight is not None else x, pe=pe if pe is not None else x,
                       y=y, **plan.seq_kwargs(), **strides("sx", x, "bhtd"), **strides("sy", y, "bhwd"),
                       **strides("sw", weight, "gl"), **strides("sp", pe, "hjd"), H=H, HG=H // G, D=D, C=plan.C,
                       WORK=size_class(B * H * rows))
    return args[7:], grid, dict(UNIT=weight is None, HAS_PE=pe is not None, IS_VARLEN=plan.varlen,
                                C_PAD=plan.C_PAD, PE_J=min(16, next_pow2(plan.L)))


# --------------------------------------------------------------------------- backward


@triton.jit
def _pool_bwd_window(c, b_dx, b_pw, b_x, p_dy, wt, q, o_r, n_win, win_base, m_q, o_d, m_d, o_c, o_rb, i_r, i_g,
                     sdw, sdd, swg, swl, S, L, C,
                     UNIT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One window offset c of pool_bwd_kernel's step: the rows' window q - c,
    position j = c*S + r. Returns the updated (dx block, pw partials)."""
    q_w = q - c                                                                       # [ROWS]
    o_j = c * S + o_r
    m_w = m_q & (o_r < S) & (o_j < L) & (q_w >= 0) & (q_w < n_win) & ((q * 0 + c) < C)
    b_dy = tl.load(p_dy + (win_base + q_w)[:, None] * sdw + o_d[None, :].to(tl.int64) * sdd,
                   mask=m_w[:, None] & m_d[None, :], other=0.).to(tl.float32)         # [ROWS, BLOCK_D]
    if NEED_DX:
        if UNIT:
            b_dx += b_dy
        else:
            b_a = tl.load(wt + i_g.to(tl.int64) * swg + o_j * swl, mask=m_w, other=0.).to(tl.float32)
            b_dx += b_a[:, None] * b_dy
    if NEED_DW:
        b_s = tl.sum(b_x.to(tl.float32) * b_dy, axis=1)                               # [ROWS]
        b_s = tl.sum(tl.reshape(b_s, (BLOCK_K, BLOCK_R)), axis=0)                     # [BLOCK_R] per phase
        b_pw += tl.where((o_c[:, None, None] == c) & (o_rb[None, :, None] == i_r), b_s[None, None, :], 0.)
    return b_dx, b_pw


@jit_kernel
def pool_bwd_kernel(dy, x, wt, dx, pw, pcs, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                    sdb, sdh, sdw, sdd, sxb, sxh, sxt, sxd, sgb, sgh, sgt, sgd, swg, swl,
                    H, HG, D, C, P, WORK,
                    UNIT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_CS: tl.constexpr,
                    IS_VARLEN: tl.constexpr, S_PAD: tl.constexpr, C_PAD: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """Grid (P, B*H): program i_p of row (b, h) takes the chunk-row tiles
    i_p, i_p + P, ... of every D block.

    Token t = chunk q, phase r is position j = c*S + r of window q - c, so
    dx[t] = sum_c a_j dy[q - c] over the windows that exist (gathered: each
    token written once, zero when no window holds it; no atomics). A tile is
    BLOCK_K chunks x S phases, taken BLOCK_R phases per step as one 2-D
    block of BLOCK_K * BLOCK_R token rows (row i: chunk i // BLOCK_R, phase
    i % BLOCK_R) x BLOCK_D features: every per-row quantity (window, weight,
    mask) is a vector along the rows, so x, dy's rows and dx share one
    vectorised layout (a [phase, chunk, feature] block made the compiler
    shuffle dx through shared memory). dy's rows are loaded per row
    (BLOCK_R rows share one: L1 hits). The steps of all the program's tiles
    are one loop, with the C_PAD window offsets unrolled when C_PAD <= 8, so
    STAGES > 1 can prefetch the next step's x and dy (more bytes in flight;
    an autotuning choice). Masks include j < L: no product pairs a token with
    a window that lacks it (a NaN cannot leak).

    Partials kept in registers over all steps, stored once at the end:
    NEED_DW: pw[b*H + h, i_p, j] = sum of dy[q - c] . x[t] (the share of
    dL/da_j); NEED_CS: pcs[b*H + h, i_p, d] = the column sums of dy over the
    windows q (chunk rows at c = 0), for pe's gradients.
    pool_bwd_kernel_finalize sums them.
    """
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_i = tl.arange(0, BLOCK_K * BLOCK_R)
    i_k, i_rr = o_i // BLOCK_R, o_i % BLOCK_R                  # [ROWS] chunk in tile, phase in block
    o_k = tl.arange(0, BLOCK_K)
    o_rb = tl.arange(0, S_PAD // BLOCK_R)                      # phase blocks per chunk (padded)
    o_c = tl.arange(0, C_PAD)
    n_tiles = tl.cdiv(NQ, BLOCK_K)
    NR = tl.cdiv(S, BLOCK_R)                                   # steps per tile
    n_steps = tl.cdiv(tl.maximum(n_tiles - i_p, 0), P) * NR
    p_dy = dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    p_dx = dx + i_b.to(tl.int64) * sgb + i_h.to(tl.int64) * sgh
    b_pw = tl.zeros([C_PAD, S_PAD // BLOCK_R, BLOCK_R], dtype=tl.float32)   # [c, phase block, phase in block]
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_cs = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for it in tl.range(0, n_steps, num_stages=STAGES):
            i_t = i_p + (it // NR) * P
            i_r = it % NR
            t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BLOCK_K + i_k, cu, ccu, cq, N, N_STEPS, T,
                                                                   W, NQ, S, PRE, IS_VARLEN)   # [ROWS]
            o_r = i_r * BLOCK_R + i_rr                                                # [ROWS] phase
            t = t_base + o_r
            m_t = (o_r < S) & m_q & (t >= bos) & (t < eos)
            b_x = tl.zeros([BLOCK_K * BLOCK_R, BLOCK_D], dtype=x.dtype.element_ty)
            if NEED_DW:   # in x's dtype, widened where used
                b_x = tl.load(p_x + t[:, None] * sxt + o_d[None, :].to(tl.int64) * sxd,
                              mask=m_t[:, None] & m_d[None, :], other=0.)              # [ROWS, BLOCK_D]
            b_dx = tl.zeros([BLOCK_K * BLOCK_R, BLOCK_D], dtype=tl.float32)
            if C_PAD <= 8:
                for c in tl.static_range(C_PAD):
                    b_dx, b_pw = _pool_bwd_window(c, b_dx, b_pw, b_x, p_dy, wt, q, o_r, n_win, win_base, m_q, o_d,
                                                  m_d, o_c, o_rb, i_r, i_g, sdw, sdd, swg, swl, S, L, C,
                                                  UNIT, NEED_DX, NEED_DW, BLOCK_K, BLOCK_R)
            else:
                for c in range(0, C):
                    b_dx, b_pw = _pool_bwd_window(c, b_dx, b_pw, b_x, p_dy, wt, q, o_r, n_win, win_base, m_q, o_d,
                                                  m_d, o_c, o_rb, i_r, i_g, sdw, sdd, swg, swl, S, L, C,
                                                  UNIT, NEED_DX, NEED_DW, BLOCK_K, BLOCK_R)
            if NEED_DX:
                if UNIT:
                    b_dx = b_dx / L
                tl.store(p_dx + t[:, None] * sgt + o_d[None, :].to(tl.int64) * sgd,
                         b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
            if NEED_CS:   # each window is chunk row q (c = 0) of exactly one tile: its rows, at the first step
                q0 = i_t * BLOCK_K + o_k
                _, _, _, q0, n_win0, win_base0, m_q0 = chunk_rows(q0, cu, ccu, cq, N, N_STEPS, T, W, NQ, S, PRE,
                                                                  IS_VARLEN)
                m_w0 = m_q0 & (q0 < n_win0) & ((q0 * 0 + i_r) == 0)
                b_cs += tl.load(p_dy + (win_base0 + q0)[:, None] * sdw + o_d[None, :].to(tl.int64) * sdd,
                                mask=m_w0[:, None] & m_d[None, :], other=0.).to(tl.float32)   # [BLOCK_K, BLOCK_D]
        if NEED_CS:
            tl.store(pcs + (i_bh.to(tl.int64) * P + i_p) * D + o_d, tl.sum(b_cs, axis=0), mask=m_d)
    if NEED_DW:
        o_r3 = o_rb[None, :, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, None, :]   # [1, S_PAD // BLOCK_R, BLOCK_R]
        o_j3 = o_c[:, None, None] * S + o_r3                                          # [C_PAD, ., BLOCK_R]
        tl.store(pw + (i_bh.to(tl.int64) * P + i_p) * L + o_j3, b_pw,
                 mask=(o_c[:, None, None] < C) & (o_r3 < S) & (o_j3 < L))


@jit_kernel
def pool_bwd_kernel_finalize(pw, pcs, wt, pe, dw, dpe, B, H, HG, L, D, P,
                             swg, swl, sph, spj, spd,
                             UNIT: tl.constexpr, NEED_W: tl.constexpr, NEED_PE: tl.constexpr, NEED_CS: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (G, position blocks): sums the per-program partials of
    pool_bwd_kernel in a fixed order (deterministic) for the heads of group
    g and positions j of the block:

    colsum[h] = sum over (b, program) of pcs;
    dpe[h, j] = a_j colsum[h] (NEED_PE);
    dw[g, j] = sum over heads h of g, (b, program) of pw + colsum[h] . pe[h, j]
    (NEED_W; the pe term when NEED_CS). dw, dpe in their dtype, contiguous.
    """
    i_g, i_j = tl.program_id(0), tl.program_id(1)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_j = o_j < L
    o_rr = tl.arange(0, BLOCK_R)
    b_w = tl.zeros([BLOCK_J], dtype=tl.float32)
    if UNIT:
        b_a = tl.where(m_j, 1.0 / L, 0.)
    else:
        b_a = tl.load(wt + i_g.to(tl.int64) * swg + o_j * swl, mask=m_j, other=0.).to(tl.float32)   # [BLOCK_J]
    for hh in range(0, HG):
        i_h = i_g * HG + hh
        if NEED_W:
            for i_b in range(0, B):
                p_row = pw + ((i_b * H + i_h).to(tl.int64) * P) * L
                for r0 in range(0, P, BLOCK_R):
                    o_r = r0 + o_rr
                    b_w += tl.sum(tl.load(p_row + o_r[:, None] * L + o_j[None, :],
                                          mask=(o_r < P)[:, None] & m_j[None, :], other=0.), axis=0)
        if NEED_CS:
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < D
                b_cs = tl.zeros([BLOCK_D], dtype=tl.float32)
                for i_b in range(0, B):
                    p_row = pcs + ((i_b * H + i_h).to(tl.int64) * P) * D
                    for r0 in range(0, P, BLOCK_R):
                        o_r = r0 + o_rr
                        b_cs += tl.sum(tl.load(p_row + o_r[:, None] * D + o_d[None, :],
                                               mask=(o_r < P)[:, None] & m_d[None, :], other=0.), axis=0)
                if NEED_PE:
                    tl.store(dpe + (i_h.to(tl.int64) * L + o_j[:, None]) * D + o_d[None, :],
                             (b_a[:, None] * b_cs[None, :]).to(dpe.dtype.element_ty),
                             mask=m_j[:, None] & m_d[None, :])
                if NEED_W:
                    b_pe = tl.load(pe + i_h.to(tl.int64) * sph + o_j[:, None] * spj + o_d[None, :] * spd,
                                   mask=m_j[:, None] & m_d[None, :], other=0.).to(tl.float32)   # [BLOCK_J, BLOCK_D]
                    b_w += tl.sum(b_pe * b_cs[None, :], axis=1)
    if NEED_W:
        tl.store(dw + i_g.to(tl.int64) * L + o_j, b_w.to(dw.dtype.element_ty), mask=m_j)


# (BLOCK_R, BLOCK_K, BLOCK_D, warps, stages); the pruning fits BLOCK_R to S and keeps the blocks in budget
POOL_BWD_CONFIGS = [triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "BLOCK_D": bd, "STAGES": st}, num_warps=nw)
                    for br, bk, bd, nw, st in [(4, 4, 128, 4, 1), (4, 4, 128, 4, 3), (4, 8, 128, 4, 1),
                                               (4, 8, 128, 4, 2), (4, 8, 64, 4, 1), (8, 8, 128, 8, 1),
                                               (8, 8, 128, 8, 2), (8, 8, 128, 4, 1), (16, 8, 128, 8, 1),
                                               (1, 64, 64, 4, 1), (2, 32, 64, 4, 1),
                                               # run 11: deeper pipelines (others tried spill, compile-only)
                                               (4, 4, 128, 4, 2), (8, 8, 128, 4, 2)]]
POOL_BWD_KEY = ["D", "L", "S_PAD", "WORK", "UNIT", "NEED_DX", "NEED_DW", "NEED_CS", "IS_VARLEN"]


def _pool_bwd_prune(configs, kw):
    """BLOCK_R <= S_PAD (and >= 4 when S allows: fewer, longer row segments),
    BLOCK_D <= next_pow2(D) (>= 16); a float32 block of BLOCK_K * BLOCK_R x
    BLOCK_D elements of 16 to 32 per thread when x is loaded too (NEED_DW: x's,
    dy's and dx's blocks are live together; 64 reaches 255 registers on
    sm_90), else 32 to 64; half that for float32 input; duplicates dropped;
    when none is left, one small tile (scripts/gpu_perf.py --compile-only
    checks them all for spills)."""
    S_PAD, D = kw["S_PAD"], kw["D"]
    lo, hi = (16, 32) if kw["NEED_DW"] else (32, 64)
    if kw["x"].element_size() == 4:     # float32 blocks take twice the registers
        lo, hi = (8, 16) if kw["NEED_DW"] else (16, 16)
    out, seen = [], set()
    for c in configs:
        br = min(c.kwargs["BLOCK_R"], S_PAD)
        bk, bd = c.kwargs["BLOCK_K"], min(c.kwargs["BLOCK_D"], max(16, next_pow2(D)))
        per_thread = br * bk * bd // (32 * c.num_warps)
        if br < min(4, S_PAD) or not lo <= per_thread <= hi:
            continue
        key = (br, bk, bd, c.kwargs["STAGES"], c.num_warps)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "BLOCK_D": bd, "STAGES": c.kwargs["STAGES"]},
                                     num_warps=c.num_warps))
    return out or [triton.Config({"BLOCK_R": min(4, S_PAD), "BLOCK_K": 4, "BLOCK_D": 32, "STAGES": 1}, num_warps=4)]


def _pool_bwd_interpret_meta(kw):
    small = small_tiles_active()
    return {"BLOCK_R": min(kw["S_PAD"], 2 if small else 16), "BLOCK_K": interpret_block(kw["NQ"], 8, small=2),
            "BLOCK_D": interpret_block(kw["D"], 64), "STAGES": 1}


def pool_bwd_launcher() -> Launcher:
    """A Launcher of ``pool_bwd_kernel`` (one per kind)."""
    return Launcher(pool_bwd_kernel, configs=POOL_BWD_CONFIGS, key=POOL_BWD_KEY,
                    interpret_meta=_pool_bwd_interpret_meta, prune=_pool_bwd_prune)


def bwd_programs(plan: SeqPlan, device: torch.device) -> int:
    """P, programs per (b, h) row of pool_bwd_kernel: about two per SM over
    all rows, at most one per two chunk rows. Independent of the tile, so
    the partial buffers' layout is known before autotuning picks one."""
    return max(1, min(cdiv(plan.NQ, 2), cdiv(2 * num_sms(device, cpu=CPU_SMS), max(plan.B * plan.H, 1))))


def pool_backward(launcher: Launcher, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                     pe: torch.Tensor | None, plan: SeqPlan, need_x: bool, need_w: bool, need_pe: bool):
    """Gradients (dx, dweight, dpe) of a pooling kind in at most two launches;
    an empty (0,) tensor for each one not needed (custom op outputs may not
    alias). weight None: mean_pool."""
    B, H, T, D = x.shape
    L = plan.L
    G = 1 if weight is None else weight.shape[0]
    need_w = need_w and weight is not None
    need_pe = need_pe and pe is not None
    need_cs = pe is not None and (need_pe or need_w)
    dx = empty_like(x) if need_x else x.new_empty(0)
    dw = empty((G, L), dtype=x.dtype, device=x.device) if need_w else x.new_empty(0)
    dpe = empty((H, L, D), dtype=x.dtype, device=x.device) if need_pe else x.new_empty(0)
    if B * H * T * D == 0:     # no token: every gradient is zero (dx, if any, has no element)
        dw.zero_()
        dpe.zero_()
        return dx, dw, dpe
    P = bwd_programs(plan, x.device)
    pw = empty((B * H * P * L,), dtype=torch.float32, device=x.device) if need_w else x
    pcs = empty((B * H * P * D,), dtype=torch.float32, device=x.device) if need_cs else x
    key = (x.shape, x.stride(), dy.stride(), dx.stride() if need_x else None,
           None if weight is None else (weight.shape, weight.stride()), None if pe is None else (pe.shape, pe.stride()),
           plan.varlen, *plan.seq_args()[3:], need_x, need_w, need_pe, P)
    launch = _BWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_BWD_LAUNCH, key, _bwd_launch(dy, x, weight, pe, dx, pw, pcs, plan, P, need_x, need_w,
                                                          need_pe, need_cs))
    (ints, grid, constexprs), fin = launch
    wt = weight if weight is not None else x
    if ints is not None:
        launcher(grid, dy, x, wt, dx if need_x else x, pw, pcs, plan.cu, plan.ccu, plan.cq, *ints, **constexprs)
    ints, grid, constexprs = fin
    if ints is not None:
        _FINALIZE(grid, pw, pcs, wt, pe if pe is not None else x, dw if need_w else x, dpe if need_pe else x, *ints,
                  **constexprs)
    return dx, dw, dpe


assert pool_bwd_kernel.runtime_args[:9] == ("dy", "x", "wt", "dx", "pw", "pcs", "cu", "ccu", "cq")
assert pool_bwd_kernel_finalize.runtime_args[:6] == ("pw", "pcs", "wt", "pe", "dw", "dpe")
_BWD_LAUNCH: dict[tuple, tuple] = {}
_FINALIZE = Direct(pool_bwd_kernel_finalize)      # no autotuning: the direct launch, no JITFunction.run a backward


def _bwd_launch(dy, x, weight, pe, dx, pw, pcs, plan, P, need_x, need_w, need_pe, need_cs):
    """((integer arguments, grid, constexprs) of pool_bwd_kernel's launch, the
    finalize's (the same, grid a tuple)) of pool_backward: integer arguments
    None for a launch that does not run."""
    B, H, T, D = x.shape
    L = plan.L
    G = 1 if weight is None else weight.shape[0]
    HG = H // G
    wt = weight if weight is not None else x
    main = fin = (None, None, None)
    if need_x or need_w or need_cs:
        args = kernel_args(pool_bwd_kernel, dy=dy, x=x, wt=wt, dx=dx if need_x else x, pw=pw, pcs=pcs,
                           **plan.seq_kwargs(), **strides("sd", dy, "bhwd"), **strides("sx", x, "bhtd"),
                           **strides("sg", dx if need_x else x, "bhtd"), **strides("sw", weight, "gl"), H=H, HG=HG,
                           D=D, C=plan.C, P=P, WORK=size_class(B * H * plan.NQ))
        main = (args[9:], lambda meta: (P, B * H),
                dict(UNIT=weight is None, NEED_DX=need_x, NEED_DW=need_w, NEED_CS=need_cs, IS_VARLEN=plan.varlen,
                     S_PAD=next_pow2(plan.S), C_PAD=plan.C_PAD))
    if need_w or need_pe:
        BJ = min(next_pow2(L), 64)
        BD = min(max(16, next_pow2(D)), 128 if not INTERPRET else 64)
        args = kernel_args(pool_bwd_kernel_finalize, pw=pw, pcs=pcs, wt=wt, pe=pe if pe is not None else x, dw=x,
                           dpe=x, B=B, H=H, HG=HG, L=L, D=D, P=P, **strides("sw", weight, "gl"),
                           **strides("sp", pe, "hjd"))
        fin = (args[6:], (G, cdiv(L, BJ)),
               dict(UNIT=weight is None, NEED_W=need_w, NEED_PE=need_pe, NEED_CS=need_cs,
                    BLOCK_R=16 if INTERPRET else 32, BLOCK_J=BJ, BLOCK_D=BD))
    return main, fin
