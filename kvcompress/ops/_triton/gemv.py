"""``head_gemv``: per-head constants out[h, m] = sum_k vec[h, k] * mat[g, k, m]
(+ bias[g, m]) in float32 without tensor cores. It folds ``pe`` through the
linear parts (a pad token is 0 + pe[h, j], so pe's share is one constant per
head) and gives pe's gradients (docs/triton.md, "pe")."""

from __future__ import annotations

import torch
import triton.language as tl

from .alloc import empty
from .env import INTERPRET, num_sms
from .launch import Direct, cdiv, jit_kernel, kernel_args, next_pow2

__all__ = ["head_gemv", "head_gemv_kernel"]


@jit_kernel
def head_gemv_kernel(vec, mat, bias, out, K, K2, M, M2, HG_V, HG_M, HG_B, DIV,
                     s_vh, s_vk1, s_vk2, s_mg, s_mk1, s_mk2, s_mm1, s_mm2, s_bg, s_bm,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[h, m] = (sum_k vec[h // HG_V, k] * mat[h // HG_M, k, m]) / DIV
    + bias[h // HG_B, m], float32, plain multiply-adds (no tf32). k and m
    are two-level indices (k // K2, k % K2) so e.g. (j, d) of a (G, L, D, D_out)
    weight is one index without needing mergeable strides."""
    i_h, i_m = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    p_m = mat + (i_h // HG_M).to(tl.int64) * s_mg + (o_m // M2) * s_mm1 + (o_m % M2) * s_mm2     # [BLOCK_M]
    p_v = vec + (i_h // HG_V).to(tl.int64) * s_vh
    b_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_v = tl.load(p_v + (o_k // K2) * s_vk1 + (o_k % K2) * s_vk2, mask=m_k, other=0.).to(tl.float32)
        b_mat = tl.load(p_m[None, :] + ((o_k // K2) * s_mk1 + (o_k % K2) * s_mk2)[:, None],
                        mask=m_k[:, None] & m_m[None, :], other=0.).to(tl.float32)            # [BLOCK_K, BLOCK_M]
        b_acc += tl.sum(tl.where(m_k[:, None], b_v[:, None] * b_mat, 0.), axis=0)
    b_acc = b_acc / DIV
    if HAS_BIAS:
        b_acc += tl.load(bias + (i_h // HG_B).to(tl.int64) * s_bg + o_m * s_bm, mask=m_m, other=0.).to(tl.float32)
    tl.store(out + i_h.to(tl.int64) * M + o_m, b_acc, mask=m_m)


_HEAD_GEMV = Direct(head_gemv_kernel)     # one launch a call of attention_pool, linear and mlp with pe: no JIT run


def head_gemv(H: int, vec: torch.Tensor, vec_strides, hg_v: int, mat: torch.Tensor, mat_strides, hg_m: int,
              K: int, K2: int, M: int, M2: int, *, bias: torch.Tensor | None = None, bias_strides=(0, 0),
              hg_b: int = 1, div: float = 1.0) -> torch.Tensor:
    """Per-head constants (H, M) float32 (docs/triton.md, "pe").

    out[h, m] = (sum_k vec[h // hg_v, k] * mat[h // hg_m, k, m]) / div
    + bias[h // hg_b, m]. Indices k, m are split as (k // K2, k % K2) and
    (m // M2, m % M2); vec_strides = (per head, k1, k2), mat_strides = (per
    group, k1, k2, m1, m2), bias_strides = (per group, m). Deterministic.
    """
    out = empty((H, M), dtype=torch.float32, device=mat.device)
    if H == 0 or M == 0:
        return out
    if INTERPRET:
        BLOCK_M, BLOCK_K = min(128, max(16, next_pow2(M))), 16
    else:
        # mat is read once, so this is a copy of mat's bytes: about four programs per SM keep enough
        # loads in flight (one program per SM, BLOCK_M = 128, read mlp's (4096, 4096) w1 at ~1 TB/s,
        # 130 us, GPU run 11); a tile of at most 8192 elements
        BLOCK_M = min(128, max(16, next_pow2(cdiv(H * M, 4 * num_sms(mat.device, cpu=4)))))
        BLOCK_K = max(16, min(256, 8192 // BLOCK_M))
    _HEAD_GEMV((H, cdiv(M, BLOCK_M)), *kernel_args(
        head_gemv_kernel, vec=vec, mat=mat, bias=bias if bias is not None else mat, out=out, K=K, K2=max(K2, 1), M=M,
        M2=max(M2, 1), HG_V=hg_v, HG_M=hg_m, HG_B=hg_b, DIV=div, **dict(zip(("s_vh", "s_vk1", "s_vk2"), vec_strides)),
        **dict(zip(("s_mg", "s_mk1", "s_mk2", "s_mm1", "s_mm2"), mat_strides)),
        **dict(zip(("s_bg", "s_bm"), bias_strides))), HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M)
    return out
