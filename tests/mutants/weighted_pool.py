"""weighted_pool mutants: y = sum_j weight[g, j] X[j], gone wrong."""

from __future__ import annotations

from . import DTYPE, GRAD_OVERLAP, GROUPS, PACKED, PE, TILE, WINDOW, mutant, strict
from ._base import Bugs, backward_only
from ._base import weighted_pool as _weighted_pool


@strict
def control(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The bug-free base implementation (tests/mutants/_base.py); must pass."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens)


@mutant(WINDOW)
def stride_is_block_size(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Window i starts at i * L instead of i * S (the window count is right).

    A kernel first written for non-overlapping blocks (S == L, as in many
    NSA forks) whose pointer arithmetic still steps by block_size after
    stride was added; reads past the end are masked to zero."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens, bugs=Bugs(step=lambda L, S: L))


@mutant(PE)
def pe_not_on_pad_tokens(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """pe is added only to real tokens: left-pad tokens stay zero instead of
    becoming pe[h, j].

    ``tl.load(x, mask=m_t, other=0) + tl.load(pe, mask=m_t, other=0)``:
    one mask for both loads. The seed pads first and adds pe after, so pad
    positions carry pe."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens, bugs=Bugs(pe_on_pad=False))


@mutant(DTYPE)
def returns_accumulation_dtype(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Returns the float32 accumulator for float16/bfloat16 input.

    The output buffer allocated with ``torch.empty(..., dtype=torch.float32)``
    or a forgotten ``.to(x.dtype)``: values are right, the dtype is not."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens, bugs=Bugs(out_in_input_dtype=False))


@mutant(GROUPS)
def group_modulo(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Head h uses weight group h % G instead of h // (H // G).

    The GQA mapping written the other way round (interleaved instead of
    contiguous groups): right when G == 1 or G == H."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens, bugs=Bugs(group_of_head=lambda h, H, G: h % G))


@mutant(PACKED)
def stream_aligned_windows(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Packed sequences' windows are anchored at the multiple of S at or
    before the sequence start, so they take tokens of the previous sequence.

    A varlen kernel that tiles the packed stream into global S-aligned
    blocks and maps blocks to sequences: right when every sequence length
    is a multiple of S."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens,
                          bugs=Bugs(seq_start=lambda s, S: s // S * S, pad_each_sequence=False))


@mutant(TILE)
def later_window_block_off_by_one(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Windows from the 257th of a sequence on start one token late (their
    last position reads the next token, or a masked zero at the end).

    A kernel whose programs each pool BLOCK_W = 256 windows and compute
    their first token from the previous block's inclusive end
    (``i_w * BLOCK_W * S + 1``): the first block, all that a short
    sequence has, is right."""
    return _weighted_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                          cu_seqlens=cu_seqlens, bugs=Bugs(late_windows=(256, 1)))


@mutant(GRAD_OVERLAP)
def dx_last_window_wins(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """A token's gradient comes only from the last window that holds it.

    A dx kernel with one program per window that stores (``tl.store``) its
    part where it must add it (``tl.atomic_add``): with overlapping windows
    (S < L) the last writer wins. Right when S == L."""
    return backward_only(_weighted_pool, dict(bugs=Bugs(dx_overlap="last")), x, weight, block_size=block_size,
                         stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
