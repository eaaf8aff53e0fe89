"""linear, Triton: the per-window linear map (NSA eq. 7) as an implicit GEMM
over windows; its x-gradient by gathering over chunk rows; its weight
gradient as a split-K GEMM with per-split partials (docs/triton.md).
Registered as backend "triton" (CUDA; CPU tensors too under
TRITON_INTERPRET=1, never picked by "auto" there).

pe is folded in L x H small programs whose partials the forward's epilogue
sums; the x-gradient loads the window rows of dy once per tile for all S
phases (K = C * D_out) and takes the column sums of dy on the way, so that
one small ``finalize`` kernel gives bias, pe and the weight gradient's pe
term (float32 input, and C * D_out > 512, take the gathering x-gradient
kernel and torch's column sums instead); eager calls run the
autograd.Function without the custom op's dispatch (docs/triton-perf.md
has the measurements that chose this design over the first one).

The op is ``torch.ops.kvcompress.linear_triton`` (fake implementation and
autograd registered, ``_custom_op.kernel_op``), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node.

The x- and weight-gradient launchers (``x_grad``, ``weight_grad``, with
``dx_launcher``, ``dw_launcher``, ``dx_phase_per``, ``_splits``) are shared
with mlp, whose first layer's gradients are linear's with F as D_out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...backends import register
from .._custom_op import kernel_op
from .._triton.alloc import empty, empty_like
from .._triton.env import DEVICES, DTYPES, INTERPRET, dot_f32, num_sms, supports_call, triton_available
from .._triton.lang import chunk_rows, window_gemm, window_rows
from .._triton.launch import (
    Direct,
    Launcher,
    cache_put,
    cdiv,
    fill_factor,
    interpret_block,
    jit_kernel,
    kernel_args,
    next_pow2,
    size_class,
    strides,
    tile_configs,
)
from .._triton.plan import WINDOW_INPUTS, WINDOW_SAVED, backward_plan, seq_plan, total_windows_arg, window_fake

# the CPU's answer of num_sms (the interpreter): small problems there spread phases and split windows as on a GPU
CPU_SMS = 2


@jit_kernel
def linear_bwd_kernel_dx(dy, w, dx, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                         sdb, sdh, sdw, sdn, swg, swl, swd, swn, sgb, sgh, sgt, sgd,
                         H, HG, D, DO, C, R_PER, WORK,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         IS_VARLEN: tl.constexpr, DOT_F32: tl.constexpr):
    """dx[t] = sum over windows q - c holding token t (chunk q, phase r) at
    position j = c*S + r of dy[q - c] @ w[g, j]^T: gathered, no atomics; every
    token row is written once (zero if no window holds it).
    Grid (chunk-row tiles, D blocks x phase groups, B*H); per phase r, a GEMM
    with K = C * D_out over the tile's BLOCK_K chunk rows. A program takes
    the R_PER phases [i_r * R_PER, (i_r + 1) * R_PER) (``dx_phase_per``:
    phases are independent rows, so small problems spread them over
    programs).
    """
    i_t, i_dr, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ND = tl.cdiv(D, BLOCK_D)
    i_d, i_r = i_dr % ND, i_dr // ND
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_k = tl.arange(0, BLOCK_K)
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BLOCK_K + o_k, cu, ccu, cq, N, N_STEPS, T, W, NQ,
                                                           S, PRE, IS_VARLEN)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n = tl.arange(0, BLOCK_N)
    p_dy = dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh
    p_w = w + i_g.to(tl.int64) * swg + o_d[None, :] * swd                                 # [1, BLOCK_D]
    p_dx = dx + i_b.to(tl.int64) * sgb + i_h.to(tl.int64) * sgh + o_d[None, :].to(tl.int64) * sgd
    NN = tl.cdiv(DO, BLOCK_N)
    for r in range(i_r * R_PER, tl.minimum(S, (i_r + 1) * R_PER)):
        b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        # phase r is position c*S + r < L of the window c chunks back: cdiv(L - r, S) of them
        for it in range(0, tl.cdiv(L - r, S) * NN):
            c = it // NN
            o_nn = (it - c * NN) * BLOCK_N + o_n                                          # [BLOCK_N]
            m_nn = o_nn < DO
            j = c * S + r
            q_w = q - c                                                                   # window holding t at j
            m_win = m_q & (q_w >= 0) & (q_w < n_win)
            b_dy = tl.load(p_dy + (win_base + q_w)[:, None] * sdw + o_nn[None, :] * sdn,
                           mask=m_win[:, None] & m_nn[None, :], other=0.)                 # [BLOCK_K, BLOCK_N]
            b_wt = tl.load(p_w + j * swl + o_nn[:, None] * swn, mask=m_nn[:, None] & m_d[None, :],
                           other=0.)                                                      # [BLOCK_N, BLOCK_D]
            if DOT_F32:
                b_dy, b_wt = b_dy.to(tl.float32), b_wt.to(tl.float32)
            b_acc = tl.dot(b_dy, b_wt, b_acc, input_precision="ieee")
        t = t_base + r
        m_t = m_q & (t >= bos) & (t < eos)
        tl.store(p_dx + t[:, None] * sgt, b_acc.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@jit_kernel
def linear_bwd_kernel_dw(x, dy, pe, cs, dw, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                         sxb, sxh, sxt, sxd, sdb, sdh, sdw, sdn, sph, spj, spd,
                         sos, sog, soj, sod, son, B, H, HG, D, DO, ROWS_PER_SPLIT, WORK,
                         BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         IS_VARLEN: tl.constexpr, HAS_PE: tl.constexpr, DOT_F32: tl.constexpr,
                         DOT_TF32: tl.constexpr):
    """dw[split, g, j, D block, N block] = sum over this split's windows (all
    batch rows and heads of group g) of x[t0(w) + j]^T dy[w], plus, in split
    0, pe's share sum_{h in g} pe[h, j]^T colsum[h] (pe folded).
    Grid (L * D blocks, D_out blocks, G * splits); the splits are summed by
    torch afterwards (deterministic, no atomics).

    DOT_TF32 (mlp's dw2 in float16): x holds float32 values already rounded
    to tf32 and dy float16 (exact in tf32), so a tf32 dot multiplies exactly.
    """
    i_jd, i_n, i_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ND = tl.cdiv(D, BLOCK_D)
    j = i_jd // ND
    o_d = (i_jd - j * ND) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    G = H // HG
    i_g, i_s = i_gs % G, i_gs // G
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < DO
    R = B * HG * W                                                                        # rows (b, hh, w) of group g
    r_lo = i_s * ROWS_PER_SPLIT
    r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, R)
    b_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_W):
        o_r = r0 + tl.arange(0, BLOCK_W)
        m_r = o_r < r_hi
        o_w = o_r % W
        i_hh = (o_r // W) % HG
        i_b = o_r // (W * HG)
        i_h = (i_g * HG + i_hh).to(tl.int64)
        t0, bos, m_w = window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN)
        t = t0 + j
        m_t = m_r & m_w & (t >= bos)
        b_x = tl.load(x + (i_b.to(tl.int64) * sxb + i_h * sxh + t * sxt)[:, None] + o_d[None, :] * sxd,
                      mask=m_t[:, None] & m_d[None, :], other=0.)                         # [BLOCK_W, BLOCK_D]
        b_dy = tl.load(dy + (i_b.to(tl.int64) * sdb + i_h * sdh + o_w.to(tl.int64) * sdw)[:, None]
                       + o_n[None, :] * sdn, mask=m_r[:, None] & m_n[None, :], other=0.)  # [BLOCK_W, BLOCK_N]
        if DOT_TF32:
            b_acc = tl.dot(tl.trans(b_x.to(tl.float32)), b_dy.to(tl.float32), b_acc, input_precision="tf32")
        else:
            if DOT_F32:
                b_x, b_dy = b_x.to(tl.float32), b_dy.to(tl.float32)
            b_acc = tl.dot(tl.trans(b_x), b_dy, b_acc, input_precision="ieee")
    if HAS_PE:
        if i_s == 0:
            for hh in range(0, HG):
                i_h = i_g * HG + hh
                b_pe = tl.load(pe + i_h.to(tl.int64) * sph + j * spj + o_d * spd, mask=m_d, other=0.).to(tl.float32)
                b_cs = tl.load(cs + i_h.to(tl.int64) * DO + o_n, mask=m_n, other=0.)
                b_acc += b_pe[:, None] * b_cs[None, :]
    p_o = dw + i_s.to(tl.int64) * sos + i_g.to(tl.int64) * sog + j.to(tl.int64) * soj \
        + o_d[:, None].to(tl.int64) * sod + o_n[None, :] * son
    tl.store(p_o, b_acc.to(dw.dtype.element_ty), mask=m_d[:, None] & m_n[None, :])




@jit_kernel
def linear_pe_kernel(pe, w, out, H, HG, L, D, DO, sph, spj, spd, swg, swl, swd, swn,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[j, h, n] = sum_d pe[h, j, d] w[g, j, d, n] in float32 (plain
    multiply-adds, no tf32): pe's share of the output, one partial per window
    position, summed by linear_fwd_kernel's epilogue (deterministic).
    Grid (L, H, D_out blocks): L * H programs of D x BLOCK_N each, where one
    program per head would loop over all L * D rows of the weight."""
    i_j, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_g = i_h // HG
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < DO
    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_pe = tl.load(pe + i_h.to(tl.int64) * sph + i_j * spj + o_d * spd, mask=m_d, other=0.).to(tl.float32)
        b_w = tl.load(w + i_g.to(tl.int64) * swg + i_j * swl + o_d[:, None] * swd + o_n[None, :] * swn,
                      mask=m_d[:, None] & m_n[None, :], other=0.).to(tl.float32)       # [BLOCK_D, BLOCK_N]
        b_acc += tl.sum(b_pe[:, None] * b_w, axis=0)
    tl.store(out + (i_j * H + i_h).to(tl.int64) * DO + o_n, b_acc, mask=m_n)


@jit_kernel
def linear_fwd_kernel(x, w, pep, bias, y, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                         sxb, sxh, sxt, sxd, swg, swl, swd, swn, syb, syh, syw, syd, sbg, sbn,
                         H, HG, D, DO, WORK,
                         BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_L: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_PE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
    """The implicit GEMM over windows (``window_gemm``); pe's share arrives
    as L partials per head (linear_pe_kernel), summed here BLOCK_L rows per
    load, and the bias is added here: y[w] = sum_j x[t0(w) + j] @ w[g, j] + sum_j pep[j, h] + bias[g].
    Grid (window tiles, D_out blocks, B*H)."""
    i_w, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_w = i_w * BLOCK_W + tl.arange(0, BLOCK_W)
    t0, bos, m_w = window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN)      # [BLOCK_W]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < DO
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    p_w = w + i_g.to(tl.int64) * swg + o_n[None, :] * swn                               # [1, BLOCK_N]
    b_acc = window_gemm(tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32), p_x, t0, bos, m_w, sxt, sxd, p_w, swl,
                        swd, m_n, L, D, BLOCK_D, DOT_F32)
    if HAS_PE:
        b_c = tl.zeros([BLOCK_N], dtype=tl.float32)
        o_l = tl.arange(0, BLOCK_L)
        for l0 in range(0, L, BLOCK_L):     # one load per BLOCK_L positions: no chain of L dependent loads
            m_l = (l0 + o_l) < L
            b_c += tl.sum(tl.load(pep + ((l0 + o_l)[:, None] * H + i_h).to(tl.int64) * DO + o_n[None, :],
                                  mask=m_l[:, None] & m_n[None, :], other=0.), axis=0)
        b_acc += b_c[None, :]
    if HAS_BIAS:
        b_acc += tl.load(bias + i_g.to(tl.int64) * sbg + o_n * sbn, mask=m_n, other=0.).to(tl.float32)[None, :]
    p_y = y + i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh + o_w[:, None].to(tl.int64) * syw + o_n[None, :] * syd
    tl.store(p_y, b_acc.to(y.dtype.element_ty), mask=m_w[:, None] & m_n[None, :])


@jit_kernel
def linear_bwd_kernel_dx_rows(dy, w, dx, pcs, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                            sdb, sdh, sdw, sdn, swg, swl, swd, swn, sgb, sgh, sgt, sgd,
                            H, HG, D, DO, C, NSLOT, WORK,
                            C_PAD: tl.constexpr, DO_PAD: tl.constexpr, SLOT_ROWS: tl.constexpr,
                            HAS_CS: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_F32: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """dx[t] for BLOCK_K chunk rows x all S phases x BLOCK_D features.
    Grid (chunk-row tiles, D blocks, B*H).

    Chunk q, phase r (token t) is position c*S + r of window q - c, so the
    rows of the tile for phase r are A @ B_r with A[k, (c, n)] = dy[q_k - c, n]
    (the C windows holding chunk q; 0 where q - c is not a window of q's
    sequence) and B_r[(c, n), d] = w[g, c*S + r, d, n]: A, [BLOCK_K, C_PAD *
    DO_PAD], is loaded once for all S phases (linear_bwd_kernel_dx reloads it
    per phase), and
    the loop over phases streams B_r. Every token is written once (zero when
    no window holds it); no atomics.

    HAS_CS: programs of D block 0 also write the column sums of their
    windows' dy (the c = 0 columns of A: each window is chunk row q at c = 0
    of one tile) to slot i_t * (BLOCK_K // SLOT_ROWS) of pcs[b*H + h, slot],
    and zeros to the tile's other slots, so the slots do not depend on the
    tile chosen by the autotuner.
    """
    i_t, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_k = i_t * BLOCK_K + tl.arange(0, BLOCK_K)
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(o_k, cu, ccu, cq, N, N_STEPS, T, W, NQ, S, PRE,
                                                           IS_VARLEN)
    o_kk = tl.arange(0, C_PAD * DO_PAD)
    c_kk = o_kk // DO_PAD                                                                 # [C_PAD * DO_PAD]
    n_kk = o_kk % DO_PAD
    m_kk = (c_kk < C) & (n_kk < DO)
    q_w = q[:, None] - c_kk[None, :]                                                      # [BLOCK_K, C_PAD*DO_PAD]
    m_a = m_q[:, None] & m_kk[None, :] & (q_w >= 0) & (q_w < n_win[:, None])
    b_dy = tl.load(dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + (win_base[:, None] + q_w) * sdw
                   + n_kk[None, :] * sdn, mask=m_a, other=0.)                             # [BLOCK_K, C_PAD*DO_PAD]
    if HAS_CS:
        if i_d == 0:
            b_cs = tl.sum(tl.where((c_kk == 0)[None, :], b_dy.to(tl.float32), 0.), axis=0)
            o_s = tl.arange(0, BLOCK_K // SLOT_ROWS)
            slot = i_t * (BLOCK_K // SLOT_ROWS) + o_s
            tl.store(pcs + (i_bh.to(tl.int64) * NSLOT + slot[:, None]) * DO + n_kk[None, :],
                     tl.where(o_s[:, None] == 0, b_cs[None, :], 0.),
                     mask=(slot < NSLOT)[:, None] & ((c_kk == 0) & (n_kk < DO))[None, :])
    if DOT_F32:
        b_dy = b_dy.to(tl.float32)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_w = w + i_g.to(tl.int64) * swg + (c_kk * S)[:, None] * swl + n_kk[:, None] * swn + o_d[None, :] * swd
    p_dx = dx + i_b.to(tl.int64) * sgb + i_h.to(tl.int64) * sgh + o_d[None, :].to(tl.int64) * sgd
    for r in tl.range(0, S, num_stages=STAGES):
        m_b = m_kk & ((c_kk * S + r) < L)
        b_w = tl.load(p_w + r * swl, mask=m_b[:, None] & m_d[None, :], other=0.)         # [C_PAD*DO_PAD, BLOCK_D]
        if DOT_F32:
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_dy, b_w, input_precision="ieee")                                 # [BLOCK_K, BLOCK_D]
        t = t_base + r
        m_t = m_q & (t >= bos) & (t < eos)
        tl.store(p_dx + t[:, None] * sgt, b_acc.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _head_colsum(pcs, i_h, B, H, NSLOT, DO, o_n, m_n, BLOCK_R: tl.constexpr):
    """sum over b and slots of pcs[b*H + h, slot, n] for the columns o_n, in a fixed order."""
    o_r = tl.arange(0, BLOCK_R)
    b_cs = tl.zeros_like(o_n).to(tl.float32)
    for i_b in range(0, B):
        p_row = pcs + ((i_b * H + i_h).to(tl.int64) * NSLOT) * DO
        for r0 in range(0, NSLOT, BLOCK_R):
            m_r = (r0 + o_r) < NSLOT
            b_cs += tl.sum(tl.load(p_row + (r0 + o_r)[:, None] * DO + o_n[None, :], mask=m_r[:, None] & m_n[None, :],
                                   other=0.), axis=0)
    return b_cs


@jit_kernel
def linear_bwd_kernel_finalize(pcs, w, cs, db, dpe, B, H, HG, L, D, DO, NSLOT, swg, swl, swd, swn,
                               NEED_CS: tl.constexpr, NEED_B: tl.constexpr, NEED_PE: tl.constexpr,
                               DO_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (H, L if NEED_PE else 1). colsum[h] = sum of the slots of pcs
    (deterministic order); program (h, 0) stores it in cs (float32, for the
    weight gradient's pe term; NEED_CS); program (g*HG, 0) stores
    db[g] = sum over the heads of group g of colsum (NEED_B); program (h, j)
    stores dpe[h, j, d] = sum_n w[g, j, d, n] colsum[h, n] (NEED_PE).
    One launch for what took five (torch reductions, a gemv, casts)."""
    i_h, i_j = tl.program_id(0), tl.program_id(1)
    i_g = i_h // HG
    o_n = tl.arange(0, DO_PAD)
    m_n = o_n < DO
    b_cs = _head_colsum(pcs, i_h, B, H, NSLOT, DO, o_n, m_n, BLOCK_R)                   # [DO_PAD]
    if i_j == 0:
        if NEED_CS:
            tl.store(cs + i_h.to(tl.int64) * DO + o_n, b_cs, mask=m_n)
        if NEED_B:
            if i_h % HG == 0:
                b_db = b_cs
                for hh in range(1, HG):
                    b_db += _head_colsum(pcs, i_h + hh, B, H, NSLOT, DO, o_n, m_n, BLOCK_R)
                tl.store(db + i_g.to(tl.int64) * DO + o_n, b_db.to(db.dtype.element_ty), mask=m_n)
    if NEED_PE:
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_w = tl.load(w + i_g.to(tl.int64) * swg + i_j * swl + o_d[:, None] * swd + o_n[None, :] * swn,
                          mask=m_d[:, None] & m_n[None, :], other=0.).to(tl.float32)     # [BLOCK_D, DO_PAD]
            tl.store(dpe + (i_h.to(tl.int64) * L + i_j) * D + o_d,
                     tl.sum(b_w * b_cs[None, :], axis=1).to(dpe.dtype.element_ty), mask=m_d)


# --------------------------------------------------------------------------- launch configurations


def _fits(configs, kw, rows_name):
    """Configurations whose blocks do not overshoot D and D_out; for float32
    (IEEE dots run on FMA units, operands twice as large) only tiles that
    compile for sm_90 without register spills or shared memory overflow
    (checked with scripts/gpu_check.py --compile-only)."""
    D, DO = kw["D"], kw["DO"]
    f32 = kw["x" if "x" in kw else "dy"].dtype == torch.float32     # the input's dtype, not cst's (float32)
    big = D >= 64 and DO >= 64                                      # then 16-wide tiles only waste autotuning time
    return [c for c in configs if c.kwargs["BLOCK_D"] <= max(16, next_pow2(D))
            and c.kwargs["BLOCK_N"] <= max(16, next_pow2(DO))
            and not (big and min(c.kwargs["BLOCK_D"], c.kwargs["BLOCK_N"]) < 32)
            and (not f32 or c.kwargs[rows_name] * max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]) <= 4096)]


def dx_phase_per(NQ: int, BH: int, S: int, device) -> int:
    """Phases per program of linear_bwd_kernel_dx (R_PER): all S when its
    chunk-row tiles (counted at 128 rows) fill the GPU twice, else fewer, so
    that enough programs run. mlp at T = 8192 (B*H = 4) had 16 programs on
    132 SMs, 736 us for what a full GPU does in about 140 (GPU run 11)."""
    return cdiv(S, min(S, fill_factor(cdiv(NQ, 128) * BH, num_sms(device, cpu=CPU_SMS), 2)))


# launched without autotuning, through the direct launch (no JITFunction.run once a specialisation has run)
_PE, _FINALIZE = Direct(linear_pe_kernel), Direct(linear_bwd_kernel_finalize)


def dx_launcher(rows, prune) -> Launcher:
    """linear_bwd_kernel_dx over the (BLOCK_K, BLOCK_D, BLOCK_N, warps,
    stages) ``rows``; mlp launches it too, with F as D_out."""
    return Launcher(
        linear_bwd_kernel_dx,
        configs=tile_configs(("BLOCK_K", "BLOCK_D", "BLOCK_N"), rows),
        key=["D", "DO", "L", "S", "R_PER", "WORK", "IS_VARLEN", "DOT_F32"],
        interpret_meta=lambda kw: {"BLOCK_K": interpret_block(kw["NQ"], 32),
                                   "BLOCK_D": interpret_block(kw["D"], 32), "BLOCK_N": interpret_block(kw["DO"], 32)},
        prune=prune)


def dw_launcher(rows, prune) -> Launcher:
    """linear_bwd_kernel_dw over the (BLOCK_W, BLOCK_D, BLOCK_N, warps,
    stages) ``rows``; mlp launches it too, with F as D_out."""
    return Launcher(
        linear_bwd_kernel_dw,
        configs=tile_configs(("BLOCK_W", "BLOCK_D", "BLOCK_N"), rows),
        key=["D", "DO", "L", "WORK", "IS_VARLEN", "HAS_PE", "DOT_F32", "DOT_TF32"],
        interpret_meta=lambda kw: {"BLOCK_W": interpret_block(kw["B"] * kw["W"], 32),
                                   "BLOCK_D": interpret_block(kw["D"], 32), "BLOCK_N": interpret_block(kw["DO"], 32)},
        prune=prune)


_DX = dx_launcher([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3),
                   (64, 128, 128, 8, 2), (32, 64, 64, 4, 2), (32, 128, 32, 4, 3), (16, 16, 16, 2, 2)],
                  lambda cs, kw: _fits(cs, kw, "BLOCK_K"))


# (BLOCK_W, BLOCK_D, BLOCK_N, warps, stages), sized for D = D_out = 128 (the weight tile is re-read from L2 by
# every window tile, so 256-window tiles halve that traffic) and smaller dims
_FWD = Launcher(
    linear_fwd_kernel,
    configs=tile_configs(("BLOCK_W", "BLOCK_D", "BLOCK_N"),
                 [(128, 64, 128, 8, 3), (128, 64, 128, 4, 4), (128, 128, 128, 8, 3), (256, 64, 128, 8, 3),
                  (256, 32, 128, 8, 4), (128, 32, 128, 4, 5), (64, 64, 128, 4, 4), (64, 32, 64, 4, 3),
                  (32, 32, 128, 4, 3), (32, 16, 32, 4, 2), (16, 16, 16, 2, 2),
                  # run 11: deeper K tiles, 256-window tiles with fewer stages
                  (256, 128, 128, 8, 2), (128, 128, 128, 8, 2), (128, 64, 128, 8, 4), (256, 64, 128, 8, 2)]),
    key=["D", "DO", "L", "S", "WORK", "IS_VARLEN", "HAS_PE", "HAS_BIAS", "DOT_F32"],
    interpret_meta=lambda kw: {"BLOCK_W": interpret_block(kw["W"], 32), "BLOCK_D": interpret_block(kw["D"], 32),
                               "BLOCK_N": interpret_block(kw["DO"], 32)},
    prune=lambda cs, kw: _fits(cs, kw, "BLOCK_W"))

# rows of dy per column-sum slot of linear_bwd_kernel_dx_rows: every BLOCK_K is a multiple
SLOT_ROWS = 16 if INTERPRET else 64
# linear_bwd_kernel_dx_rows holds dy's rows for all C windows, C_PAD * DO_PAD wide: beyond this, and for
# float32 (IEEE dots on FMA units, operands in registers), linear_bwd_kernel_dx runs
DXR_MAX_K = 512


def _dxr_fits(configs, kw):
    """(BLOCK_K, BLOCK_D, stages) whose shared memory (the A tile once, B
    tiles per stage) stays under 200 KB of sm_90's 227 KB, BLOCK_D <=
    next_pow2(D) (>= 16)."""
    K = kw["C_PAD"] * kw["DO_PAD"]
    esize = kw["dy"].element_size()
    out = [c for c in configs if c.kwargs["BLOCK_D"] <= max(16, next_pow2(kw["D"]))
           and (c.kwargs["BLOCK_K"] + c.kwargs["STAGES"] * c.kwargs["BLOCK_D"]) * K * esize <= 200 * 1024]
    return out or [triton.Config({"BLOCK_K": 64, "BLOCK_D": 32, "STAGES": 2}, num_warps=4)]


_DXR = Launcher(
    linear_bwd_kernel_dx_rows,
    configs=[triton.Config({"BLOCK_K": bk, "BLOCK_D": bd, "STAGES": st}, num_warps=nw)
             for bk, bd, nw, st in [(128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3),
                                    (256, 64, 8, 2), (128, 64, 4, 3), (64, 128, 8, 2)]],
    key=["D", "DO", "L", "S", "C_PAD", "DO_PAD", "WORK", "IS_VARLEN", "HAS_CS", "DOT_F32"],
    interpret_meta=lambda kw: {"BLOCK_K": interpret_block(kw["NQ"], 32, small=SLOT_ROWS),
                               "BLOCK_D": interpret_block(kw["D"], 32), "STAGES": 1},
    prune=_dxr_fits)
_DW = dw_launcher([(64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 64, 128, 4, 3),
                    (128, 64, 128, 8, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 32, 32, 4, 2),
                    (16, 16, 16, 2, 2)],
                   lambda cs, kw: _fits(cs, kw, "BLOCK_W"))


# --------------------------------------------------------------------------- host side


def _forward(x, weight, bias, pe, plan):
    """Forward: pe's share by linear_pe_kernel (L * H programs), then
    the GEMM with bias and the pe partials in its epilogue. Two launches with
    pe, one without."""
    B, H, T, D = x.shape
    G, L, _, DO = weight.shape
    y = empty((B, H, plan.W, DO), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    key = (x.shape, x.stride(), weight.shape, weight.stride(), None if bias is None else bias.stride(),
           None if pe is None else (pe.shape, pe.stride()), x.dtype, plan.varlen, *plan.seq_args()[3:])
    launch = _FWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_FWD_LAUNCH, key, _fwd_launch(x, weight, bias, pe, y, plan))
    pe_launch, (ints, grid, constexprs) = launch
    pep = None
    if pe_launch is not None:
        pep = empty((L, H, DO), dtype=torch.float32, device=x.device)                    # [L, H, D_out]
        _PE(pe_launch[1], pe, weight, pep, *pe_launch[0], **pe_launch[2])
    _FWD(grid, x, weight, pep if pep is not None else x, bias if bias is not None else x, y, plan.cu, plan.ccu,
         plan.cq, *ints, **constexprs)
    return y


# The launches' arguments after their tensors, their grids and constexprs depend only on shapes, strides,
# dtypes, the plan's sizes and the flags: built once per key (``_fwd_launch``, ``_bwd_launch``, and in the
# shared ``weight_grad`` and ``x_grad``) instead of named arguments and stride dicts on every call (host time,
# issue 14 item 2; as the pools and gated_pool do). Each kernel takes its tensors first, in this order.
assert linear_pe_kernel.runtime_args[:3] == ("pe", "w", "out")
assert linear_fwd_kernel.runtime_args[:8] == ("x", "w", "pep", "bias", "y", "cu", "ccu", "cq")
assert linear_bwd_kernel_dx_rows.runtime_args[:7] == ("dy", "w", "dx", "pcs", "cu", "ccu", "cq")
assert linear_bwd_kernel_finalize.runtime_args[:5] == ("pcs", "w", "cs", "db", "dpe")
assert linear_bwd_kernel_dw.runtime_args[:8] == ("x", "dy", "pe", "cs", "dw", "cu", "ccu", "cq")
assert linear_bwd_kernel_dx.runtime_args[:6] == ("dy", "w", "dx", "cu", "ccu", "cq")
_FWD_LAUNCH: dict[tuple, tuple] = {}
_BWD_LAUNCH: dict[tuple, tuple] = {}
_DW_LAUNCH: dict[tuple, tuple] = {}
_DX_LAUNCH: dict[tuple, tuple] = {}


def _fwd_launch(x, weight, bias, pe, y, plan):
    """(pe's launch or None, the GEMM's launch) of ``_forward``, each (integer
    arguments, grid, constexprs)."""
    B, H, T, D = x.shape
    G, L, _, DO = weight.shape
    HG = H // G
    pe_launch = None
    if pe is not None and D > 0:
        BN = min(128, max(16, next_pow2(DO)))
        pe_launch = (kernel_args(linear_pe_kernel, pe=pe, w=weight, out=pe, H=H, HG=HG, L=L, D=D, DO=DO,
                                 **strides("sp", pe, "hjd"), **strides("sw", weight, "gldn"))[3:],
                     (L, H, cdiv(DO, BN)), dict(BLOCK_D=min(64, max(16, next_pow2(D))), BLOCK_N=BN))
    W = plan.W
    args = kernel_args(linear_fwd_kernel, x=x, w=weight, pep=x, bias=bias if bias is not None else x, y=y,
                       **plan.seq_kwargs(), **strides("sx", x, "bhtd"), **strides("sw", weight, "gldn"),
                       **strides("sy", y, "bhwd"), **strides("sb", bias, "gn"), H=H, HG=HG, D=D, DO=DO,
                       WORK=size_class(B * H * W))
    return pe_launch, (args[8:], lambda meta: (cdiv(W, meta["BLOCK_W"]), cdiv(DO, meta["BLOCK_N"]), B * H),
                       dict(BLOCK_L=min(32, next_pow2(L)), IS_VARLEN=plan.varlen, HAS_PE=pe_launch is not None,
                            HAS_BIAS=bias is not None, DOT_F32=dot_f32(x.dtype)))


def _backward(dy, x, weight, pe, plan, need_x, need_w, need_b, need_pe):
    """Backward: dx (with the column sums of dy on the way), one
    finalize kernel (column sums, dbias, dpe), the weight gradient. Three
    launches at most when the split-K of the weight gradient is not needed
    (it is not at NSA sizes)."""
    B, H, T, D = x.shape
    G, L, _, DO = weight.shape
    HG = H // G
    # a gradient not asked for is a fresh empty tensor (custom op outputs may not alias), made at the end:
    # one asked for is allocated where it is computed
    dx = dw = db = dpe = None
    need_pe = need_pe and pe is not None
    need_cs = need_b or need_pe or (need_w and pe is not None)
    if need_x:
        dx = empty_like(x)
    key = (x.shape, x.stride(), weight.shape, weight.stride(), dy.stride(), x.dtype, plan.varlen,
           *plan.seq_args()[3:], need_x, need_cs, need_b, need_pe)
    launch = _BWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_BWD_LAUNCH, key, _bwd_launch(dy, x, weight, dx, plan, need_cs, need_b, need_pe))
    dxr, nslot, fin = launch
    pcs = None
    if dxr is not None:             # the x-gradient by chunk rows, with the column sums of dy on the way
        if need_cs:
            pcs = empty((B * H * nslot * DO,), dtype=torch.float32, device=x.device)
        _DXR(dxr[1], dy, weight, dx, pcs if pcs is not None else x, plan.cu, plan.ccu, plan.cq, *dxr[0], **dxr[2])
    elif need_x and dx.numel() > 0:
        x_grad(_DX, dx, dy, weight, plan, HG, dx_phase_per(plan.NQ, B * H, plan.S, x.device))
    if need_cs and pcs is None:    # no x-gradient kernel ran (or linear_bwd_kernel_dx did): the column sums from torch
        pcs = dy.sum(dim=2, dtype=torch.float32)                                          # [B, H, D_out]
    cs = None
    if need_cs:
        cs = empty((H, DO), dtype=torch.float32, device=x.device)
        if need_b:
            db = empty((G, DO), dtype=x.dtype, device=x.device)
        if need_pe:
            dpe = empty((H, L, D), dtype=x.dtype, device=x.device)
        if fin is not None:
            _FINALIZE(fin[1], pcs, weight, cs, db if need_b else cs, dpe if need_pe else cs, *fin[0], **fin[2])
        elif need_pe:           # D_out = 0: pe does not reach the output
            dpe.zero_()
    if need_w:
        dw = empty(weight.shape, dtype=x.dtype, device=x.device)
        weight_grad(_DW, dw, x, dy, pe, cs, plan, B, H, HG, D, DO, G * L * cdiv(D, 64) * cdiv(DO, 128))
    return tuple(x.new_empty(0) if g is None else g for g in (dx, dw, db, dpe))


def _bwd_launch(dy, x, weight, dx, plan, need_cs, need_b, need_pe):
    """(the chunk-row x-gradient's launch or None, its column-sum slots, the
    finalize kernel's launch or None) of ``_backward``, each launch (integer
    arguments, grid, constexprs). The chunk-row kernel serves half-precision
    x whose C_PAD * D_out fits DXR_MAX_K; the finalize kernel runs when
    the column sums are needed and H, D_out > 0."""
    B, H, T, D = x.shape
    G, L, _, DO = weight.shape
    HG = H // G
    C_PAD, DO_PAD = plan.C_PAD, max(16, next_pow2(DO))
    dxr, nslot = None, 1
    if dx is not None and dx.numel() > 0 and x.dtype != torch.float32 and C_PAD * DO_PAD <= DXR_MAX_K:
        NQ, rows_slots = plan.NQ, cdiv(plan.NQ, SLOT_ROWS)
        args = kernel_args(linear_bwd_kernel_dx_rows, dy=dy, w=weight, dx=dx, pcs=x, **plan.seq_kwargs(),
                           **strides("sd", dy, "bhwn"), **strides("sw", weight, "gldn"), **strides("sg", dx, "bhtd"),
                           H=H, HG=HG, D=D, DO=DO, C=plan.C, NSLOT=rows_slots, WORK=size_class(B * H * NQ))
        dxr = (args[7:], lambda meta: (cdiv(NQ, meta["BLOCK_K"]), cdiv(D, meta["BLOCK_D"]), B * H),
               dict(C_PAD=C_PAD, DO_PAD=DO_PAD, SLOT_ROWS=SLOT_ROWS, HAS_CS=need_cs, IS_VARLEN=plan.varlen,
                    DOT_F32=dot_f32(x.dtype)))
        if need_cs:
            nslot = rows_slots
    fin = None
    if need_cs and H > 0 and DO > 0:
        args = kernel_args(linear_bwd_kernel_finalize, pcs=x, w=weight, cs=x, db=x, dpe=x, B=B, H=H, HG=HG, L=L,
                           D=D, DO=DO, NSLOT=nslot, **strides("sw", weight, "gldn"))
        fin = (args[5:], (H, L if need_pe else 1),
               dict(NEED_CS=True, NEED_B=need_b, NEED_PE=need_pe, DO_PAD=DO_PAD, BLOCK_R=16 if INTERPRET else 32,
                    BLOCK_D=max(16, min(128, 8192 // DO_PAD))))
    return dxr, nslot, fin


def _splits(rows: int, programs: int, device) -> int:
    """Window splits of a weight gradient: enough programs to fill the GPU
    twice, each split still summing >= 512 windows, at most 16."""
    return max(1, min(fill_factor(programs, num_sms(device, cpu=CPU_SMS), 2), rows // 512, 16))


def weight_grad(launcher, dst, x, dy, pe, cs, plan, B, H, HG, D, DO, programs, *, dot_tf32=False):
    """Write dst (G, L, D, D_out), any view, with linear_bwd_kernel_dw through
    ``launcher``: the sum over each group's windows (plan, x's SeqPlan) of
    x[t0(w) + j]^T dy[w], dy (B, H, W, D_out), plus pe's share from the column
    sums cs (H, D_out) when pe (H, L, D) is given.

    The windows are split into float32 partials summed by torch (fixed order,
    no atomics) when ``programs``, the unsplit grid counted at the caller's
    typical tile, would leave the GPU underfilled (``_splits``). Shared by
    linear's weight gradient and mlp's dw1 (dy := dp) and dw2 (x := the
    stored hidden layer, L = 1; ``dot_tf32`` for float16's float32 hidden)."""
    if dst.numel() == 0:
        return
    key = (dst.shape, dst.stride(), x.shape, x.stride(), x.dtype, x.device, dy.shape, dy.stride(),
           None if pe is None else (pe.shape, pe.stride()), cs is None, plan.varlen, *plan.seq_args()[3:],
           B, H, HG, D, DO, programs, dot_tf32)
    launch = _DW_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_DW_LAUNCH, key, _dw_launch(dst, x, dy, pe, cs, plan, B, H, HG, D, DO, programs,
                                                        dot_tf32))
    splits, ints, grid, constexprs = launch
    out = dst if splits == 1 else empty((splits, *dst.shape), dtype=torch.float32, device=x.device)
    launcher(grid, x, dy, pe if pe is not None else x, cs if cs is not None else x, out, plan.cu, plan.ccu, plan.cq,
             *ints, **constexprs)
    if splits > 1:
        dst.copy_(out.sum(0))


def _dw_launch(dst, x, dy, pe, cs, plan, B, H, HG, D, DO, programs, dot_tf32):
    """(window splits, integer arguments, grid, constexprs) of ``weight_grad``'s launch."""
    G, L = dst.shape[0], dst.shape[1]
    rows = B * HG * plan.W
    splits = _splits(rows, programs, x.device)
    if splits == 1:
        o_strides = {"sos": 0, **strides("so", dst, "gjdn")}
    else:
        o_strides = strides("so", torch.empty((splits, *dst.shape), device="meta"), "sgjdn")
    args = kernel_args(linear_bwd_kernel_dw, x=x, dy=dy, pe=pe if pe is not None else x,
                       cs=cs if cs is not None else x, dw=dst, **plan.seq_kwargs(), **strides("sx", x, "bhtd"),
                       **strides("sd", dy, "bhwn"), **strides("sp", pe, "hjd"), **o_strides, B=B, H=H, HG=HG,
                       D=D, DO=DO, ROWS_PER_SPLIT=cdiv(rows, splits), WORK=size_class(rows))
    return (splits, args[8:], lambda meta: (L * cdiv(D, meta["BLOCK_D"]), cdiv(DO, meta["BLOCK_N"]), G * splits),
            dict(IS_VARLEN=plan.varlen, HAS_PE=pe is not None, DOT_F32=dot_f32(x.dtype), DOT_TF32=dot_tf32))


def x_grad(launcher, dx, dy, w, plan, HG, rper):
    """Write dx (B, H, T, D), any view, with linear_bwd_kernel_dx through
    ``launcher``: the x-gradient of windows dy (B, H, W, D_out) through w
    (G, L, D, D_out), the heads HG to a group, ``rper`` phases per program
    (``dx_phase_per``); plan: x's SeqPlan. Shared by linear (float32, or
    C * D_out beyond DXR_MAX_K) and mlp's first layer (dy := dp, w := w1 as
    (G, L, D, F))."""
    key = (dx.shape, dx.stride(), dy.shape, dy.stride(), w.shape, w.stride(), dy.dtype, plan.B, plan.H,
           plan.varlen, *plan.seq_args()[3:], HG, rper)
    launch = _DX_LAUNCH.get(key)
    if launch is None:
        B, H, D, DO = plan.B, plan.H, w.shape[2], w.shape[3]
        NQ, S = plan.NQ, plan.S
        args = kernel_args(linear_bwd_kernel_dx, dy=dy, w=w, dx=dx, **plan.seq_kwargs(), **strides("sd", dy, "bhwn"),
                           **strides("sw", w, "gldn"), **strides("sg", dx, "bhtd"), H=H, HG=HG, D=D, DO=DO, C=plan.C,
                           R_PER=rper, WORK=size_class(B * H * NQ))
        launch = cache_put(_DX_LAUNCH, key, (
            args[6:], lambda meta: (cdiv(NQ, meta["BLOCK_K"]), cdiv(D, meta["BLOCK_D"]) * cdiv(S, rper), B * H),
            dict(IS_VARLEN=plan.varlen, DOT_F32=dot_f32(dy.dtype))))
    ints, grid, constexprs = launch
    launcher(grid, dy, w, dx, plan.cu, plan.ccu, plan.cq, *ints, **constexprs)


def _op_forward(x, weight, bias, pe, cu_seqlens, block_size, stride, padding, total_windows):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    return _forward(x, weight, bias, pe, plan), plan


def _op_backward(dy, x, weight, pe, cu_seqlens, block_size, stride, padding, need_x, need_w, need_b, need_pe,
                 state):
    plan = backward_plan(state, dy, x, cu_seqlens, block_size, stride, padding)
    return _backward(dy, x, weight, pe, plan, need_x, need_w, need_b, need_pe)


def _fake(x, weight, cu_seqlens, block_size, stride, padding, total_windows, **_):
    return window_fake(x, weight.shape[3], cu_seqlens=cu_seqlens, block_size=block_size, stride=stride,
                       padding=padding, total_windows=total_windows)


# x (B, H, T, D) any strides, weight (G, L, D, D_out), bias (G, D_out) or None, pe (H, L, D) or None
# -> (B, H, W, D_out), contiguous; the backward is not given the bias (its gradient is dy's column sums)
_linear = kernel_op("kvcompress::linear_triton",
                    inputs=f"Tensor x, Tensor weight, Tensor? bias, Tensor? pe, {WINDOW_INPUTS}, SymInt total_windows",
                    grads={"x": "need_x", "weight": "need_w", "bias": "need_b", "pe": "need_pe"},
                    saved=("x", "weight", "pe", *WINDOW_SAVED), forward=_op_forward, fake=_fake,
                    backward=_op_backward, grad_shapes={"bias": lambda a: (a["weight"].shape[0], a["weight"].shape[3])})


@register("linear", "triton", devices=DEVICES, dtypes=DTYPES, priority=10, available=triton_available,
          supports=supports_call, auto_devices=("cuda",),
          emulated_devices=("cpu",))
def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
           total_windows=None):
    """Per-window linear map, Triton kernels (arguments already validated by
    ``kvcompress.functional.linear``).

    x: (B, H, T, D) float16/bfloat16/float32, any strides (never copied);
    weight: (G, L, D, D_out); bias: (G, D_out) or None; pe: (H, L, D) or None;
    cu_seqlens: (N+1,) int32/int64 or None. total_windows: with cu_seqlens,
    the packed output size if known (no device read then), default None.
    Returns (B, H, W, D_out) in x's dtype. Differentiable in x, weight, bias
    and pe. float32 dots are IEEE (never tf32).

    Raises TypeError/ValueError for a malformed total_windows.
    """
    total = total_windows_arg("linear", total_windows, cu_seqlens)
    return _linear(x, weight, bias, pe, cu_seqlens, block_size, stride, padding, total)


__all__ = ["linear", "linear_bwd_kernel_dw", "linear_bwd_kernel_dx", "linear_bwd_kernel_dx_rows",
           "linear_bwd_kernel_finalize", "linear_fwd_kernel", "linear_pe_kernel", "weight_grad", "x_grad"]
