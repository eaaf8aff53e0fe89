"""Data movement of mlp's "gemm" backend (relu) in Triton. ``copy_windows``:
a group's windows in one launch: row r = (b, i, w) of ``out`` (M, K_a) gets tokens (w - P) * S ..
(w - P) * S + L - 1 of head i of x, L*D elements (zero before the first
token: left pads), from x with any strides (a (B, T, H, D) tensor passed
transposed included). torch's strided copy of the same views (C copies of
5-D views) took 48 us per 32 MiB on an H200 (run 53), about a third of the
bandwidth; a tile here is a contiguous run of the output row.
``rows_to_tokens``: float32 chunk-row sums rounded into a gradient of x's
layout. ``finish_dw1``: pe's share of w1's gradient added to a float32
chunk of it and rounded, one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton.launch import Direct, cdiv, jit_kernel, next_pow2

__all__ = ["copy_windows", "finish_dw1", "rows_to_tokens"]

BLOCK = 2048     # output elements per program (a row of L*D is split across programs beyond it)


@jit_kernel
def _copy_windows(x, out, W, PRE, S, HG, sxb, sxh, sxt, sxd, so, LD,
                  D: tl.constexpr, BLOCK_E: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)         # the output row: (b, i, w); 64-bit offsets below
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    w = r % W
    bi = r // W
    i = bi % HG
    b = bi // HG
    t = w * S - PRE + e // D                  # the token of each element
    m = e < LD
    v = tl.load(x + b * sxb + i * sxh + t * sxt + (e % D) * sxd, mask=m & (t >= 0), other=0.0)
    tl.store(out + r * so + e, v, mask=m)


def copy_windows(xg: torch.Tensor, out: torch.Tensor, *, W: int, L: int, S: int, P: int) -> None:
    """xg (B, Hg, T, D), one group's heads, any strides -> out (B * Hg * W,
    K_a), K_a >= L*D, unit stride along rows: out[(b, i, w), j*D + d] =
    xg[b, i, (w - P) * S + j, d] (0 where that token is before the first:
    P left-pad chunks of S). The columns past L*D are not written."""
    B, Hg, T, D = xg.shape
    LD = L * D
    be = min(BLOCK, next_pow2(LD))
    grid = (B * Hg * W, cdiv(LD, be))
    _COPY_WINDOWS(grid, xg, out, W, P * S, S, Hg, *xg.stride(), out.stride(0), LD, D=D, BLOCK_E=be, num_warps=4)


@triton.jit
def _bf16_rne(v):
    """float32 -> bfloat16 to nearest even, by its bits: what the GPU's cvt.rn
    and torch's copy do, written out because Triton's interpreter truncates
    (tests/test_interpreter_defects.py). NaN stays NaN (quiet)."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    u = tl.where(v != v, 0x7FC0, u)
    return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit_kernel
def _rows_to_tokens(src, dst, N, S, HG, sdb, sdh, sdt, sdd, ROW, D: tl.constexpr, BLOCK_E: tl.constexpr,
                    TO_BF16: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)         # the source row: (b, i, chunk n); 64-bit offsets below
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = r % N
    bi = r // N
    i = bi % HG
    b = bi // HG
    m = e < ROW
    v = tl.load(src + r * ROW + e, mask=m)
    if TO_BF16:
        out = _bf16_rne(v)
    else:
        out = v.to(dst.dtype.element_ty)
    tl.store(dst + b * sdb + i * sdh + (n * S + e // D) * sdt + (e % D) * sdd, out, mask=m)


def rows_to_tokens(src: torch.Tensor, dstg: torch.Tensor, *, N: int, S: int) -> None:
    """The inverse of copy_windows with L = S, converting the dtype: src (B *
    Hg * N, S*D) contiguous (float32 sums) -> dstg (B, Hg, T, D), any
    strides, tokens 0 .. N*S - 1: dstg[b, i, n*S + j, d] = src[(b, i, n), j*D
    + d], rounded once to dstg's dtype (to nearest even, as torch's copy)."""
    B, Hg, T, D = dstg.shape
    row = S * D
    be = min(BLOCK, next_pow2(row))
    grid = (B * Hg * N, cdiv(row, be))
    _ROWS_TO_TOKENS(grid, src, dstg, N, S, Hg, *dstg.stride(), row, D=D, BLOCK_E=be,
                    TO_BF16=src.dtype == torch.float32 and dstg.dtype == torch.bfloat16, num_warps=4)


@jit_kernel
def _finish_dw1(part, pe, cs, out, K, F, HG, spi, spk, sci, scf,
                BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, TO_BF16: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    m = (k < K)[:, None] & (f < F)[None, :]
    off = k.to(tl.int64)[:, None] * F + f[None, :]
    acc = tl.load(part + off, mask=m, other=0.0)
    for i in range(HG):
        p = tl.load(pe + i * spi + k * spk, mask=k < K, other=0.0).to(tl.float32)
        c = tl.load(cs + i * sci + f * scf, mask=f < F, other=0.0)
        acc += p[:, None] * c[None, :]
    if TO_BF16:
        tl.store(out + off, _bf16_rne(acc), mask=m)
    else:
        tl.store(out + off, acc.to(out.dtype.element_ty), mask=m)


def finish_dw1(part: torch.Tensor, pe: torch.Tensor, cs: torch.Tensor, out: torch.Tensor) -> None:
    """out (K, F) = part (K, F) float32 + sum_i pe[i, :, None] * cs[i, None, :]
    for pe (Hg, K) in any float dtype and cs (Hg, F) float32, each term a
    float32 product added in order i = 0, 1, ..., then rounded once to out's
    dtype (bfloat16: to nearest even): pe's share of a chunk of w1's
    gradient and its rounding in one pass (as torch's addcmul_ per head and
    copy_ do in two). part and out contiguous."""
    K, F = part.shape
    bk, bf = 32, 128
    grid = (cdiv(K, bk), cdiv(F, bf))
    _FINISH_DW1(grid, part, pe, cs, out, K, F, pe.shape[0], *pe.stride(), *cs.stride(), BLOCK_K=bk, BLOCK_F=bf,
                TO_BF16=out.dtype == torch.bfloat16, num_warps=4)


# launched through the direct launch (launch.Direct): the gemm backend makes up to 20 of these launches a forward
# + backward at G = H = 4, and JITFunction.run cost ~90 us of host time a launch on the H200's host (run 65)
_COPY_WINDOWS, _ROWS_TO_TOKENS, _FINISH_DW1 = Direct(_copy_windows), Direct(_rows_to_tokens), Direct(_finish_dw1)
