"""attention_pool, Triton: softmax pooling per feature over each window,
logits computed once per token (docs/triton.md, "attention_pool").
Registered as backend "triton" (CUDA; CPU tensors too under
TRITON_INTERPRET=1, never picked by "auto" there).

- Forward (``attention_pool_fwd_kernel``): tiles of chunk rows as the
  pooling kinds; for each phase r the tile's tokens at phase r are loaded
  once and their logits Z = x @ W[g] (one dot, K = D) serve all the C
  windows that hold them (position j = c*S + r of window q - c; pe adds
  pe[h, j] @ W[g], a per-position constant). Each (window offset c, chunk
  row) keeps an online softmax state (max, sum, weighted sum); the C states
  of a window are merged at the end by shifting rows (as the pools'
  partial sums). With autograd, the per-window log-sum-exp (B, H, W, D)
  float32 is stored for the backward (FlashAttention's LSE), beside the
  output unrounded (float32): the backward's v - y must not read the output
  rounded to the input dtype (SPEC 3c, strict and io-intermediates alike:
  in bfloat16 a rounded y of size 50 moves v - y by 0.1 where the exact
  difference may be 1e-6, GPU run of issue 13).
- Backward (``attention_pool_bwd_kernel``): gathered per token like the
  pools: recompute the token's logits, P = exp(z - lse) for each window
  holding it, dz = P dy (v - y); dx = sum P dy + (sum dz) @ W^T, written
  once per token; dW partials x^T (sum dz) per program (summed by torch,
  deterministic), pe's shares from per-position column sums.

The op is ``torch.ops.kvcompress.attention_pool_triton`` (fake implementation
and autograd registered, ``_custom_op.kernel_op``), so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque node; eager calls run the same functions
through an ``autograd.Function`` instead (``eager_call``: no op dispatch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...backends import register
from .._custom_op import kernel_op
from .._triton.alloc import empty, empty_like
from .._triton.env import (
    DEVICES,
    DTYPES,
    INTERPRET,
    dot_f32,
    num_sms,
    supports_call,
    tf32_intermediate,
    triton_available,
)
from .._triton.gemv import head_gemv
from .._triton.lang import chunk_rows, round_tf32
from .._triton.launch import (
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
from .._triton.plan import WINDOW_INPUTS, WINDOW_SAVED, backward_plan, seq_plan, total_windows_arg, window_fake

# --------------------------------------------------------------------------- kernels


@jit_kernel
def attention_pool_fwd_kernel(x, w, cpe, pe, y, lse, y32, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                              sxb, sxh, sxt, sxd, swg, swd, swc, sph, spj, spd, syb, syh, syw, syd,
                              slb, slh, slw, sld, H, HG, D, C, WORK,
                              C_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_PE: tl.constexpr,
                              HAS_LSE: tl.constexpr, DOT_F32: tl.constexpr):
    """y[w, c] = sum_j softmax_j(z[:, c]) v[j, c] for the windows a tile of
    BLOCK_K chunk rows completes, features [i_c*BLOCK_C, +BLOCK_C); lse[w, c]
    = log-sum-exp of the logits and y32[w, c] = y unrounded (HAS_LSE; y32 has
    lse's strides). Grid (tiles, feature blocks, B*H).

    Phase r: the tile's tokens t = t_base + r [BLOCK_K, BLOCK_D] (BLOCK_D >= D,
    loaded once) give z = x @ W[g][:, block] (float32 accumulation, never
    rounded: SPEC section 3) and v = x + pe. State (c, k) collects position
    j = c*S + r of window q_k - c; the update needs one exp: with
    d = exp(-|z - m|), a new maximum rescales by d and adds 1, else adds d.
    Window q_k is then the merge of states (c, k + c), c < C.
    """
    i_t, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    BW = BLOCK_K - C + 1                                                   # windows completed per tile
    o_k = tl.arange(0, BLOCK_K)
    o_s = tl.arange(0, C_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < D
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BW + o_k, cu, ccu, cq, N, N_STEPS, T, W, NQ,
                                                           S, PRE, IS_VARLEN)
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    b_w = tl.load(w + i_g.to(tl.int64) * swg + o_d[:, None] * swd + o_c[None, :] * swc,
                  mask=m_d[:, None] & m_c[None, :], other=0.)                # [BLOCK_D, BLOCK_C]
    if DOT_F32:
        b_w = b_w.to(tl.float32)
    b_m = tl.full([C_PAD, BLOCK_K, BLOCK_C], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([C_PAD, BLOCK_K, BLOCK_C], dtype=tl.float32)
    b_a = tl.zeros([C_PAD, BLOCK_K, BLOCK_C], dtype=tl.float32)
    for r in range(0, S):
        t = t_base + r                                                     # [BLOCK_K]
        m_t = m_q & (t >= bos) & (t < eos)
        b_x = tl.load(p_x + t[:, None] * sxt + o_d[None, :] * sxd, mask=m_t[:, None] & m_d[None, :],
                      other=0.)                                            # [BLOCK_K, BLOCK_D]
        b_v = tl.load(p_x + t[:, None] * sxt + o_c[None, :] * sxd, mask=m_t[:, None] & m_c[None, :],
                      other=0.).to(tl.float32)                             # [BLOCK_K, BLOCK_C]
        if DOT_F32:
            b_x = b_x.to(tl.float32)
        b_z = tl.dot(b_x, b_w, input_precision="ieee")                     # [BLOCK_K, BLOCK_C]
        o_j = o_s * S + r                                                  # [C_PAD] window position
        m_j = (o_s < C) & (o_j < L)
        b_zc = b_z[None, :, :] + tl.zeros([C_PAD, 1, 1], dtype=tl.float32)
        b_vc = b_v[None, :, :] + tl.zeros([C_PAD, 1, 1], dtype=tl.float32)
        if HAS_PE:   # pad tokens are 0 + pe[h, j]: z = x W + pe W, v = x + pe
            o_pe = i_h.to(tl.int64) * L * D + o_j[:, None] * D + o_c[None, :]
            b_zc += tl.load(cpe + o_pe, mask=m_j[:, None] & m_c[None, :], other=0.)[:, None, :]
            b_vc += tl.load(pe + i_h.to(tl.int64) * sph + o_j[:, None] * spj + o_c[None, :] * spd,
                            mask=m_j[:, None] & m_c[None, :], other=0.).to(tl.float32)[:, None, :]
        # one exp per update: a NaN logit makes d NaN and poisons l (its window only)
        b_e = tl.exp(-tl.abs(b_zc - b_m))
        up = b_zc > b_m
        b_l_new = tl.where(up, b_l * b_e + 1.0, b_l + b_e)
        b_a_new = tl.where(up, b_a * b_e + b_vc, b_a + b_e * b_vc)
        keep = m_j[:, None, None]
        b_l = tl.where(keep, b_l_new, b_l)
        b_a = tl.where(keep, b_a_new, b_a)
        b_m = tl.where(keep & up, b_zc, b_m)
    # window q_k = states (c, k + c): a shift by c rows (tl.gather), then the log-sum-exp merge
    o_src = o_s[:, None, None] * BLOCK_K + tl.minimum(o_k[None, :, None] + o_s[:, None, None], BLOCK_K - 1) \
        + 0 * o_c[None, None, :]                                           # [C_PAD, BLOCK_K, BLOCK_C]
    o_src = tl.reshape(o_src, (C_PAD * BLOCK_K, BLOCK_C))
    b_m = tl.reshape(tl.gather(tl.reshape(b_m, (C_PAD * BLOCK_K, BLOCK_C)), o_src, 0), (C_PAD, BLOCK_K, BLOCK_C))
    b_l = tl.reshape(tl.gather(tl.reshape(b_l, (C_PAD * BLOCK_K, BLOCK_C)), o_src, 0), (C_PAD, BLOCK_K, BLOCK_C))
    b_a = tl.reshape(tl.gather(tl.reshape(b_a, (C_PAD * BLOCK_K, BLOCK_C)), o_src, 0), (C_PAD, BLOCK_K, BLOCK_C))
    b_mx = tl.max(b_m, axis=0)                                             # [BLOCK_K, BLOCK_C]
    b_f = tl.where((o_s < C)[:, None, None], tl.exp(b_m - b_mx[None, :, :]), 0.)
    b_lt = tl.sum(b_f * b_l, axis=0)
    b_y = tl.sum(b_f * b_a, axis=0) / b_lt
    m_y = m_q & (o_k < BW) & (q < n_win)
    o_row = (win_base + q)[:, None]
    p_y = y + i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh + o_row * syw + o_c[None, :] * syd
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_y[:, None] & m_c[None, :])
    if HAS_LSE:
        o_l = i_b.to(tl.int64) * slb + i_h.to(tl.int64) * slh + o_row * slw + o_c[None, :] * sld
        tl.store(lse + o_l, b_mx + tl.log(b_lt), mask=m_y[:, None] & m_c[None, :])
        tl.store(y32 + o_l, b_y, mask=m_y[:, None] & m_c[None, :])


@jit_kernel
def attention_pool_bwd_kernel(x, w, cpe, pe, dy, y, lse, dx, pw, pp, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S,
                              PRE, sxb, sxh, sxt, sxd, swg, swd, swc, sph, spj, spd, sdb, sdh, sdw, sdd,
                              syb, syh, syw, syd, slb, slh, slw, sld, sgb, sgh, sgt, sgd, H, HG, D, WORK,
                              BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                              NCB: tl.constexpr, L_PAD: tl.constexpr, IS_VARLEN: tl.constexpr,
                              HAS_PE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                              NEED_PE: tl.constexpr, HID_TF32: tl.constexpr, DOT_F32: tl.constexpr):
    """Gradients gathered per token. Grid (programs, feature blocks, B*H); a
    program runs the chunk-row tiles i_p, i_p + P, ... of its (b, h) row and
    the NCB feature blocks of BLOCK_C from i_c * NCB (NCB > 1: float32's dx
    pass, whose IEEE dots hold their operands in registers, and any dtype's
    when D > 128, whose [BLOCK_D, BLOCK_D] W and its transpose would not fit
    shared memory).

    Token t = chunk q, phase r is position j = c*S + r of window q - c. For
    each such window: P = exp(z - lse[q - c]), pg = P dy, dz = pg (v - y).
    - NEED_DX (NCB * BLOCK_C = BLOCK_D >= D): dx[t] = sum_c pg + (sum_c dz) @
      W[g]^T, written once per token (zero where no window holds it);
    - NEED_DW (NCB = 1): pw[bh, i_p, :, block] = sum over the program's tokens
      x^T (sum_c dz);
    - NEED_PE (NCB = 1): pp[bh, i_p, 0 / 1, j, block] = column sums of dz / pg
      per position (pe's shares: v = x + pe[h, j] and z = x W + pe W).
    The sum of dz is rounded to x's dtype for the tensor-core dots (to tf32
    for float16: tf32_intermediate). Partial sums are summed by torch.
    """
    i_p, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_prog = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_k = tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_cb = tl.arange(0, BLOCK_C)
    o_l = tl.arange(0, L_PAD)
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    p_dy = dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh
    p_y = y + i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh
    p_l = lse + i_b.to(tl.int64) * slb + i_h.to(tl.int64) * slh
    p_w = w + i_g.to(tl.int64) * swg
    if NCB == 1:   # W's block loaded once: [BLOCK_D, BLOCK_C] and its transpose
        o_c1 = i_c * BLOCK_C + o_cb
        m_c1 = o_c1 < D
        b_w1 = tl.load(p_w + o_d[:, None] * swd + o_c1[None, :] * swc, mask=m_d[:, None] & m_c1[None, :], other=0.)
        b_wt1 = tl.load(p_w + o_c1[:, None] * swc + o_d[None, :] * swd, mask=m_c1[:, None] & m_d[None, :], other=0.)
        if DOT_F32:
            b_w1 = b_w1.to(tl.float32)
        if HID_TF32 or DOT_F32:
            b_wt1 = b_wt1.to(tl.float32)
    b_dw = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
    b_sz = tl.zeros([L_PAD, BLOCK_C], dtype=tl.float32)
    b_sd = tl.zeros([L_PAD, BLOCK_C], dtype=tl.float32)
    n_tiles = tl.cdiv(NQ, BLOCK_K)
    for i_t in range(i_p, n_tiles, n_prog):
        t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BLOCK_K + o_k, cu, ccu, cq, N, N_STEPS, T, W,
                                                               NQ, S, PRE, IS_VARLEN)
        for r in range(0, S):
            t = t_base + r
            m_t = m_q & (t >= bos) & (t < eos)
            b_x = tl.load(p_x + t[:, None] * sxt + o_d[None, :] * sxd, mask=m_t[:, None] & m_d[None, :],
                          other=0.)                                        # [BLOCK_K, BLOCK_D]
            if DOT_F32:
                b_x = b_x.to(tl.float32)
            b_dx = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
            for cb in range(0, NCB):   # not unrolled: W's block pointers stay inside the loop
                o_c = (i_c * NCB + cb) * BLOCK_C + o_cb
                m_c = o_c < D
                if NCB == 1:
                    b_w = b_w1
                else:
                    b_w = tl.load(p_w + o_d[:, None] * swd + o_c[None, :] * swc, mask=m_d[:, None] & m_c[None, :],
                                  other=0.)
                    if DOT_F32:
                        b_w = b_w.to(tl.float32)
                b_z = tl.dot(b_x, b_w, input_precision="ieee")             # [BLOCK_K, BLOCK_C] logits
                b_v = tl.load(p_x + t[:, None] * sxt + o_c[None, :] * sxd, mask=m_t[:, None] & m_c[None, :],
                              other=0.).to(tl.float32)                     # [BLOCK_K, BLOCK_C] values
                b_dzs = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
                b_pgs = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
                # phase r is position c*S + r < L of the window c chunks back: cdiv(L - r, S) of them
                for c in range(0, tl.cdiv(L - r, S)):
                    j = c * S + r
                    q_w = q - c
                    m_win = m_q & (q_w >= 0) & (q_w < n_win)
                    o_row = (win_base + q_w)[:, None]
                    m2 = m_win[:, None] & m_c[None, :]
                    b_g = tl.load(p_dy + o_row * sdw + o_c[None, :] * sdd, mask=m2, other=0.).to(tl.float32)
                    b_yw = tl.load(p_y + o_row * syw + o_c[None, :] * syd, mask=m2, other=0.).to(tl.float32)
                    b_lse = tl.load(p_l + o_row * slw + o_c[None, :] * sld, mask=m2, other=0.)
                    b_vj = b_v
                    if HAS_PE:
                        # z + cpe - lse as z - (lse - cpe): an add to the dot's result would be folded into
                        # its accumulator, and the dot recomputed for every c
                        b_lse -= tl.load(cpe + i_h.to(tl.int64) * L * D + j * D + o_c, mask=m_c, other=0.)[None, :]
                        b_vj += tl.load(pe + i_h.to(tl.int64) * sph + j * spj + o_c * spd, mask=m_c,
                                        other=0.).to(tl.float32)[None, :]
                    # where, not a zero dy: exp of a missing window's logit may be inf, and inf * 0 is NaN
                    b_pg = tl.where(m2, tl.exp(b_z - b_lse) * b_g, 0.)
                    b_dz = tl.where(m2, b_pg * (b_vj - b_yw), 0.)
                    b_dzs += b_dz
                    b_pgs += b_pg
                    if NEED_PE:
                        hit = (o_l == j)[:, None]
                        b_sz += tl.where(hit, tl.sum(b_dz, axis=0)[None, :], 0.)
                        b_sd += tl.where(hit, tl.sum(b_pg, axis=0)[None, :], 0.)
                if HID_TF32:
                    b_dzr = round_tf32(b_dzs)
                else:
                    b_dzr = b_dzs.to(x.dtype.element_ty)
                    if DOT_F32:
                        b_dzr = b_dzr.to(tl.float32)
                if NEED_DX:
                    if NCB == 1:   # BLOCK_C == BLOCK_D: the direct term is the dot's accumulator
                        if HID_TF32:
                            b_dx = tl.dot(b_dzr, b_wt1, b_pgs, input_precision="tf32")   # [BLOCK_K, BLOCK_D]
                        else:
                            b_dx = tl.dot(b_dzr, b_wt1, b_pgs, input_precision="ieee")
                    else:          # the block's direct term enters through an exact 0/1 dot
                        b_wt = tl.load(p_w + o_c[:, None] * swc + o_d[None, :] * swd,
                                       mask=m_c[:, None] & m_d[None, :], other=0.)     # [BLOCK_C, BLOCK_D]
                        if HID_TF32 or DOT_F32:
                            b_wt = b_wt.to(tl.float32)
                        if HID_TF32:
                            b_dx = tl.dot(b_dzr, b_wt, b_dx, input_precision="tf32")
                        else:
                            b_dx = tl.dot(b_dzr, b_wt, b_dx, input_precision="ieee")
                        b_eye = tl.where(o_c[:, None] == o_d[None, :], 1.0, 0.0)
                        if DOT_F32 or _INTERPRETED or x.dtype.element_ty == tl.float32:
                            b_dx = tl.dot(b_pgs, b_eye, b_dx, input_precision="ieee")
                        else:
                            # half input: pgs as three bfloat16 parts (8 + 8 + 8 significant bits hold
                            # float32's 24) through tensor-core dots with the 0/1 matrix, products exact;
                            # a float32 IEEE dot of [BLOCK_K, 128] x [128, BLOCK_D] spills at D = 192
                            b_eye = b_eye.to(tl.bfloat16)
                            b_hi = b_pgs.to(tl.bfloat16)
                            b_r = b_pgs - b_hi.to(tl.float32)
                            b_mid = b_r.to(tl.bfloat16)
                            b_lo = (b_r - b_mid.to(tl.float32)).to(tl.bfloat16)
                            b_dx = tl.dot(b_hi, b_eye, b_dx)
                            b_dx = tl.dot(b_mid, b_eye, b_dx)
                            b_dx = tl.dot(b_lo, b_eye, b_dx)
                if NEED_DW:
                    if HID_TF32:
                        b_dw = tl.dot(tl.trans(b_x.to(tl.float32)), b_dzr, b_dw, input_precision="tf32")
                    else:
                        b_dw = tl.dot(tl.trans(b_x), b_dzr, b_dw, input_precision="ieee")   # [BLOCK_D, BLOCK_C]
            if NEED_DX:
                tl.store(dx + i_b.to(tl.int64) * sgb + i_h.to(tl.int64) * sgh + t[:, None] * sgt
                         + o_d[None, :] * sgd, b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    o_prog = (i_bh.to(tl.int64) * n_prog + i_p)
    o_c = i_c * BLOCK_C + o_cb
    m_c = o_c < D
    if NEED_DW:
        tl.store(pw + o_prog * D * D + o_d[:, None] * D + o_c[None, :], b_dw, mask=m_d[:, None] & m_c[None, :])
    if NEED_PE:
        p_pp = pp + o_prog * 2 * L * D + o_l[:, None] * D + o_c[None, :]
        m_pp = (o_l < L)[:, None] & m_c[None, :]
        tl.store(p_pp, b_sz, mask=m_pp)
        tl.store(p_pp + L * D, b_sd, mask=m_pp)


# --------------------------------------------------------------------------- launch configurations


def _fwd_prune(configs, kw):
    """Tiles completing at least half their rows (BLOCK_K >= 2 C_PAD), not wider
    than D, whose three online-softmax states fit the register file without
    spilling on sm_90 (gpu_check --compile-only): C_PAD * BLOCK_K * BLOCK_C
    <= 32 float32 per thread each (8 for float32 input, whose IEEE dots
    hold their operands in registers). When C = ceil(L/S) is so large (S << L)
    that none does, one small tile (correct, but it spills)."""
    C_PAD, D = kw["C_PAD"], kw["D"]
    per = 8 if kw["x"].dtype == torch.float32 else 32
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= 2 * C_PAD
            and C_PAD * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_C"] <= per * 32 * c.num_warps
            and c.kwargs["BLOCK_C"] <= max(16, next_pow2(D))]
    if not kept:
        kept = [triton.Config({"BLOCK_K": max(16, 2 * C_PAD), "BLOCK_C": 16}, num_warps=8, num_stages=1)]
    return kept


def _bwd_prune(configs, kw):
    """Backward tiles that compile for sm_90 without spilling (gpu_check
    --compile-only): [BLOCK_K, BLOCK_D] float32 tiles of at most 16 elements
    per thread (8 for float32 input, whose IEEE dots hold operands in
    registers); with the dW accumulator [BLOCK_D, BLOCK_C], that plus four
    such tiles at most 128 (bfloat16, D = 128, GPU run 57: BLOCK_K 32 with 8
    warps 228 registers and no spill, 0.70 ms against 0.92 for BLOCK_K 16;
    with pe's column sums 16 spills, still 1.27 against 1.74 ms; 64 rows or 4
    warps spill more). The half-precision dx pass also needs BLOCK_K
    >= 4 * num_warps (at 16 rows and 8 warps its tensor-core tiles spill)."""
    BD, BC = kw["BLOCK_D"], kw["BLOCK_C"]
    f32 = kw["x"].dtype == torch.float32
    per = 8 if f32 else 16
    kept = [c for c in configs if c.kwargs["BLOCK_K"] * max(BD, BC) <= per * 32 * c.num_warps
            and (not kw["NEED_DW"] or BD * BC + 4 * c.kwargs["BLOCK_K"] * max(BD, BC) <= 128 * 32 * c.num_warps)
            and (f32 or not kw["NEED_DX"] or c.kwargs["BLOCK_K"] >= 4 * c.num_warps)]
    return kept or [triton.Config({"BLOCK_K": 16}, num_warps=8, num_stages=1)]


_FWD = Launcher(
    attention_pool_fwd_kernel,
    configs=[triton.Config({"BLOCK_K": bk, "BLOCK_C": bc}, num_warps=nw, num_stages=st)
             for bk, bc, nw, st in [(32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                                    (16, 128, 4, 2), (32, 64, 4, 3), (16, 64, 8, 2), (16, 64, 4, 2),
                                    (16, 32, 4, 2), (16, 16, 2, 2)]],
    key=["D", "C_PAD", "L", "S", "WORK", "BLOCK_D", "IS_VARLEN", "HAS_PE", "HAS_LSE", "DOT_F32"],
    interpret_meta=lambda kw: {"BLOCK_K": max(8, 2 * kw["C_PAD"]) if small_tiles_active() else max(32, 2 * kw["C_PAD"]),
                               "BLOCK_C": interpret_block(kw["D"], 64)},
    prune=_fwd_prune)
_BWD = Launcher(
    attention_pool_bwd_kernel,
    configs=[triton.Config({"BLOCK_K": bk}, num_warps=nw, num_stages=st)
             for bk, nw, st in [(32, 8, 2), (32, 8, 3), (16, 8, 2), (16, 4, 2), (64, 8, 2), (64, 8, 3)]],
    key=["D", "L", "S", "WORK", "BLOCK_C", "BLOCK_D", "NCB", "IS_VARLEN", "HAS_PE", "NEED_DX", "NEED_DW", "NEED_PE",
         "HID_TF32", "DOT_F32"],
    interpret_meta=lambda kw: {"BLOCK_K": interpret_block(kw["NQ"], 32)},
    prune=_bwd_prune)


# the interpreter's bfloat16 tl.dot is wrong (test_interpreter_bf16_dot_defect): the blocked dx
# pass adds its direct term through a float32 dot there, whatever the input dtype
_INTERPRETED = tl.constexpr(INTERPRET)
# the half-precision dx pass covers at most this many features per block (NCB blocks beyond)
DX_MAX_C = 128
# the backward computes dx and dW in one pass up to this D (its dW accumulator [D, D] and the
# [BLOCK_K, D] tiles then fit the register file); beyond, one pass for dx and one for dW
FUSED_MAX_D = 64


@dataclass(frozen=True)
class BwdBlocks:
    """Feature blocking of the backward for one call. BD = next_pow2(D) >= 16
    covers every feature (the logits x @ W and dx need all of them).
    fused: one pass (dx, dW, pe sums) with BLOCK_C = BD. Else a dx pass with
    NCB blocks of dx_c (NCB > 1 for float32, whose IEEE dots keep their
    operands in registers, and for D > DX_MAX_C, where W's [BD, BD] block and
    its transpose would need over 227 KB of shared memory: 270 KB at D = 192
    in bfloat16, GPU run 3) and a dW / pe-sums pass over feature blocks of dw_c.
    """

    BD: int
    fused: bool
    dx_c: int
    ncb: int
    dw_c: int


def bwd_blocks(D: int, dtype: torch.dtype) -> BwdBlocks:
    """The backward's blocking (sm_90 register budget, gpu_check --compile-only:
    dW accumulator BD * dw_c <= 16384 float32, 8192 for float32 input). In the
    interpreter: fused with large tiles; split with small tiles (dw_c = 8, and
    float32's dx in blocks of 8), so tests reach every path."""
    BD = max(16, next_pow2(D))
    f32 = dtype == torch.float32
    if INTERPRET:
        if not small_tiles_active():
            return BwdBlocks(BD, True, BD, 1, BD)
        dx_c = 8 if f32 else BD // 2     # both dtypes reach the blocked dx pass (NCB > 1)
        return BwdBlocks(BD, False, dx_c, BD // dx_c, 8)
    dx_c = min(BD, 32) if f32 else min(BD, DX_MAX_C)
    dw_c = min(BD, (8192 if f32 else 16384) // BD, 32 if f32 else BD)
    return BwdBlocks(BD, BD <= FUSED_MAX_D, dx_c, BD // dx_c, dw_c)


# --------------------------------------------------------------------------- host side


def _pe_logits(pe, weight, H):
    """cpe (H, L, D) float32: pe[h, j] @ weight[g] for every position (IEEE
    float32 multiply-adds, head_gemv), the logits' share of pe."""
    Hh, L, D = pe.shape
    G = weight.shape[0]
    pe2 = pe.reshape(H * L, D)                                       # a copy only if pe's strides need one
    return head_gemv(H * L, pe2, (pe2.stride(0), 0, pe2.stride(1)), 1, weight,
                     (weight.stride(0), 0, weight.stride(1), 0, weight.stride(2)), (H // G) * L,
                     D, D, D, D).view(H, L, D)


def _forward(x, weight, pe, plan, need_lse, cpe=None):
    """(y (B, H, W, D) in x's dtype, stats, cpe): stats (B, H, W, 2, D)
    float32, [..., 0, :] the log-sum-exp and [..., 1, :] y unrounded, if
    need_lse, else (0,); cpe (H, L, D) float32, pe's logits (``_pe_logits``,
    computed here unless given; None without pe or windows), which an eager
    backward takes from the forward instead of launching its kernel again."""
    B, H, T, D = x.shape
    y = empty((B, H, plan.W, D), dtype=x.dtype, device=x.device)
    stats = empty((B, H, plan.W, 2, D), dtype=torch.float32, device=x.device) if need_lse else x.new_empty(0)
    if y.numel() == 0:
        return y, stats, cpe
    lse, y32 = (stats[:, :, :, 0], stats[:, :, :, 1]) if need_lse else (None, None)
    if cpe is None and pe is not None:
        cpe = _pe_logits(pe, weight, H)
    key = (x.shape, x.stride(), weight.shape, weight.stride(), None if pe is None else (pe.shape, pe.stride()),
           x.dtype, plan.varlen, *plan.seq_args()[3:], need_lse)
    launch = _FWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_FWD_LAUNCH, key, _fwd_launch(x, weight, pe, y, lse, plan, need_lse))
    ints, grid, constexprs = launch
    _FWD(grid, x, weight, cpe if cpe is not None else x, pe if pe is not None else x, y, lse if need_lse else y,
         y32 if need_lse else y, plan.cu, plan.ccu, plan.cq, *ints, **constexprs)
    return y, stats, cpe


# The launches' arguments after their tensors, their grids and constexprs depend only on shapes, strides,
# dtypes, the plan's sizes and the flags: built once per key (``_fwd_launch``, ``_bwd_launch``) instead of
# named arguments and stride dicts on every call (host time, issue 14 item 2; as the pools, gated_pool and
# linear do). Each kernel takes its tensors first, in this order.
assert attention_pool_fwd_kernel.runtime_args[:10] == ("x", "w", "cpe", "pe", "y", "lse", "y32", "cu", "ccu", "cq")
assert attention_pool_bwd_kernel.runtime_args[:13] == ("x", "w", "cpe", "pe", "dy", "y", "lse", "dx", "pw", "pp",
                                                       "cu", "ccu", "cq")
_FWD_LAUNCH: dict[tuple, tuple] = {}
_BWD_LAUNCH: dict[tuple, tuple] = {}


def _fwd_launch(x, weight, pe, y, lse, plan, need_lse):
    """(integer arguments, grid, constexprs) of ``_forward``'s launch; lse: the
    statistics' log-sum-exp view (None without need_lse)."""
    B, H, T, D = x.shape
    G = weight.shape[0]
    rows = plan.NQ if plan.varlen else plan.W
    C = plan.C
    args = kernel_args(attention_pool_fwd_kernel, x=x, w=weight, cpe=x, pe=pe if pe is not None else x, y=y, lse=y,
                       y32=y, **plan.seq_kwargs(), **strides("sx", x, "bhtd"), **strides("sw", weight, "gdc"),
                       **strides("sp", pe, "hjd"), **strides("sy", y, "bhwd"),
                       **strides("sl", lse if need_lse else None, "bhwd"), H=H, HG=H // G, D=D, C=C,
                       WORK=size_class(B * H * plan.NQ))
    return (args[10:], lambda meta: (cdiv(rows, meta["BLOCK_K"] - C + 1), cdiv(D, meta["BLOCK_C"]), B * H),
            dict(C_PAD=plan.C_PAD, BLOCK_D=max(16, next_pow2(D)), IS_VARLEN=plan.varlen, HAS_PE=pe is not None,
                 HAS_LSE=need_lse, DOT_F32=dot_f32(x.dtype)))


def bwd_programs(nq: int, rows: int, sms: int) -> int:
    """Programs per (b, h) row of the backward on a GPU with ``sms``
    multiprocessors: about two per SM over all ``rows`` = B*H rows, at most
    one per 16 of the ``nq`` chunk rows, at least one (also for an empty
    batch, rows = 0: GPU run 5 found the division by zero)."""
    return max(1, min(cdiv(nq, 16), cdiv(2 * sms, max(rows, 1))))


def _backward(dy, y, stats, x, weight, pe, plan, need_x, need_w, need_pe, cpe=None):
    """stats: ``_forward``'s (empty: recomputed here); y, the rounded output, is not read; cpe: the
    forward's pe logits if it kept them (else computed here)."""
    B, H, T, D = x.shape
    G = weight.shape[0]
    HG = H // G
    L = plan.L
    dev = x.device
    dx = empty_like(x) if need_x else x.new_empty(0)
    dw = x.new_empty(0)
    dpe = x.new_empty(0)
    if stats.dim() != 5:   # the forward ran without autograd: recompute the statistics (empty if y is)
        _, stats, cpe = _forward(x, weight, pe, plan, True, cpe)
    lse, y = stats[:, :, :, 0], stats[:, :, :, 1]         # y: the output unrounded, float32
    if cpe is None and pe is not None:
        cpe = _pe_logits(pe, weight, H)
    need_pe_sums = pe is not None and (need_pe or need_w)
    run = B * H * plan.NQ * D > 0
    n_prog, launches = 1, ()
    if run:
        key = (x.shape, x.stride(), weight.shape, weight.stride(), None if pe is None else (pe.shape, pe.stride()),
               dy.stride(), x.dtype, dev, plan.varlen, *plan.seq_args()[3:], need_x, need_w, need_pe_sums,
               small_tiles_active())
        launch = _BWD_LAUNCH.get(key)
        if launch is None:
            launch = cache_put(_BWD_LAUNCH, key, _bwd_launch(dy, y, lse, x, weight, pe, dx, plan, need_x, need_w,
                                                              need_pe_sums))
        n_prog, launches = launch
    pw = empty((B * H, n_prog, D, D), dtype=torch.float32, device=dev) if need_w and run else x
    pp = empty((B * H, n_prog, 2, L, D), dtype=torch.float32, device=dev) if need_pe_sums and run else x
    for ints, grid, constexprs, with_dx in launches:
        _BWD(grid, x, weight, cpe if cpe is not None else x, pe if pe is not None else x, dy, y, lse,
             dx if with_dx else x, pw, pp, plan.cu, plan.ccu, plan.cq, *ints, **constexprs)
    if not run and need_x:
        dx.zero_()
    sz = sd = None
    if need_pe_sums:
        if run:
            s = pp.view(B, H, n_prog, 2, L, D).sum(dim=(0, 2))                          # [H, 2, L, D]
            sz, sd = s[:, 0], s[:, 1]
        else:
            sz = sd = torch.zeros((H, L, D), dtype=torch.float32, device=dev)
    if need_w:
        if run:
            g = pw.view(B, G, HG, n_prog, D, D).sum(dim=(0, 2, 3))                       # [G, D, D]
        else:
            g = torch.zeros((G, D, D), dtype=torch.float32, device=dev)
        if pe is not None:   # v = x + pe: pe's share sum_{h in g, j} pe[h, j]^T sz[h, j]
            # bmm, not the equal einsum "hjd,hjc->hdc": ~15 us less host time (einsum's path parsing, on the CPU)
            g = g + torch.bmm(pe.double().transpose(1, 2), sz.double()).view(G, HG, D, D).sum(1).float()
        dw = g.to(x.dtype)
    if need_pe:   # dpe[h, j] = sd[h, j] + sz[h, j] @ W[g]^T
        sz2 = sz.reshape(H * L, D)
        szw = head_gemv(H * L, sz2, (sz2.stride(0), 0, sz2.stride(1)), 1, weight,
                        (weight.stride(0), 0, weight.stride(2), 0, weight.stride(1)), HG * L, D, D, D, D)
        dpe = (sd + szw.view(H, L, D)).to(x.dtype)
    return dx, dw, dpe


def _bwd_launch(dy, y, lse, x, weight, pe, dx, plan, need_x, need_w, need_pe_sums):
    """(programs per (b, h) row, the launches of ``_backward``: each (integer
    arguments, grid, constexprs, whether it writes dx)). One fused launch, or
    dx over all features then dW and pe's sums in feature blocks
    (``bwd_blocks``)."""
    B, H, T, D = x.shape
    G = weight.shape[0]
    L = plan.L
    bb = bwd_blocks(D, x.dtype)
    # programs per (b, h) row, each running tiles i_p, i_p + n_prog, ...: fill the GPU twice; in the
    # interpreter one (its cost is per op), two with small tiles so tests reach the strided tile loop
    if INTERPRET:
        n_prog = 2 if small_tiles_active() else 1
    else:
        n_prog = bwd_programs(plan.NQ, B * H, num_sms(x.device, cpu=2))
    common = dict(x=x, w=weight, cpe=x, pe=pe if pe is not None else x, dy=dy, y=y, lse=lse, pw=x, pp=x,
                  **plan.seq_kwargs(), **strides("sx", x, "bhtd"), **strides("sw", weight, "gdc"),
                  **strides("sp", pe, "hjd"), **strides("sd", dy, "bhwd"), **strides("sy", y, "bhwd"),
                  **strides("sl", lse, "bhwd"), H=H, HG=H // G, D=D, WORK=size_class(B * H * plan.NQ))

    def one(grid_c, block_c, ncb, need_dx, need_dw, need_p):
        args = kernel_args(attention_pool_bwd_kernel, **common, dx=dx if need_dx else x,
                           **strides("sg", dx if need_dx else x, "bhtd"))
        return (args[13:], lambda meta: (n_prog, grid_c, B * H),
                dict(BLOCK_C=block_c, BLOCK_D=bb.BD, NCB=ncb, L_PAD=next_pow2(L), IS_VARLEN=plan.varlen,
                     HAS_PE=pe is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_PE=need_p,
                     HID_TF32=tf32_intermediate(x.dtype), DOT_F32=dot_f32(x.dtype)), need_dx)

    launches = []
    if bb.fused:
        if need_x or need_w or need_pe_sums:
            launches.append(one(1, bb.BD, 1, need_x, need_w, need_pe_sums))
    else:   # dx over all features, then dW and pe's sums in feature blocks
        if need_x:
            launches.append(one(1, bb.dx_c, bb.ncb, True, False, False))
        if need_w or need_pe_sums:
            launches.append(one(cdiv(D, bb.dw_c), bb.dw_c, 1, False, need_w, need_pe_sums))
    return n_prog, tuple(launches)


# --------------------------------------------------------------------------- torch.library


def _op_forward(x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows, need_lse):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    y, stats, cpe = _forward(x, weight, pe, plan, need_lse)
    return (y, stats), (plan, cpe)      # an eager backward takes the plan and pe's logits (H, L, D)


def _op_backward(dy, y, stats, x, weight, pe, cu_seqlens, block_size, stride, padding, need_x, need_w, need_pe,
                 state):
    plan, cpe = state if state is not None else (None, None)
    plan = backward_plan(plan, dy, x, cu_seqlens, block_size, stride, padding)
    return _backward(dy, y, stats, x, weight, pe, plan, need_x, need_w, need_pe, cpe)


def _fake(x, cu_seqlens, block_size, stride, padding, total_windows, need_lse, **_):
    y = window_fake(x, x.shape[3], cu_seqlens=cu_seqlens, block_size=block_size, stride=stride, padding=padding,
                    total_windows=total_windows)
    B, H, W, D = y.shape
    return y, (x.new_empty((B, H, W, 2, D), dtype=torch.float32) if need_lse else x.new_empty(0))


# x (B, H, T, D) any strides, weight (G, D, D), pe (H, L, D) or None -> (y (B, H, W, D) contiguous,
# stats (B, H, W, 2, D) float32 (log-sum-exp, y unrounded) if need_lse else (0,)); a backward given empty
# stats recomputes them
_attention_pool = kernel_op(
    "kvcompress::attention_pool_triton",
    inputs=f"Tensor x, Tensor weight, Tensor? pe, {WINDOW_INPUTS}, SymInt total_windows, bool need_lse",
    outputs=("y", "stats"), grads={"x": "need_x", "weight": "need_w", "pe": "need_pe"},
    saved=("y", "stats", "x", "weight", "pe", *WINDOW_SAVED), forward=_op_forward, fake=_fake, backward=_op_backward)


@register("attention_pool", "triton", devices=DEVICES, dtypes=DTYPES, priority=10, available=triton_available,
          supports=supports_call, auto_devices=("cuda",), emulated_devices=("cpu",), precision="io-intermediates")
def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
                   total_windows=None):
    """Attention pooling (one softmax over window positions per feature),
    Triton kernels (arguments already validated by
    ``kvcompress.functional.attention_pool``).

    x: (B, H, T, D) float16/bfloat16/float32, any strides (never copied);
    weight: (G, D, D); pe: (H, L, D) or None; cu_seqlens: (N+1,) int32/int64
    or None. total_windows: with cu_seqlens, the packed output size if known
    (no device read then), default None. Returns (B, H, W, D) in x's dtype.
    Differentiable in x, weight and pe; when one of them requires grad the
    forward also stores the per-window log-sum-exp and the output unrounded,
    (B, H, W, 2, D) float32. Logits are float32 (IEEE dots for float32),
    never rounded to x's dtype. Precision class (SPEC 3c) io-intermediates:
    the backward rounds the logit gradient to x's dtype (float16: tf32) as
    the operand of its tensor-core dots (docs/semantics.md).

    Raises TypeError/ValueError for a malformed total_windows.
    """
    total = total_windows_arg("attention_pool", total_windows, cu_seqlens)
    need_lse = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or (pe is not None and pe.requires_grad))
    y, _ = _attention_pool(x, weight, pe, cu_seqlens, block_size, stride, padding, total, need_lse)
    return y


__all__ = ["attention_pool", "attention_pool_bwd_kernel", "attention_pool_fwd_kernel"]
