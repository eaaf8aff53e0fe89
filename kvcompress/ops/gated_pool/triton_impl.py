"""gated_pool, Triton (SPEC section 3b): attention_pool's softmax over window
positions per feature, with the logits given (z + bias) instead of
computed, and with ``split`` each position reading its chunk of features.
Registered as backend "triton" (CUDA; CPU tensors too under
TRITON_INTERPRET=1, never picked by "auto" there).

- Forward (``gated_pool_fwd_kernel``): grid (window tiles, D_out blocks,
  B*H). A program owns BLOCK_W windows x BLOCK_F output features and walks
  the L window positions, one a step or BLOCK_J a step (the configuration's
  choice, docs/triton.md): position j of window w is token t0(w) + j (left
  pads and other sequences' tokens masked), its chunk c = j // S (split)
  puts the loads at features c*D_out + f; s = z + bias[g, j] in float32
  (float64 for float64 input), one online max-shifted softmax state (max,
  sum, weighted sum) per (window, feature). Token rows are re-read by the
  L / S windows that hold them (L2 hits). With autograd, the per-window
  log-sum-exp (and, for half-precision input, y before its rounding) is
  stored for the backward.
- Backward (``gated_pool_bwd_kernel``): grid (chunk-row tiles, Dx blocks,
  B*H), gathered per token (chunk q, phase r is position j = c*S + r of
  window q - c; ``chunk_rows``): for each window holding the token,
  P = exp(s - lse), dx += P dy, dz += P (x - y) dy (with split only the
  window whose chunk c owns the feature), dx and dz written once per token,
  no atomics. dbias partials: each program writes, per position j, the sum
  over its tile's windows of ds[j, f] (each (tile, j, f) exactly once); torch
  sums them over tiles, batch and the heads of a group in a fixed order.
  Deterministic: no atomics anywhere, fixed summation orders.

Precision class ``strict``: scores, probabilities and every sum stay in the
accumulation dtype; only y, dx, dz and dbias are rounded to x's dtype.

The op is ``torch.ops.kvcompress.gated_pool_triton`` (fake implementation
and autograd registered, ``_custom_op.kernel_op``), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node;
eager calls run the same launchers through an ``autograd.Function`` instead
(``eager_call``: no op dispatch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...backends import register
from .._custom_op import kernel_op
from .._torch_common import accumulation_dtype
from .._triton.alloc import empty, empty_like
from .._triton.env import DEVICES, DTYPES, INTERPRET, supports_call, triton_available
from .._triton.lang import chunk_rows, window_rows
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
from .._triton.plan import (
    WINDOW_INPUTS,
    WINDOW_SAVED,
    SeqPlan,
    backward_plan,
    seq_plan,
    total_windows_arg,
    window_fake,
)

# --------------------------------------------------------------------------- kernels


@jit_kernel
def gated_pool_fwd_kernel(x, z, bias, y, lse, ya, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                          sxb, sxh, sxt, sxd, szb, szh, szt, szd, sbg, sbj, sbd, syb, syh, syw, syd,
                          H, HG, DO, WORK,
                          SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LSE: tl.constexpr,
                          HAS_YA: tl.constexpr, IS_VARLEN: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_W: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_J: tl.constexpr = 1):
    """y[w, f] = sum_j softmax_j(s[:, f]) v[j, f] for windows [i_w*BLOCK_W, +BLOCK_W)
    and output features [i_f*BLOCK_F, +BLOCK_F). Grid (window tiles, D_out
    blocks, B*H). lse (HAS_LSE) and ya (HAS_YA: y in ACC, before rounding)
    share y's strides.

    BLOCK_J = 1: the positions one at a time, an online softmax with one exp
    per position (attention_pool's update): with e = exp(-|s - m|), a new
    maximum rescales the state by e and adds 1, else adds e. BLOCK_J > 1:
    BLOCK_J positions per step as one [BLOCK_W, BLOCK_J, BLOCK_F] tile (all
    their loads in flight at once: the one-position loop waits on each
    load, so a long window, HCA's L = 128, runs at about half the copy rate,
    GPU run 64), the state rescaled once a step by exp(m - m_new). Either
    way a pad, a missing window and s = -inf leave the state as it is
    (weight exactly 0: an -inf first score would otherwise give
    exp(-inf + inf) = NaN); a NaN or +inf score poisons its (window,
    feature) only (NaN, as the reference's max-shifted softmax gives).
    The autotuner picks BLOCK_J among the configurations (``_FWD``).
    """
    i_w, i_f, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_w = i_w * BLOCK_W + tl.arange(0, BLOCK_W)
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = o_f < DO
    t0, bos, m_w = window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN)    # [BLOCK_W]
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    p_z = z + i_b.to(tl.int64) * szb + i_h.to(tl.int64) * szh
    b_m = tl.full([BLOCK_W, BLOCK_F], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BLOCK_W, BLOCK_F], dtype=ACC)
    b_a = tl.zeros([BLOCK_W, BLOCK_F], dtype=ACC)
    if BLOCK_J == 1:
        for j in range(0, L):
            t = t0 + j                                                         # [BLOCK_W] int64
            m_t = m_w & (t >= bos)
            m2 = m_t[:, None] & m_f[None, :]
            if SPLIT:
                o_in = (j // S) * DO + o_f                                     # chunk c = j // S
            else:
                o_in = o_f
            b_s = tl.load(p_z + t[:, None] * szt + o_in[None, :] * szd, mask=m2, other=0.).to(ACC)  # [BW, BF]
            b_v = tl.load(p_x + t[:, None] * sxt + o_in[None, :] * sxd, mask=m2, other=0.).to(ACC)
            if HAS_BIAS:
                b_s += tl.load(bias + i_g.to(tl.int64) * sbg + j * sbj + o_f * sbd, mask=m_f,
                               other=0.).to(ACC)[None, :]
            # a +inf score gives NaN, as the max-shifted softmax of the reference and the position blocks
            # (exp(inf - inf)); this update alone would weigh it 1 and every other position 0
            b_s = tl.where(b_s == float("inf"), float("nan"), b_s)
            b_e = tl.exp(-tl.abs(b_s - b_m))
            up = b_s > b_m
            keep = m2 & (b_s != float("-inf"))
            b_l = tl.where(keep, tl.where(up, b_l * b_e + 1.0, b_l + b_e), b_l)
            b_a = tl.where(keep, tl.where(up, b_a * b_e + b_v, b_a + b_e * b_v), b_a)
            b_m = tl.where(keep & up, b_s, b_m)
    else:
        o_j = tl.arange(0, BLOCK_J)
        for j0 in range(0, L, BLOCK_J):
            jj = j0 + o_j                                                      # [BLOCK_J]
            t = t0[:, None] + jj[None, :]                                      # [BW, BJ] int64
            m_t = m_w[:, None] & (t >= bos[:, None]) & (jj < L)[None, :]
            m3 = m_t[:, :, None] & m_f[None, None, :]                          # [BW, BJ, BF]
            if SPLIT:
                o_in = ((jj // S) * DO)[:, None] + o_f[None, :]                # [BJ, BF]: chunk c = j // S
            else:
                o_in = jj[:, None] * 0 + o_f[None, :]
            b_s = tl.load(p_z + t[:, :, None] * szt + o_in[None, :, :] * szd, mask=m3, other=0.).to(ACC)
            b_v = tl.load(p_x + t[:, :, None] * sxt + o_in[None, :, :] * sxd, mask=m3, other=0.).to(ACC)
            if HAS_BIAS:
                m_jf = (jj < L)[:, None] & m_f[None, :]
                b_s += tl.load(bias + i_g.to(tl.int64) * sbg + jj[:, None] * sbj + o_f[None, :] * sbd, mask=m_jf,
                               other=0.).to(ACC)[None, :, :]
            keep = m3 & (b_s != float("-inf"))
            m_new = tl.maximum(b_m, tl.max(tl.where(keep, b_s, float("-inf")), axis=1))    # [BW, BF]
            m_sh = tl.where(m_new == float("-inf"), 0., m_new)        # nothing kept yet: no shift, no weight
            b_p = tl.where(keep, tl.exp(b_s - m_sh[:, None, :]), 0.)
            alpha = tl.exp(b_m - m_sh)                                 # 0 while b_m is -inf
            b_l = b_l * alpha + tl.sum(b_p, axis=1)
            b_a = b_a * alpha + tl.sum(b_p * b_v, axis=1)
            b_m = m_new
    m_y = m_w[:, None] & m_f[None, :]
    b_den = tl.where(m_y, b_l, 1.0)             # every real window has a real position (SPEC 3b)
    b_y = b_a / b_den
    o_y = i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh + o_w[:, None].to(tl.int64) * syw + o_f[None, :] * syd
    tl.store(y + o_y, b_y.to(y.dtype.element_ty), mask=m_y)
    if HAS_LSE:
        tl.store(lse + o_y, b_m + tl.log(b_den), mask=m_y)
    if HAS_YA:
        tl.store(ya + o_y, b_y, mask=m_y)


@jit_kernel
def gated_pool_bwd_kernel(x, z, bias, dy, ys, lse, dx, dz, pb, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
                          sxb, sxh, sxt, sxd, szb, szh, szt, szd, sbg, sbj, sbd, sdb, sdh, sdw, sdd,
                          ssb, ssh, ssw, ssd, sgb, sgh, sgt, sgd, shb, shh, sht, shd,
                          H, HG, DX, DO, NT, WORK,
                          SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr,
                          NEED_DZ: tl.constexpr, NEED_DB: tl.constexpr, IS_VARLEN: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gradients gathered per token. Grid (NT chunk-row tiles, Dx blocks, B*H).

    Token t = chunk q, phase r is position j = c*S + r of window q - c
    (c < ceil((L - r) / S)); feature k of Dx is output feature f = k - c_k *
    D_out of chunk c_k = k // D_out (split; the token feeds window q - c only
    for c = c_k), else f = k. For each window holding it, with P = exp(s - lse)
    and y the window's output before rounding (ys):
    dx[t, k] += P dy[f], dz[t, k] += ds = P (x[t, k] - y[f]) dy[f];
    both written once per token (zero where no window holds it).
    NEED_DB: pb[b*H + h, i_t, j, f] = sum over the tile's windows of ds[j, f],
    one store per (j, f) (the (c, r) pairs cover each j < L once; split, the
    feature blocks cover each f of chunk j // S once).
    """
    i_t, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_q = tl.arange(0, BLOCK_Q)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < DX
    if SPLIT:
        c_k = o_k // DO
        f_k = o_k - c_k * DO
    else:
        c_k = o_k * 0
        f_k = o_k
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BLOCK_Q + o_q, cu, ccu, cq, N, N_STEPS, T, W, NQ,
                                                           S, PRE, IS_VARLEN)
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh
    p_z = z + i_b.to(tl.int64) * szb + i_h.to(tl.int64) * szh
    p_dy = dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh
    p_ys = ys + i_b.to(tl.int64) * ssb + i_h.to(tl.int64) * ssh
    p_l = lse + i_b.to(tl.int64) * ssb + i_h.to(tl.int64) * ssh                # lse has ys's strides
    p_pb = pb + (i_bh.to(tl.int64) * NT + i_t) * L * DO
    for r in range(0, S):
        t = t_base + r                                                         # [BLOCK_Q] int64
        m_t = m_q & (t >= bos) & (t < eos)
        m_tk = m_t[:, None] & m_k[None, :]
        b_x = tl.load(p_x + t[:, None] * sxt + o_k[None, :] * sxd, mask=m_tk, other=0.).to(ACC)   # [BLOCK_Q, BLOCK_K]
        b_z = tl.load(p_z + t[:, None] * szt + o_k[None, :] * szd, mask=m_tk, other=0.).to(ACC)
        b_dx = tl.zeros([BLOCK_Q, BLOCK_K], dtype=ACC)
        b_dz = tl.zeros([BLOCK_Q, BLOCK_K], dtype=ACC)
        for c in range(0, tl.cdiv(L - r, S)):
            j = c * S + r
            q_w = q - c
            m_win = m_t & (q_w >= 0) & (q_w < n_win)
            if SPLIT:
                m_kc = m_k & (c_k == c)
            else:
                m_kc = m_k
            m2 = m_win[:, None] & m_kc[None, :]
            o_row = (win_base + q_w)[:, None]
            b_g = tl.load(p_dy + o_row * sdw + f_k[None, :] * sdd, mask=m2, other=0.).to(ACC)
            b_y = tl.load(p_ys + o_row * ssw + f_k[None, :] * ssd, mask=m2, other=0.).to(ACC)
            b_lse = tl.load(p_l + o_row * ssw + f_k[None, :] * ssd, mask=m2, other=0.).to(ACC)
            b_s = b_z
            if HAS_BIAS:
                b_s = b_z + tl.load(bias + i_g.to(tl.int64) * sbg + j * sbj + f_k * sbd, mask=m_kc,
                                    other=0.).to(ACC)[None, :]
            # where, not a zero dy: exp of a missing window's score may be inf, and inf * 0 is NaN
            b_pg = tl.where(m2, tl.exp(b_s - b_lse) * b_g, 0.)
            b_ds = tl.where(m2, b_pg * (b_x - b_y), 0.)
            b_dx += b_pg
            b_dz += b_ds
            if NEED_DB:
                tl.store(p_pb + j * DO + f_k, tl.sum(b_ds, axis=0), mask=m_kc)
        if NEED_DX:
            tl.store(dx + i_b.to(tl.int64) * sgb + i_h.to(tl.int64) * sgh + t[:, None] * sgt + o_k[None, :] * sgd,
                     b_dx.to(dx.dtype.element_ty), mask=m_tk)
        if NEED_DZ:
            tl.store(dz + i_b.to(tl.int64) * shb + i_h.to(tl.int64) * shh + t[:, None] * sht + o_k[None, :] * shd,
                     b_dz.to(dz.dtype.element_ty), mask=m_tk)


# --------------------------------------------------------------------------- launch configurations


def _fwd_prune(configs, kw):
    """Feature blocks no wider than D_out (>= 16); position blocks no longer
    than the window (next_pow2(L)); three [BLOCK_W, BLOCK_F] float32 states
    and the [BLOCK_W, BLOCK_J, BLOCK_F] score and value tiles of at most 32
    elements per thread each."""
    DO, L = kw["DO"], kw["L"]
    kept = [c for c in configs if c.kwargs["BLOCK_F"] <= max(16, next_pow2(DO))
            and c.kwargs["BLOCK_J"] <= next_pow2(L)
            and c.kwargs["BLOCK_W"] * c.kwargs["BLOCK_J"] * c.kwargs["BLOCK_F"] <= 32 * 32 * c.num_warps]
    return kept or [triton.Config({"BLOCK_W": 16, "BLOCK_F": 16, "BLOCK_J": 1}, num_warps=4)]


def _bwd_prune(configs, kw):
    """Feature blocks no wider than Dx (>= 16); [BLOCK_Q, BLOCK_K] float32
    tiles of at most 16 elements per thread (about eight are live)."""
    DX, BQ = kw["DX"], kw["BLOCK_Q"]
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(16, next_pow2(DX))
            and BQ * c.kwargs["BLOCK_K"] <= 16 * 32 * c.num_warps]
    return kept or [triton.Config({"BLOCK_K": 16}, num_warps=4)]


# Forward configurations (BLOCK_W, BLOCK_J, BLOCK_F, warps): one position a step (BLOCK_J = 1, every
# configuration until 2026-12-05), and position blocks, which keep BLOCK_J loads in flight (long windows:
# HCA's L = 128 with one window a program; CSA's L = 8 in one step). The autotuner picks: on the H200 (run 69)
# (1, 64, 64, 4) for HCA at T = 8192 and 65536, (16, 1, 32, 2) at T = 131072 and for CSA (docs/triton.md).
FWD_CONFIGS = [(32, 1, 64, 4), (64, 1, 64, 4), (32, 1, 128, 4), (64, 1, 128, 8), (16, 1, 128, 4), (128, 1, 32, 4),
               (16, 1, 64, 2), (16, 1, 32, 2),
               (1, 64, 64, 4), (1, 32, 128, 4), (1, 128, 64, 8), (4, 8, 64, 4)]
# the interpreter's position block: 4 (several steps and a partial last block for L > 4), with small tiles 1
INTERPRET_BLOCK_J = 4
_FWD = Launcher(
    gated_pool_fwd_kernel,
    configs=[triton.Config({"BLOCK_W": bw, "BLOCK_J": bj, "BLOCK_F": bf}, num_warps=nw)
             for bw, bj, bf, nw in FWD_CONFIGS],
    key=["DO", "L", "S", "WORK", "SPLIT", "HAS_BIAS", "HAS_LSE", "HAS_YA", "IS_VARLEN"],
    interpret_meta=lambda kw: {"BLOCK_W": interpret_block(kw["W"], 32, small=4),
                               "BLOCK_F": interpret_block(kw["DO"], 64),
                               "BLOCK_J": 1 if small_tiles_active() else INTERPRET_BLOCK_J},
    prune=_fwd_prune)
_BWD = Launcher(
    gated_pool_bwd_kernel,
    configs=[triton.Config({"BLOCK_K": bk}, num_warps=nw)
             for bk, nw in [(64, 4), (128, 4), (128, 8), (32, 4), (32, 2), (16, 2)]],
    key=["DX", "L", "S", "WORK", "SPLIT", "HAS_BIAS", "NEED_DX", "NEED_DZ", "NEED_DB", "IS_VARLEN", "BLOCK_Q"],
    interpret_meta=lambda kw: {"BLOCK_K": interpret_block(kw["DX"], 64)},
    prune=_bwd_prune)

# chunk rows per backward tile on a GPU: fixed (not autotuned), so the dbias partials' layout
# (one [L, D_out] block per tile) is known before a configuration is picked
BWD_BLOCK_Q = 32


def _acc(dtype: torch.dtype):
    """The kernels' accumulation type: float64 for float64 input, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _d_out(Dx: int, plan: SeqPlan, split: bool) -> int:
    return Dx // (plan.L // plan.S) if split else Dx


# --------------------------------------------------------------------------- host side


def _forward(x, z, bias, plan, *, split, need_stats):
    """One launch -> (y (B, H, W, D_out) in x's dtype, lse, ya), contiguous.
    need_stats: lse (B, H, W, D_out) in the accumulation dtype, and ya, y
    before its rounding, when x's dtype is narrower (else an empty (0,)
    tensor: the backward reads y itself); both (0,) without need_stats."""
    B, H, T, Dx = x.shape
    Do = _d_out(Dx, plan, split)
    acc = accumulation_dtype(x.dtype)
    shape = (B, H, plan.W, Do)
    has_ya = need_stats and x.dtype != acc
    y = empty(shape, dtype=x.dtype, device=x.device)
    lse = empty(shape, dtype=acc, device=x.device) if need_stats else x.new_empty(0)
    ya = empty(shape, dtype=acc, device=x.device) if has_ya else x.new_empty(0)
    if y.numel() == 0:
        return y, lse, ya
    key = (x.shape, x.stride(), z.stride(), None if bias is None else (bias.shape, bias.stride()), x.dtype,
           plan.varlen, *plan.seq_args()[3:], split, need_stats)
    launch = _FWD_LAUNCH.get(key)
    if launch is None:
        launch = cache_put(_FWD_LAUNCH, key, _fwd_launch(x, z, bias, y, plan, split, need_stats, has_ya))
    ints, grid, constexprs = launch
    _FWD(grid, x, z, bias if bias is not None else x, y, lse if need_stats else y, ya if has_ya else y,
         plan.cu, plan.ccu, plan.cq, *ints, **constexprs)
    return y, lse, ya


# The launches' arguments after their tensors, their grid and constexprs depend only on shapes, strides,
# dtypes, the plan's sizes and the flags: built once per key (``_fwd_launch``, ``_bwd_launch``) instead of
# ~50 named arguments a call (host time, issue 14 item 2). Each kernel takes its tensors first, in this order.
assert gated_pool_fwd_kernel.runtime_args[:9] == ("x", "z", "bias", "y", "lse", "ya", "cu", "ccu", "cq")
assert gated_pool_bwd_kernel.runtime_args[:12] == ("x", "z", "bias", "dy", "ys", "lse", "dx", "dz", "pb", "cu",
                                                   "ccu", "cq")
_FWD_LAUNCH: dict[tuple, tuple] = {}
_BWD_LAUNCH: dict[tuple, tuple] = {}

def _fwd_launch(x, z, bias, y, plan, split, need_stats, has_ya):
    """(integer arguments, grid, constexprs) of ``_forward``'s launch."""
    B, H, T, Dx = x.shape
    Do = _d_out(Dx, plan, split)
    G = bias.shape[0] if bias is not None else 1
    W = plan.W
    args = kernel_args(gated_pool_fwd_kernel, x=x, z=z, bias=bias if bias is not None else x, y=y, lse=y, ya=y,
                       **plan.seq_kwargs(), **strides("sx", x, "bhtd"), **strides("sz", z, "bhtd"),
                       **strides("sb", bias, "gjd"), **strides("sy", y, "bhwd"), H=H, HG=H // G, DO=Do,
                       WORK=size_class(B * H * W * Do))
    return (args[9:], lambda meta: (cdiv(W, meta["BLOCK_W"]), cdiv(Do, meta["BLOCK_F"]), B * H),
            dict(SPLIT=split, HAS_BIAS=bias is not None, HAS_LSE=need_stats, HAS_YA=has_ya, IS_VARLEN=plan.varlen,
                 ACC=_acc(x.dtype)))


def _backward_impl(dy, y, lse, ya, x, z, bias, plan, *, split, need_x, need_z, need_b):
    """(dx like x, dz like z, dbias (G, L, D_out)); one not needed is an empty
    (0,) tensor (custom op outputs may not alias). lse empty: the forward ran
    without statistics, recomputed here."""
    B, H, T, Dx = x.shape
    Do = _d_out(Dx, plan, split)
    L = plan.L
    G = bias.shape[0] if bias is not None else 1
    HG = H // G
    need_b = need_b and bias is not None
    dx = empty_like(x) if need_x else x.new_empty(0)
    dz = empty_like(z) if need_z else x.new_empty(0)
    if B * H * T * Dx == 0 or plan.W == 0:      # no window holds a token: every gradient is zero
        dx.zero_()
        dz.zero_()
        db = torch.zeros(bias.shape, dtype=x.dtype, device=x.device) if need_b else x.new_empty(0)
        return dx, dz, db
    if lse.numel() == 0:
        y, lse, ya = _forward(x, z, bias, plan, split=split, need_stats=True)
    ys = ya if ya.numel() > 0 else y                # y before rounding (y itself for float32/float64)
    BQ = interpret_block(plan.NQ, 16, small=2) if INTERPRET else BWD_BLOCK_Q
    NT = cdiv(plan.NQ, BQ)
    pb = empty((B * H * NT * L * Do,), dtype=accumulation_dtype(x.dtype), device=x.device) if need_b else x
    if need_x or need_z or need_b:
        key = (x.shape, x.stride(), z.stride(), None if bias is None else (bias.shape, bias.stride()), x.dtype,
               dy.stride(), ys.stride(), dx.stride() if need_x else None, dz.stride() if need_z else None,
               plan.varlen, *plan.seq_args()[3:], split, need_x, need_z, need_b, BQ)
        launch = _BWD_LAUNCH.get(key)
        if launch is None:
            launch = cache_put(_BWD_LAUNCH, key, _bwd_launch(dy, ys, x, z, bias, dx, dz, pb, plan, split, need_x,
                                                              need_z, need_b, BQ))
        ints, grid, constexprs = launch
        _BWD(grid, x, z, bias if bias is not None else x, dy, ys, lse, dx if need_x else x, dz if need_z else x, pb,
             plan.cu, plan.ccu, plan.cq, *ints, **constexprs)
    # the second stage: a fixed-order sum over (batch, heads of the group, tiles)
    db = pb.view(B, G, HG, NT, L, Do).sum(dim=(0, 2, 3)).to(x.dtype) if need_b else x.new_empty(0)   # [G, L, D_out]
    return dx, dz, db


def _bwd_launch(dy, ys, x, z, bias, dx, dz, pb, plan, split, need_x, need_z, need_b, BQ):
    """(integer arguments, grid, constexprs) of ``_backward_impl``'s launch."""
    B, H, T, Dx = x.shape
    Do = _d_out(Dx, plan, split)
    G = bias.shape[0] if bias is not None else 1
    NT = cdiv(plan.NQ, BQ)
    args = kernel_args(gated_pool_bwd_kernel, x=x, z=z, bias=bias if bias is not None else x, dy=dy, ys=ys, lse=ys,
                       dx=dx if need_x else x, dz=dz if need_z else x, pb=pb, **plan.seq_kwargs(),
                       **strides("sx", x, "bhtd"), **strides("sz", z, "bhtd"), **strides("sb", bias, "gjd"),
                       **strides("sd", dy, "bhwd"), **strides("ss", ys, "bhwd"),
                       **strides("sg", dx if need_x else None, "bhtd"), **strides("sh", dz if need_z else None, "bhtd"),
                       H=H, HG=H // G, DX=Dx, DO=Do, NT=NT, WORK=size_class(B * H * plan.NQ * Dx))
    return (args[12:], lambda meta: (NT, cdiv(Dx, meta["BLOCK_K"]), B * H),
            dict(SPLIT=split, HAS_BIAS=bias is not None, NEED_DX=need_x, NEED_DZ=need_z, NEED_DB=need_b,
                 IS_VARLEN=plan.varlen, ACC=_acc(x.dtype), BLOCK_Q=BQ))


# --------------------------------------------------------------------------- torch.library


def _op_forward(x, z, bias, cu_seqlens, block_size, stride, padding, split, total_windows, need_stats):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    return _forward(x, z, bias, plan, split=split, need_stats=need_stats), plan


def _op_backward(dy, y, lse, ya, x, z, bias, cu_seqlens, block_size, stride, padding, split, need_x, need_z,
                 need_b, state):
    plan = backward_plan(state, dy, x, cu_seqlens, block_size, stride, padding)
    return _backward_impl(dy, y, lse, ya, x, z, bias, plan, split=split, need_x=need_x, need_z=need_z,
                          need_b=need_b)


def _fake(x, cu_seqlens, block_size, stride, padding, split, total_windows, need_stats, **_):
    Dx = x.shape[3]
    y = window_fake(x, Dx // (block_size // stride) if split else Dx, cu_seqlens=cu_seqlens, block_size=block_size,
                    stride=stride, padding=padding, total_windows=total_windows)
    acc = accumulation_dtype(x.dtype)
    return (y, x.new_empty(y.shape, dtype=acc) if need_stats else x.new_empty(0),
            x.new_empty(y.shape, dtype=acc) if need_stats and x.dtype != acc else x.new_empty(0))


# x, z (B, H, T, Dx) any strides, bias (G, L, D_out) or None -> (y (B, H, W, D_out) contiguous, lse, ya): the
# backward's statistics (``_forward``), (0,) when not needed; a backward given an empty lse recomputes them
_gated_pool = kernel_op(
    "kvcompress::gated_pool_triton",
    inputs=f"Tensor x, Tensor z, Tensor? bias, {WINDOW_INPUTS}, bool split, SymInt total_windows, bool need_stats",
    outputs=("y", "lse", "ya"), grads={"x": "need_x", "z": "need_z", "bias": "need_b"},
    saved=("y", "lse", "ya", "x", "z", "bias", *WINDOW_SAVED, "split"), forward=_op_forward, fake=_fake,
    backward=_op_backward, grads_like=("z",))


@register("gated_pool", "triton", devices=DEVICES, dtypes=DTYPES, priority=10, available=triton_available,
          supports=supports_call, auto_devices=("cuda",), emulated_devices=("cpu",))
def gated_pool(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None,
               total_windows=None):
    """Gated pooling (DeepSeek-V4's compressor core), Triton kernels
    (arguments already validated by ``kvcompress.functional.gated_pool``).

    x, z: (B, H, T, Dx) float16/bfloat16/float32, any strides (never copied;
    the kernels also compute float64 input in float64, outside the
    registered dtypes); bias: (G, L, D_out) or None; split: bool (S divides
    L, C = L // S divides Dx, D_out = Dx // C; else D_out = Dx);
    cu_seqlens: (N+1,) int32/int64 or None. total_windows: with cu_seqlens,
    the packed output size if known (no device read then), default None.
    Returns (B, H, W, D_out) in x's dtype. Differentiable in x, z and bias;
    when one of them requires grad the forward also stores the per-window
    log-sum-exp (B, H, W, D_out), float32 (and y in float32 for half input).

    Raises TypeError/ValueError for a malformed total_windows.
    """
    total = total_windows_arg("gated_pool", total_windows, cu_seqlens)
    need_stats = torch.is_grad_enabled() and (x.requires_grad or z.requires_grad
                                              or (bias is not None and bias.requires_grad))
    y, _, _ = _gated_pool(x, z, bias, cu_seqlens, block_size, stride, padding, bool(split), total, need_stats)
    return y


__all__ = ["INTERPRET", "gated_pool", "gated_pool_bwd_kernel", "gated_pool_fwd_kernel"]
