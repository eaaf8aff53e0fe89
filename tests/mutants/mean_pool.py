"""mean_pool mutants: mean of every window, y = (1/L) sum_j X[j], gone wrong."""

from __future__ import annotations

from . import GRAD_OVERLAP, GRAD_PE_PADS, HALF, MIXING, NAN, PADDING, WINDOW_COUNT, mutant, strict
from ._base import Bugs, backward_only
from ._base import banded_mean_pool as _banded
from ._base import mean_pool as _mean_pool


@strict
def control(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The bug-free base implementation (tests/mutants/_base.py); must pass."""
    return _mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


@mutant(PADDING)
def causal_conv_padding(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """padding="left" prepends L - 1 zero tokens instead of L - S.

    A kernel written as a causal convolution pads kernel_size - 1 on the
    left; the seed's ZeroPad pads L - S. The two agree only for stride 1."""
    return _mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens,
                      bugs=Bugs(left_pad=lambda L, S: L - 1))


@mutant(PADDING)
def pad_tokens_not_counted(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Divides each window's sum by its number of real tokens, not by L.

    ``F.avg_pool1d(..., count_include_pad=False)``, or a kernel dividing by
    the popcount of its load mask: left-padded windows come out too large;
    full windows are right."""
    return _mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens,
                      divide_by_real_tokens=True)


@mutant(WINDOW_COUNT)
def trailing_partial_window(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """padding="left" emits ceil(T / S) windows: the T mod S trailing tokens
    form an extra, zero-filled window.

    A launch grid of cdiv(T, S) programs with masked loads past the end:
    nothing crashes and the last program writes a window SPEC says does not
    exist (it would leak the future to a causal mask)."""
    def count(n, L, S, padding):
        return -(-n // S) if padding == "left" else ((n - L) // S + 1 if n >= L else 0)

    return _mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens,
                      bugs=Bugs(count=count))


@mutant(NAN)
def banded_matmul(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Computes every window mean as one dense (W, T) @ (T, D) matmul with a
    banded averaging matrix.

    Pooling as a matmul (or a convolution lowered to a dense Toeplitz
    matrix) is exact on finite input, but 0 * NaN = NaN and 0 * inf = NaN:
    one bad token poisons every window of its row."""
    return _banded(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


@mutant(MIXING)
def heads_batch_reshape(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Output computed as (H, B, W, D) and returned with reshape(B, H, W, D)
    instead of a permute.

    A kernel whose grid is (head, batch) writes head-major; the wrapper
    views the buffer with the user's shape. Right whenever B == 1 or H == 1."""
    y = _mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
    return y.transpose(0, 1).reshape(y.shape)        # [H, B, W, D] memory read as [B, H, W, D]


@mutant(HALF)
def half_accumulate(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Sums the window in x's dtype (one rounding per token), then divides.

    ``acc = tl.zeros(..., dtype=x.dtype)`` in a Triton kernel: exact in
    float32/float64, a few ulps off in float16/bfloat16."""
    return _mean_pool(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens,
                      bugs=Bugs(half_accumulate=True))


@mutant(GRAD_PE_PADS)
def pe_grad_skips_pads(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """pe's gradient skips the left-pad positions; the forward adds pe there, as it must.

    A backward kernel that accumulates dpe[h, j] in its loop over the
    window's tokens under x's load mask: a pad is no token of x, so its
    position's contribution to dpe is never added, although a pad token is
    pe[h, j] in the forward (SPEC section 2)."""
    return backward_only(_mean_pool, dict(bugs=Bugs(dpe_on_pad=False)), x, block_size=block_size, stride=stride,
                         padding=padding, pe=pe, cu_seqlens=cu_seqlens)


@mutant(GRAD_OVERLAP)
def dx_doubled_on_overlaps(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """A token held by several windows gets each of their gradients twice.

    A dx kernel with one program per window adding its part atomically,
    with the fix-up pass for the tokens that neighbouring windows share
    (written for a store-only version) left enabled: every shared token's
    contributions are added again. Right when S == L (no token is shared)."""
    return backward_only(_mean_pool, dict(bugs=Bugs(dx_overlap="double")), x, block_size=block_size,
                         stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
