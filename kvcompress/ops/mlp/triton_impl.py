"""mlp, Triton: the per-window two-layer MLP with its hidden layer kept on
chip (docs/triton.md, "mlp"). Registered as backend "triton" (CUDA; CPU
tensors too under TRITON_INTERPRET=1, never picked by "auto" there).

- Forward (``mlp_fwd_kernel``): for a tile of windows, the first layer is
  linear's implicit GEMM over (window position, D block) with w1 seen as
  (G, L, D, F); each F tile of the pre-activation goes through the
  activation and straight into the second GEMM's accumulator, so the hidden
  layer never reaches device memory.
- Backward: ``mlp_bwd_kernel_dp`` recomputes the pre-activation p per
  (window tile, F tile), forms dp = (dy @ w2^T) * act'(p) and stores dp and
  the hidden layer act(p) (B, H, W, F), one group chunk at a time;
  dw2 = hid^T dy is linear's weight-gradient kernel over the stored hidden
  layer. dp is the incoming gradient of the first layer, a ``linear`` with
  weight w1: its x-gradient and weight gradient are linear's kernels
  (``linear_bwd_kernel_dx``/``_dw``) launched with F as D_out.

The op is ``torch.ops.kvcompress.mlp_triton`` (fake implementation and
autograd registered, ``_custom_op.kernel_op``), so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque node; eager calls run the same functions
through an ``autograd.Function`` instead (``eager_call``: no op dispatch).
"""

from __future__ import annotations

import dataclasses

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
from .._triton.lang import round_tf32, window_gemm, window_rows
from .._triton.launch import (
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
from ..linear.triton_impl import dw_launcher, dx_launcher, dx_phase_per, weight_grad, x_grad

ACTIVATIONS = ("relu", "gelu", "silu")
# dp, the first layer's incoming gradient, is stored for this many bytes of
# groups at a time (at least one group): bounds the backward's extra memory
# (docs/triton.md, "mlp: memory"); tests lower it to reach the chunked path
DP_CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------- activations


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) in float32; ACT 0 relu, 1 gelu (exact, erf), 2 silu."""
    if ACT == 0:
        # not where(z > 0, z, 0): a NaN pre-activation must stay NaN (SPEC section 3, NaN locality)
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z) in float32: relu 1[z > 0]; gelu Phi(z) + z phi(z); silu s (1 + z (1 - s))."""
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


# --------------------------------------------------------------------------- kernels


@jit_kernel
def mlp_fwd_kernel(x, w1, cst, w2, b2, y, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                   sxb, sxh, sxt, sxd, s1g, s1k, s1f, scg, scf, s2g, s2f, s2n, sbg, sbn, sys, syb, syh, syw, syd,
                   H, HG, HG_C, D, F, DO, F_CHUNK, WORK,
                   BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_CONST: tl.constexpr, HAS_B2: tl.constexpr,
                   HID_TF32: tl.constexpr, DOT_F32: tl.constexpr, SPLIT_F: tl.constexpr):
    """y[w] = act(flat(X_w) @ w1[g] + cst[h // HG_C]) @ w2[g] + b2[g] for a tile
    of BLOCK_W windows and BLOCK_N outputs. Grid (window tiles, D_out blocks
    x F splits, B*H).

    Split F (small problems, ``fwd_splits``): program split i_s sums the
    hidden units [i_s * F_CHUNK, (i_s + 1) * F_CHUNK) only and stores its
    float32 partial at y + i_s * sys (the caller sums the splits in a fixed
    order and adds b2); one split (SPLIT_F false: F_CHUNK and sys unused)
    stores y itself, compiled without the split's index arithmetic (which
    costs the largest tile a register spill).

    Per F tile: the pre-activation [BLOCK_W, BLOCK_F] accumulates over the
    K loop (j, D block) exactly as linear's forward (A tile: the token rows
    t0(w) + j, S tokens apart, pad rows masked to 0; B tile: w1[g, j*D + d, f]);
    then the activation in float32, the hidden tile rounded to x's dtype
    (SPEC permits storing the hidden layer in the input dtype; the tensor
    cores take it so) and fed from registers into the second dot. cst: b1
    and pe's share flat(pe[h]) @ w1[g] (pe folded). WORK: autotuning key only.
    """
    i_w, i_ns, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if SPLIT_F:
        NB = tl.cdiv(DO, BLOCK_N)
        i_n, i_s = i_ns % NB, i_ns // NB
        f_lo = tl.multiple_of(i_s * F_CHUNK, 128)         # F_CHUNK: a multiple of F_SPLIT_ALIGN = 128
        f_hi = tl.minimum(F, f_lo + F_CHUNK)
    else:
        i_n, i_s = i_ns, 0
        f_lo, f_hi = 0, F
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_w = i_w * BLOCK_W + tl.arange(0, BLOCK_W)
    t0, bos, m_w = window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN)      # [BLOCK_W]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < DO
    o_f = tl.arange(0, BLOCK_F)
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    p_w1 = w1 + i_g.to(tl.int64) * s1g
    p_w2 = w2 + i_g.to(tl.int64) * s2g + o_n[None, :] * s2n                             # [1, BLOCK_N]
    b_y = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        o_ff = f0 + o_f                                                                  # [BLOCK_F]
        # every BLOCK_F divides F_CHUNK, so a tile ends inside its chunk or at F: masking against F
        # (specialised) rather than f_hi keeps w1's loads vectorised (with f_hi, the split kernel ran
        # at 140 TFLOP/s against 340 unsplit, GPU runs 13 and 16)
        m_ff = o_ff < F
        # the pre-activation: w1[g] seen as (L, D, F), row j*D + d
        b_p = window_gemm(tl.zeros([BLOCK_W, BLOCK_F], dtype=tl.float32), p_x, t0, bos, m_w, sxt, sxd,
                          p_w1 + o_ff[None, :] * s1f, D * s1k, s1k, m_ff, L, D, BLOCK_D, DOT_F32)
        if HAS_CONST:
            b_p += tl.load(cst + (i_h // HG_C).to(tl.int64) * scg + o_ff * scf, mask=m_ff,
                           other=0.).to(tl.float32)[None, :]
        b_w2 = tl.load(p_w2 + o_ff[:, None] * s2f, mask=m_ff[:, None] & m_n[None, :], other=0.)
        if HID_TF32:   # float16: the hidden rounded to tf32, not into float16's subnormals (tf32_intermediate)
            b_y = tl.dot(round_tf32(_act(b_p, ACT)), b_w2.to(tl.float32), b_y, input_precision="tf32")
        else:
            b_h = _act(b_p, ACT).to(x.dtype.element_ty)                                  # [BLOCK_W, BLOCK_F]
            if DOT_F32:
                b_h, b_w2 = b_h.to(tl.float32), b_w2.to(tl.float32)
            b_y = tl.dot(b_h, b_w2, b_y, input_precision="ieee")                         # [BLOCK_W, BLOCK_N]
    if HAS_B2:
        b_y += tl.load(b2 + i_g.to(tl.int64) * sbg + o_n * sbn, mask=m_n, other=0.).to(tl.float32)[None, :]
    p_y = y + i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh + o_w[:, None].to(tl.int64) * syw + o_n[None, :] * syd
    if SPLIT_F:
        p_y += i_s.to(tl.int64) * sys
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_w[:, None] & m_n[None, :])


@jit_kernel
def mlp_bwd_kernel_dp(x, w1, cst, w2, dy, dp, hid, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                      sxb, sxh, sxt, sxd, s1g, s1k, s1f, scg, scf, s2g, s2f, s2n, sdb, sdh, sdw, sdn,
                      spb, sph, spw, spf, shb, shh, shw, shf,
                      H, HG, HG_C, D, F, DO, WORK,
                      BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr,
                      ACT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_CONST: tl.constexpr,
                      NEED_DP: tl.constexpr, NEED_H: tl.constexpr, HID_TF32: tl.constexpr,
                      DOT_F32: tl.constexpr):
    """For a tile of BLOCK_W windows of head (b, h) and BLOCK_F hidden units:
    recompute p = flat(X) @ w1[g] + cst (the forward's K loop), then

    - NEED_DP: dp = (dy @ w2[g]^T) * act'(p) (K loop over D_out in BLOCK_N
      blocks), stored in x's dtype (B, H, W, F): the first layer's incoming
      gradient;
    - NEED_H: the hidden layer act(p), rounded as the forward rounds it (x's
      dtype; float16: float32 rounded to tf32), stored (B, H, W, F) for
      dw2 = hid^T dy, which linear's weight-gradient kernel forms.

    Grid (window tiles, F tiles, B*H), the forward's. Storing the hidden layer
    here (the backward may; the forward never does) frees this kernel of a
    dw2 accumulator held across all rows: its tiles are the forward's size
    (GPU run 22).
    """
    i_w, i_f, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_w = i_w * BLOCK_W + tl.arange(0, BLOCK_W)
    t0, bos, m_w = window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN)      # [BLOCK_W]
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = o_f < F
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    b_p = window_gemm(tl.zeros([BLOCK_W, BLOCK_F], dtype=tl.float32), p_x, t0, bos, m_w, sxt, sxd,
                      w1 + i_g.to(tl.int64) * s1g + o_f[None, :] * s1f, D * s1k, s1k, m_f, L, D, BLOCK_D, DOT_F32)
    if HAS_CONST:
        b_p += tl.load(cst + (i_h // HG_C).to(tl.int64) * scg + o_f * scf, mask=m_f, other=0.).to(tl.float32)[None, :]
    m_out = m_w[:, None] & m_f[None, :]
    o_wl = o_w[:, None].to(tl.int64)
    if NEED_DP:
        p_dy = dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + o_wl * sdw                  # [BLOCK_W, 1]
        p_w2 = w2 + i_g.to(tl.int64) * s2g + o_f[None, :] * s2f                                  # [1, BLOCK_F]
        b_gh = tl.zeros([BLOCK_W, BLOCK_F], dtype=tl.float32)
        for n0 in range(0, DO, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < DO
            b_dy = tl.load(p_dy + o_n[None, :] * sdn, mask=m_w[:, None] & m_n[None, :], other=0.)  # [BLOCK_W, BLOCK_N]
            b_w2t = tl.load(p_w2 + o_n[:, None] * s2n, mask=m_n[:, None] & m_f[None, :], other=0.)  # [BLOCK_N, BLOCK_F]
            if DOT_F32:
                b_dy, b_w2t = b_dy.to(tl.float32), b_w2t.to(tl.float32)
            b_gh = tl.dot(b_dy, b_w2t, b_gh, input_precision="ieee")
        b_dp = b_gh * _act_grad(b_p, ACT)
        p_dp = dp + i_b.to(tl.int64) * spb + i_h.to(tl.int64) * sph + o_wl * spw + o_f[None, :] * spf
        tl.store(p_dp, b_dp.to(dp.dtype.element_ty), mask=m_out)
    if NEED_H:
        b_h = _act(b_p, ACT)
        if HID_TF32:
            b_h = round_tf32(b_h)
        p_h = hid + i_b.to(tl.int64) * shb + i_h.to(tl.int64) * shh + o_wl * shw + o_f[None, :] * shf
        tl.store(p_h, b_h.to(hid.dtype.element_ty), mask=m_out)


# --------------------------------------------------------------------------- launch configurations


def block_n(DO: int) -> int:
    """The D_out block of the fused kernels (fixed on the host: the second
    GEMM's accumulator [BLOCK_W, BLOCK_N] stays in registers across the whole
    F loop, so D_out beyond it costs a recomputation of the first layer per
    block)."""
    if INTERPRET:
        return interpret_block(DO, 32)
    return min(256, max(16, next_pow2(DO)))


def dp_block_n(DO: int) -> int:
    """The D_out block of the dp kernel's K loop over D_out (dy @ w2^T)."""
    if INTERPRET:
        return interpret_block(DO, 32)
    return min(64, max(16, next_pow2(DO)))


def _is_f32(kw, name):
    return kw[name].dtype == torch.float32


def _fused_prune(configs, kw, kernel):
    """Tiles not overshooting D and F, whose float32 accumulators fit the
    register file without spilling on sm_90 (gpu_check --compile-only):
    per thread, the forward holds [BLOCK_W, BLOCK_N] + [BLOCK_W, BLOCK_F]
    (at most 128 for bfloat16, 96 for float16 whose second dot takes
    float32 operands, 48 for float32 whose IEEE dots keep their operands in
    registers; 16 less for the F-split variant, SPLIT_F); the dp kernel
    holds p and dy @ w2^T, both [BLOCK_W, BLOCK_F] (at most 128; 16 for
    float32, where 32 spilled 24 bytes)."""
    D, F, BN = kw["D"], kw["F"], kw["BLOCK_N"]
    dt = kw["x"].dtype
    f32 = dt == torch.float32
    big = D >= 64 and F >= 64
    out = []
    for c in configs:
        BW, BD, BF = c.kwargs["BLOCK_W"], c.kwargs["BLOCK_D"], c.kwargs["BLOCK_F"]
        threads = 32 * c.num_warps
        if kernel == "fwd":
            cap = {torch.bfloat16: 128, torch.float16: 96}.get(dt, 48)
            if kw.get("SPLIT_F"):      # the split's index arithmetic: the 128-per-thread tile spills 8 bytes
                cap -= 16
            fits = (BW * BN + BW * BF) / threads <= cap
        else:
            # p and dy @ w2^T, both [BLOCK_W, BLOCK_F]; the dot operands of float32 stay in registers
            fits = 2 * BW * BF / threads <= (16 if f32 else 128)
        if fits and BD <= max(16, next_pow2(D)) and BF <= max(16, next_pow2(F)) \
                and not (big and min(BD, BF) < 32) and (not f32 or BD <= 32):
            out.append(c)
    return out


def _linear_prune(configs, kw, rows):
    """linear's kernels run with F as D_out: tiles not overshooting D and F;
    float32 only tiles that fit the register file without spilling (gpu_check
    --compile-only): rows x the wider block at most 16 per thread."""
    D, F = kw["D"], kw["DO"]
    f32 = kw["x" if "x" in kw else "dy"].dtype == torch.float32
    big = D >= 64 and F >= 64
    return [c for c in configs if c.kwargs["BLOCK_D"] <= max(16, next_pow2(D))
            and c.kwargs["BLOCK_N"] <= max(16, next_pow2(F))
            and not (big and min(c.kwargs["BLOCK_D"], c.kwargs["BLOCK_N"]) < 32)
            and (not f32 or c.kwargs[rows] * max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]) <= 16 * 32 * c.num_warps)]


# (BLOCK_W, BLOCK_D, BLOCK_F, warps, stages): sized for D = D_out = 128, F = 4096 (NSA, the seed's
# GroupedMLP with expand 1) and smaller dims; the dp kernel tiles as the forward, and with its one
# accumulator at a time also takes a 128-wide K step (its NSA pick, GPU run 25: 750 -> 699 us; the
# forward's second accumulator spills there)
_FWD = Launcher(
    mlp_fwd_kernel,
    configs=tile_configs(("BLOCK_W", "BLOCK_D", "BLOCK_F"),
                 [(128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 8, 4),
                  (64, 64, 128, 8, 3), (64, 64, 64, 4, 3), (64, 32, 64, 8, 3), (32, 32, 64, 4, 3),
                  (32, 32, 32, 4, 2), (16, 16, 16, 2, 2)]),
    key=["D", "F", "DO", "L", "S", "F_CHUNK", "WORK", "BLOCK_N", "ACT", "IS_VARLEN", "HAS_CONST", "HAS_B2",
         "HID_TF32", "DOT_F32", "SPLIT_F"],
    interpret_meta=lambda kw: {"BLOCK_W": interpret_block(kw["W"], 32), "BLOCK_D": interpret_block(kw["D"], 32),
                               "BLOCK_F": interpret_block(kw["F"], 32)},
    prune=lambda cs, kw: _fused_prune(cs, kw, "fwd"))
_DP = Launcher(
    mlp_bwd_kernel_dp,
    configs=tile_configs(("BLOCK_W", "BLOCK_D", "BLOCK_F"),
                 [(128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 8, 4),
                  (64, 64, 128, 8, 3), (64, 64, 64, 4, 3), (64, 32, 64, 8, 3), (32, 32, 64, 4, 3),
                  (32, 32, 32, 4, 2), (16, 16, 16, 2, 2), (128, 128, 128, 8, 3)]),
    key=["D", "F", "DO", "L", "S", "WORK", "BLOCK_N", "ACT", "IS_VARLEN", "HAS_CONST", "NEED_DP", "NEED_H",
         "HID_TF32", "DOT_F32"],
    interpret_meta=lambda kw: {"BLOCK_W": interpret_block(kw["W"], 32), "BLOCK_D": interpret_block(kw["D"], 32),
                               "BLOCK_F": interpret_block(kw["F"], 32)},
    prune=lambda cs, kw: _fused_prune(cs, kw, "dp"))
# linear's x-gradient with dy := dp (K = C * F) and weight gradient with dy := dp (N = F); dx's
# 128 x 128 x 128 tile is its NSA pick (GPU run 25: 710 -> 611 us); dw1's 4-stage and 128 x 256
# tiles did not beat (64, 128, 256, 8, 3) there and were left out
_DX = dx_launcher([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 128, 8, 3),
                   (64, 128, 128, 8, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 2), (16, 16, 16, 2, 2),
                   (128, 128, 128, 8, 3)],
                  lambda cs, kw: _linear_prune(cs, kw, "BLOCK_K"))
_DW1 = dw_launcher([(64, 128, 128, 8, 3), (64, 64, 128, 4, 3), (128, 128, 128, 8, 3), (64, 128, 256, 8, 3),
                    (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 32, 32, 4, 2), (16, 16, 16, 2, 2)],
                   lambda cs, kw: _linear_prune(cs, kw, "BLOCK_W"))
# dw2 = hid^T dy: linear's weight gradient with the stored hidden layer as tokens (L = S = 1, D := F)
# (no (32, 32, 32, 4, 2): with float16's float32 hidden layer it spilled 8 bytes, --compile-only)
_DW2 = dw_launcher([(64, 128, 128, 8, 3), (64, 64, 128, 4, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 3),
                    (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (16, 16, 16, 2, 2)],
                   lambda cs, kw: _linear_prune(cs, kw, "BLOCK_W"))


# the forward's F splits are multiples of this (every BLOCK_F divides it)
F_SPLIT_ALIGN = 128
# hidden units per split at least (fewer: the float32 partials' traffic outweighs the gain)
F_SPLIT_MIN = 512


def fwd_splits(rows: int, n_blocks: int, F: int, device) -> int:
    """F splits of the forward: 1 when its (window tile, D_out block, b*h)
    programs, counted at 128-window tiles, fill the GPU; else enough to,
    each split summing >= F_SPLIT_MIN hidden units, at most 16. At T = 8192
    (B = 1, H = 4) 16 programs would leave most SMs idle (GPU run 8: 1.09 ms
    against 0.134 for torch.compile of the seed). Filling the GPU once
    suffices: a split adds float32 partials' traffic."""
    want = fill_factor(cdiv(rows, 128) * n_blocks, num_sms(device, cpu=4))     # 4: as tuned since run 8
    return max(1, min(want, F // F_SPLIT_MIN, 16))


# --------------------------------------------------------------------------- host side


def _first_layer_constant(x, w1, b1, pe, L):
    """(cst, HG_C): what the kernels add to the pre-activation (cst (H, F)
    with HG_C = 1, (G, F) with HG_C = HG, or None).

    With pe, one float32 vector per head: flat(pe[h]) @ w1[g] + b1[g] (a pad
    token is 0 + pe[h, j], so pe's share is the same for every window of head
    h); else b1 itself per group, or nothing."""
    H, D = x.shape[1], x.shape[3]
    G, LD, F = w1.shape
    HG = H // G
    if pe is not None:
        cst = head_gemv(H, pe, pe.stride(), 1, w1, (w1.stride(0), D * w1.stride(1), w1.stride(1), 0, w1.stride(2)),
                        HG, L * D, D, F, F, bias=b1, bias_strides=b1.stride() if b1 is not None else (0, 0), hg_b=HG)
        return cst, 1
    if b1 is not None:
        return b1, HG
    return None, 1


def _forward(x, w1, b1, w2, b2, pe, plan, act):
    """(y (B, H, W, D_out) in x's dtype, contiguous; the first layer's
    constant ``(cst, HG_C)`` it used, None when it computed none), which an
    eager backward takes instead of computing it again."""
    B, H, T, D = x.shape
    G, LD, F = w1.shape
    DO = w2.shape[2]
    HG = H // G
    y = empty((B, H, plan.W, DO), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y, None
    cst, hg_c = const = _first_layer_constant(x, w1, b1, pe, plan.L)
    BN = block_n(DO)
    NB = cdiv(DO, BN)
    splits = fwd_splits(B * H * plan.W, NB, F, x.device)
    if splits > 1:       # chunks of whole F_SPLIT_ALIGN blocks; the last may be short, none empty
        chunk = cdiv(cdiv(F, splits), F_SPLIT_ALIGN) * F_SPLIT_ALIGN
        splits = cdiv(F, chunk)
    else:
        chunk = F
    # one split writes y; several write float32 partials (S, B, H, W, D_out), summed below in a fixed order
    out = y if splits == 1 else empty((splits, B, H, plan.W, DO), dtype=torch.float32, device=x.device)
    key = (x.shape, x.stride(), w1.shape, w1.stride(), None if cst is None else (cst.shape, cst.stride(), hg_c),
           w2.shape, w2.stride(), None if b2 is None else (b2.shape, b2.stride()), x.dtype, plan.varlen,
           *plan.seq_args()[3:], act, BN, splits, chunk)
    launch = _FWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_FWD_LAUNCH, key, _fwd_launch(x, w1, cst, hg_c, w2, b2, out, plan, act, BN, splits, chunk))
    ints, grid, constexprs = launch
    _FWD(grid, x, w1, cst if cst is not None else x, w2, b2 if b2 is not None else x, out, plan.cu, plan.ccu, plan.cq,
         *ints, **constexprs)
    if splits > 1:
        acc = out.sum(0)                                                       # (B, H, W, D_out) float32
        if b2 is not None:
            acc += b2.to(torch.float32).repeat_interleave(HG, 0)[None, :, None, :]
        y.copy_(acc)
    return y, const


# The launches' arguments after their tensors, their grid and constexprs depend only on shapes, strides,
# dtypes, the plan's sizes and the host's choices (tiles, splits, flags): built once per key
# (``_fwd_launch``, ``_dp_launch``) instead of ~50 named arguments a call (host time, issue 14 item 2).
# Each kernel takes its tensors first, in this order.
assert mlp_fwd_kernel.runtime_args[:9] == ("x", "w1", "cst", "w2", "b2", "y", "cu", "ccu", "cq")
assert mlp_bwd_kernel_dp.runtime_args[:10] == ("x", "w1", "cst", "w2", "dy", "dp", "hid", "cu", "ccu", "cq")
_FWD_LAUNCH: dict[tuple, tuple] = {}
_DP_LAUNCH: dict[tuple, tuple] = {}

def _fwd_launch(x, w1, cst, hg_c, w2, b2, out, plan, act, BN, splits, chunk):
    """(integer arguments, grid, constexprs) of ``_forward``'s launch; out: y or the F splits' partials."""
    B, H, T, D = x.shape
    G, LD, F = w1.shape
    DO = w2.shape[2]
    W, NB = plan.W, cdiv(DO, BN)
    o_strides = {"sys": 0, **strides("sy", out, "bhwd")} if splits == 1 else strides("sy", out, "sbhwd")
    args = kernel_args(mlp_fwd_kernel, x=x, w1=w1, cst=cst if cst is not None else x, w2=w2,
                       b2=b2 if b2 is not None else x, y=out, **plan.seq_kwargs(), **strides("sx", x, "bhtd"),
                       **strides("s1", w1, "gkf"), **strides("sc", cst, "gf"), **strides("s2", w2, "gfn"),
                       **strides("sb", b2, "gn"), **o_strides, H=H, HG=H // G, HG_C=hg_c, D=D, F=F, DO=DO,
                       F_CHUNK=chunk, WORK=size_class(B * H * W))
    return (args[9:], lambda meta: (cdiv(W, meta["BLOCK_W"]), NB * splits, B * H),
            dict(BLOCK_N=BN, ACT=ACTIVATIONS.index(act), IS_VARLEN=plan.varlen, HAS_CONST=cst is not None,
                 HAS_B2=b2 is not None and splits == 1, HID_TF32=tf32_intermediate(x.dtype),
                 DOT_F32=dot_f32(x.dtype), SPLIT_F=splits > 1))


def _groups_per_chunk(B, HG, W, F, G, elt) -> int:
    """Groups whose dp and hidden layer (B, HG, W, F), elt bytes a unit
    together, fit DP_CHUNK_BYTES (at least one group)."""
    per_group = max(1, B * HG * W * F * elt)
    return max(1, min(G, DP_CHUNK_BYTES // per_group))


def _backward(dy, x, w1, b1, w2, pe, plan, act, need_x, need_w1, need_b1, need_w2, need_b2, need_pe, const=None):
    """const: the forward's first-layer constant (``_forward``) if it kept it, else computed here."""
    B, H, T, D = x.shape
    G, LD, F = w1.shape
    DO = w2.shape[2]
    HG = H // G
    L, W = plan.L, plan.W
    dev, dt = x.device, x.dtype
    need_dp = need_x or need_w1 or need_b1 or need_pe
    hid_tf32 = tf32_intermediate(dt)
    hid_dt = torch.float32 if hid_tf32 else dt          # the hidden layer as the forward rounds it
    elt = (x.element_size() if need_dp else 0) + (hid_dt.itemsize if need_w2 else 0)
    gpc = _groups_per_chunk(B, HG, W, F, G, elt)
    # one chunk (the usual case) is the whole problem: the tensors themselves rather than views of them,
    # and db1, dpe taken from their computation rather than copied into a buffer
    whole = gpc >= G
    # a gradient not asked for is a fresh empty tensor (custom op outputs may not alias); db1 and dpe of one
    # chunk are made where they are computed (None until then)
    dx = empty_like(x) if need_x else x.new_empty(0)
    dw1 = empty(w1.shape, dtype=dt, device=dev) if need_w1 else x.new_empty(0)
    db1 = empty((G, F), dtype=dt, device=dev) if need_b1 and not whole else None if need_b1 else x.new_empty(0)
    dw2 = empty(w2.shape, dtype=dt, device=dev) if need_w2 else x.new_empty(0)
    if need_b2:    # the sum over a group's heads only when there is more than one (a sum of one is exact)
        db2 = dy.sum(dim=(0, 2), dtype=torch.float32)                                      # [H, D_out]
        db2 = (db2.view(G, HG, DO).sum(1) if HG > 1 else db2).to(dt)
    else:
        db2 = x.new_empty(0)
    dpe = empty((H, L, D), dtype=dt, device=dev) if need_pe and not whole else None if need_pe else x.new_empty(0)
    if not (need_dp or need_w2):
        return dx, dw1, db1, dw2, db2, dpe
    cst, hg_c = const if const is not None else _first_layer_constant(x, w1, b1, pe, L)
    for g0 in range(0, G, gpc):
        g1 = min(G, g0 + gpc)
        Gc, h0, h1 = g1 - g0, g0 * HG, g1 * HG
        if whole:
            xc, dyc, w1c, w2c, cc, pec, pc = x, dy, w1, w2, cst, pe, plan
        else:
            # the chunk is a sub-problem of whole groups: views, no copies
            xc, dyc, w1c, w2c = x[:, h0:h1], dy[:, h0:h1], w1[g0:g1], w2[g0:g1]
            cc = None if cst is None else (cst[h0:h1] if hg_c == 1 else cst[g0:g1])
            pec = None if pe is None else pe[h0:h1]
            pc = dataclasses.replace(plan, H=h1 - h0)
        rows = B * HG * W
        dp = empty((B, h1 - h0, W, F), dtype=dt, device=dev) if need_dp else x
        hid = empty((B, h1 - h0, W, F), dtype=hid_dt, device=dev) if need_w2 else x
        if rows > 0 and F > 0:
            BN = dp_block_n(DO)
            key = (xc.shape, xc.stride(), w1c.shape, w1c.stride(),
                   None if cc is None else (cc.shape, cc.stride(), hg_c), w2c.shape, w2c.stride(), dyc.stride(), dt,
                   pc.varlen, *pc.seq_args()[3:], act, BN, need_dp, need_w2)
            launch = _DP_LAUNCH.get(key)
            if launch is None:
                launch = cache_put(_DP_LAUNCH, key, _dp_launch(xc, w1c, cc, hg_c, w2c, dyc, dp, hid, pc, HG, act, BN,
                                                                need_dp, need_w2))
            ints, grid, constexprs = launch
            _DP(grid, xc, w1c, cc if cc is not None else x, w2c, dyc, dp, hid, pc.cu, pc.ccu, pc.cq, *ints,
                **constexprs)
        if need_w2 and F * DO > 0:
            if rows == 0:
                dw2[g0:g1] = 0
            else:
                # dw2[g] = sum over the group's rows of hid^T dy: linear's weight gradient with the
                # hidden units as the tokens' features (one window position, stride 1, no pe)
                hplan = seq_plan(hid, block_size=1, stride=1, padding="valid", cu_seqlens=None)
                weight_grad(_DW2, (dw2 if whole else dw2[g0:g1]).unsqueeze(1), hid, dyc, None, None, hplan, B,
                            h1 - h0, HG, F, DO, Gc * cdiv(F, 128) * cdiv(DO, 128), dot_tf32=hid_tf32)
        if not need_dp:
            continue
        cs = None
        if need_b1 or need_pe or (need_w1 and pe is not None):
            cs = dp.sum(dim=(0, 2), dtype=torch.float32)                                   # [Hc, F]
        if need_x and xc.numel() > 0:
            w1v = w1c.unflatten(1, (L, D))                                                  # [Gc, L, D, F] view
            x_grad(_DX, dx if whole else dx[:, h0:h1], dp, w1v, pc, HG,
                   dx_phase_per(pc.NQ, B * (h1 - h0), plan.S, dev))
        if need_w1:
            weight_grad(_DW1, (dw1 if whole else dw1[g0:g1]).unflatten(1, (L, D)), xc, dp, pec, cs, pc, B, h1 - h0,
                        HG, D, F, Gc * L * cdiv(D, 64) * cdiv(F, 128))
        if need_b1:
            s1 = (cs.view(Gc, HG, F).sum(1) if HG > 1 else cs).to(dt)                      # [Gc, F]
            if whole:
                db1 = s1
            else:
                db1[g0:g1] = s1
        if need_pe:   # dpe[h, j, d] = sum_f w1[g, j*D + d, f] cs[h, f]
            s_pe = head_gemv(h1 - h0, cs, (cs.stride(0), 0, cs.stride(1)), 1, w1c,
                             (w1c.stride(0), 0, w1c.stride(2), 0, w1c.stride(1)), HG,
                             F, F, L * D, L * D).view(h1 - h0, L, D).to(dt)
            if whole:
                dpe = s_pe
            else:
                dpe[h0:h1] = s_pe
    return dx, dw1, db1, dw2, db2, dpe


def _dp_launch(xc, w1c, cc, hg_c, w2c, dyc, dp, hid, pc, HG, act, BN, need_dp, need_w2):
    """(integer arguments, grid, constexprs) of ``_backward``'s mlp_bwd_kernel_dp launch for one chunk of
    groups (pc: its plan)."""
    B, Hc, T, D = xc.shape
    F, DO = w1c.shape[2], w2c.shape[2]
    W = pc.W
    dt = xc.dtype
    args = kernel_args(mlp_bwd_kernel_dp, x=xc, w1=w1c, cst=cc if cc is not None else xc, w2=w2c, dy=dyc, dp=dp,
                       hid=hid, **pc.seq_kwargs(), **strides("sx", xc, "bhtd"), **strides("s1", w1c, "gkf"),
                       **strides("sc", cc, "gf"), **strides("s2", w2c, "gfn"), **strides("sd", dyc, "bhwn"),
                       **strides("sp", dp if need_dp else None, "bhwf"),
                       **strides("sh", hid if need_w2 else None, "bhwf"), H=Hc, HG=HG, HG_C=hg_c, D=D, F=F, DO=DO,
                       WORK=size_class(B * HG * W))
    return (args[10:], lambda meta: (cdiv(W, meta["BLOCK_W"]), cdiv(F, meta["BLOCK_F"]), B * Hc),
            dict(BLOCK_N=BN, ACT=ACTIVATIONS.index(act), IS_VARLEN=pc.varlen, HAS_CONST=cc is not None,
                 NEED_DP=need_dp, NEED_H=need_w2, HID_TF32=tf32_intermediate(dt), DOT_F32=dot_f32(dt)))


# --------------------------------------------------------------------------- torch.library


def _op_forward(x, w1, b1, w2, b2, pe, cu_seqlens, block_size, stride, padding, activation, total_windows):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    y, const = _forward(x, w1, b1, w2, b2, pe, plan, activation)
    return y, (plan, const)      # an eager backward takes the plan and the first layer's constant


def _op_backward(dy, x, w1, b1, w2, pe, cu_seqlens, block_size, stride, padding, activation, need_x, need_w1,
                 need_b1, need_w2, need_b2, need_pe, state):
    plan, const = state if state is not None else (None, None)
    plan = backward_plan(plan, dy, x, cu_seqlens, block_size, stride, padding)
    return _backward(dy, x, w1, b1, w2, pe, plan, activation, need_x, need_w1, need_b1, need_w2, need_b2, need_pe,
                     const)


def _fake(x, w2, cu_seqlens, block_size, stride, padding, total_windows, **_):
    return window_fake(x, w2.shape[2], cu_seqlens=cu_seqlens, block_size=block_size, stride=stride,
                       padding=padding, total_windows=total_windows)


# x (B, H, T, D) any strides, w1 (G, L*D, F), b1 (G, F) or None, w2 (G, F, D_out), b2 (G, D_out) or None,
# pe (H, L, D) or None -> (B, H, W, D_out), contiguous; the backward is not given b2 (its gradient is dy's sums)
_mlp = kernel_op("kvcompress::mlp_triton",
                 inputs="Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? pe, "
                        f"{WINDOW_INPUTS}, str activation, SymInt total_windows",
                 grads={"x": "need_x", "w1": "need_w1", "b1": "need_b1", "w2": "need_w2", "b2": "need_b2",
                        "pe": "need_pe"},
                 saved=("x", "w1", "b1", "w2", "pe", *WINDOW_SAVED, "activation"), forward=_op_forward,
                 fake=_fake, backward=_op_backward, grad_shapes={"b2": lambda a: (a["w2"].shape[0], a["w2"].shape[2])})


@register("mlp", "triton", devices=DEVICES, dtypes=DTYPES, priority=10, available=triton_available,
          supports=supports_call, auto_devices=("cuda",), emulated_devices=("cpu",), precision="io-intermediates")
def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None,
        total_windows=None):
    """Per-window two-layer MLP, Triton kernels (arguments already validated by
    ``kvcompress.functional.mlp``).

    x: (B, H, T, D) float16/bfloat16/float32, any strides (never copied);
    w1: (G, L*D, F); b1: (G, F) or None; w2: (G, F, D_out); b2: (G, D_out) or
    None; activation: "relu" (default), "gelu" (exact erf form) or "silu";
    pe: (H, L, D) or None; cu_seqlens: (N+1,) int32/int64 or None.
    total_windows: with cu_seqlens, the packed output size if known (no
    device read then), default None. Returns (B, H, W, D_out) in x's dtype.
    Differentiable in x, w1, b1, w2, b2 and pe. The hidden layer never
    reaches device memory in the forward; float32 dots are IEEE (never tf32).
    Precision class (SPEC 3c) io-intermediates: the hidden layer and its
    gradient are rounded to x's dtype (float16: tf32) as operands of the
    second tensor-core dot (docs/semantics.md).

    Raises TypeError/ValueError for a malformed total_windows, ValueError for
    an unknown activation.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    total = total_windows_arg("mlp", total_windows, cu_seqlens)
    return _mlp(x, w1, b1, w2, b2, pe, cu_seqlens, block_size, stride, padding, activation, total)


__all__ = ["ACTIVATIONS", "mlp", "mlp_bwd_kernel_dp", "mlp_fwd_kernel"]
