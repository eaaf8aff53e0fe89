"""The windows of mlp's "gemm" backend (relu) in one Triton launch per
group: row r = (b, i, w) of ``out`` (M, K_a) gets tokens (w - P) * S ..
(w - P) * S + L - 1 of head i of x, L*D elements (zero before the first
token: left pads), from x with any strides (a (B, T, H, D) tensor passed
transposed included). torch's strided copy of the same views (C copies of
5-D views) took 48 us per 32 MiB on an H200 (run 53), about a third of the
bandwidth; a tile here is a contiguous run of the output row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton.launch import jit_kernel, next_pow2

__all__ = ["copy_windows", "rows_to_tokens"]

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
    grid = (B * Hg * W, triton.cdiv(LD, be))
    _copy_windows[grid](xg, out, W, P * S, S, Hg, *xg.stride(), out.stride(0), LD, D=D, BLOCK_E=be,
                        num_warps=4)


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
        # float32 -> bfloat16 to nearest even, by its bits: the conversion the GPU's cvt.rn does and torch's
        # copy does, written out because Triton's interpreter truncates (tests/test_interpreter_defects.py)
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        u = tl.where(v != v, 0x7FC0, u)                                   # NaN stays NaN (quiet)
        out = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
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
    grid = (B * Hg * N, triton.cdiv(row, be))
    _rows_to_tokens[grid](src, dstg, N, S, Hg, *dstg.stride(), row, D=D, BLOCK_E=be,
                          TO_BF16=src.dtype == torch.float32 and dstg.dtype == torch.bfloat16, num_warps=4)
