"""linear mutants: y = sum_j X[j] @ weight[g, j] + bias[g] (NSA eq. 7), gone wrong."""

from __future__ import annotations

from . import (
    BIAS_ACT,
    CONTIGUOUS,
    GRAD_HALF,
    GRAD_LAYOUT,
    GRAD_TILE,
    HALF,
    PE,
    TILE,
    WEIGHT_LAYOUT,
    WINDOW,
    mutant,
    strict,
)
from ._base import Bugs, backward_only
from ._base import linear as _linear


@strict
def control(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The bug-free base implementation (tests/mutants/_base.py); must pass."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens)


@mutant(WINDOW)
def start_off_by_one(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Every window starts one token early (masked to zero before the
    sequence start), so it misses its last token.

    The start derived from the window's last token as ``last - L`` where
    ``last - L + 1`` is meant (inclusive vs exclusive end)."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, bugs=Bugs(start_shift=-1))


@mutant(PE)
def pe_reversed(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Window position j gets pe[h, L - 1 - j].

    A kernel that walks the window backwards from its last token (as a
    causal kernel likes to) and indexes pe by the loop counter."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, bugs=Bugs(pe_reversed=True))


@mutant(BIAS_ACT)
def bias_per_position(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The bias is added once per window position: L * bias[g].

    ``acc += tl.dot(x_j, w_j) + b`` inside the loop over positions instead
    of once after it."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, bias_per_position=True)


@mutant(HALF)
def half_accumulate(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The L * D products are accumulated in x's dtype, one rounding each.

    A Triton accumulator declared with x's dtype (or ``tl.dot(...,
    out_dtype=x.dtype)`` chained across positions): exact in float32 and
    float64, wrong by many ulps in float16/bfloat16 over long sums."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, bugs=Bugs(half_accumulate=True))


@mutant(CONTIGUOUS)
def assumes_contiguous(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Reads x's storage with the strides of a contiguous (B, H, T, D) tensor.

    A kernel given ``x.data_ptr()`` that computes offsets from the shape
    (``((b * H + h) * T + t) * D + d``) instead of ``x.stride()``: keys
    stored (B, T, H, D) and passed as ``k.transpose(1, 2)`` come out as
    garbage, without an error."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, bugs=Bugs(assume_contiguous=True))


@mutant(WEIGHT_LAYOUT)
def flipped_kernel(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Window position j is multiplied by weight[g, L - 1 - j].

    Convolution instead of cross-correlation (an FFT or a hand-written
    conv flips the kernel; ``nn.Conv1d`` does not)."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, flip_kernel=True)


@mutant(TILE)
def second_feature_tile(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Input features d >= 64 are read from the first feature tile (feature
    d mod 64); the weight rows are right.

    A kernel whose reduction loop over D runs in BLOCK_D = 64 tiles and
    advances the weight pointer but loads x at ``o_d`` instead of
    ``i_k * BLOCK_D + o_d``: exact whenever D <= 64, which is every head dim
    the small-shape properties draw."""
    return _linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                   cu_seqlens=cu_seqlens, bugs=Bugs(feature_tile=64))


@mutant(GRAD_HALF)
def weight_grad_half_accumulate(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None,
                                cu_seqlens=None):
    """The weight's gradient is summed over the windows in x's dtype, one rounding per window.

    A dW kernel that reduces each window's X^T g in float32 but carries the
    sum over windows and batch in a buffer of the weight's dtype (``dw +=``
    into a bfloat16/float16 tensor, or atomics into it): exact in float32
    and float64, off by many ulps in half precision."""
    return backward_only(_linear, dict(bugs=Bugs(param_grad="half")), x, weight, bias, block_size=block_size,
                         stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


@mutant(GRAD_LAYOUT)
def dx_weight_read_row_major(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None,
                             cu_seqlens=None):
    """x's gradient multiplies g by weight[g, j]'s memory read as a row-major (D_out, D) matrix, not by weight[g, j]^T.

    dX = g W^T in a kernel that loads the W^T tile at offsets ``o * D + d``
    (W^T's shape with row-major strides) instead of ``d * D_out + o`` (W's
    strides swapped): with D == D_out it multiplies by W instead of W^T,
    otherwise by a reshuffle of W. The forward and dW are right; right
    when D == 1 or D_out == 1."""
    return backward_only(_linear, dict(dx_weight_row_major=True), x, weight, bias, block_size=block_size,
                         stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


@mutant(GRAD_TILE)
def dx_second_feature_tile_lost(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None,
                                cu_seqlens=None):
    """Input features d >= 64 get no gradient (dx is zero there).

    A dx kernel that tiles D in BLOCK_D = 64 and launches one program per
    feature tile with a grid computed as if D <= BLOCK_D: exact whenever
    D <= 64, which is every head dim the gradient property draws."""
    return backward_only(_linear, dict(bugs=Bugs(dx_feature_tile=64)), x, weight, bias, block_size=block_size,
                         stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
