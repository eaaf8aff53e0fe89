"""gated_pool mutants: s = z + bias[g] (pads -inf); y[f] = sum_j softmax_j(s[:, f])[j] x[j, f], gone wrong
(SPEC 3b, DeepSeek-V4's compressor core)."""

from __future__ import annotations

from . import (
    BIAS_ACT,
    FLATTEN,
    GRAD_CHUNK,
    GRAD_GROUPS,
    GROUPS,
    HALF,
    PACKED,
    PADDING,
    SOFTMAX,
    TILE,
    WINDOW_COUNT,
    mutant,
    strict,
)
from ._base import Bugs, backward_only
from ._base import gated_pool as _gated_pool


@strict
def control(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """The bug-free base implementation (tests/mutants/_base.py); must pass."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens)


@mutant(PADDING)
def pads_weighted_as_zero_tokens(x, z, bias=None, *, split=False, block_size, stride, padding="valid",
                                 cu_seqlens=None):
    """A left pad takes part in the softmax as a zero token (score 0 + bias).

    A kernel that zero-fills the masked loads of both x and z (``other=0``)
    and forgets that a pad's *score* must be -inf: DeepSeek-V4's overlap
    transform fills the missing group's scores with -inf, its values with 0."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, pads_weighted=True)


@mutant(FLATTEN)
def chunks_reversed(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """With split, the first S positions read the last feature chunk.

    The overlap transform with its halves swapped: the previous group's
    part taken from the features [d, 2d) and the current group's from
    [0, d)."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, chunk_reversed=True)


@mutant(BIAS_ACT)
def bias_of_first_chunk(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """Position j gets bias[g, j mod S]: every chunk reuses the first chunk's position bias.

    DeepSeek-V4's ``ape`` has R rows (one per position in a group), so a
    port that indexes the (L, D_out) bias by position mod R reads the wrong
    rows for the previous group's half of a CSA window."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, bias_per_chunk=False)


@mutant(SOFTMAX)
def softmax_over_features(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """The softmax normalises over the features instead of the window positions."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, softmax_dim=4)


@mutant(GROUPS)
def group_by_modulo(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """Head h uses bias set h % G instead of h // (H // G).

    The interleaved mapping of grouped-query attention code; equal when
    G = 1 or G = H."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, bugs=Bugs(group_of_head=lambda h, H, G: h % G))


@mutant(HALF)
def half_precision_pooling(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """Scores, softmax and the weighted sum in x's dtype.

    A kernel that keeps the loaded tiles in bfloat16/float16 and
    accumulates there: each term rounds, so long windows drift."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, bugs=Bugs(half_accumulate=True))


@mutant(WINDOW_COUNT)
def no_window_at_exact_length(x, z, bias=None, *, split=False, block_size, stride, padding="valid",
                              cu_seqlens=None):
    """padding="valid": a sequence of exactly L tokens gets no window."""
    def count(n, L, S, padding):
        if padding == "left":
            return n // S
        return (n - L) // S + 1 if n > L else 0

    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, bugs=Bugs(count=count))


@mutant(PACKED)
def packed_pad_bleed(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """padding="left" with cu_seqlens: later sequences read their
    predecessor's last L - S tokens where pads belong (and weight them)."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, bugs=Bugs(pad_each_sequence=False))


@mutant(TILE)
def long_offset_zeroed(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """Tokens 4096 and later in a sequence are dropped (weight 0), as if masked out.

    A load mask bounded by a constexpr MAX_SEQLEN = 4096 instead of the
    sequence's length; every shorter sequence is right."""
    return _gated_pool(x, z, bias, split=split, block_size=block_size, stride=stride, padding=padding,
                       cu_seqlens=cu_seqlens, bugs=Bugs(max_offset=4096))


@mutant(GRAD_GROUPS)
def bias_grad_first_head_only(x, z, bias=None, *, split=False, block_size, stride, padding="valid",
                              cu_seqlens=None):
    """bias's gradient comes only from the first head of each group.

    A dbias kernel with one program per group that reduces the scores'
    gradient of head g * (H // G) only, without its loop over the group's
    H / G heads. Right when G == H."""
    return backward_only(_gated_pool, dict(bugs=Bugs(param_grad_first_head=True)), x, z, bias, split=split,
                         block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens)


@mutant(GRAD_CHUNK)
def z_grad_missing_last_chunk(x, z, bias=None, *, split=False, block_size, stride, padding="valid",
                              cu_seqlens=None):
    """With split, the positions of the last feature chunk send no gradient to z.

    The backward of DeepSeek-V4's overlap transform storing dz for the
    previous group's half of a window (features [0, d)) and not for the
    current group's (features [d, 2d)). Right without split."""
    return backward_only(_gated_pool, dict(z_grad_chunk=-1), x, z, bias, split=split, block_size=block_size,
                         stride=stride, padding=padding, cu_seqlens=cu_seqlens)
