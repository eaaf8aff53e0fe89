"""attention_pool mutants: Z = X @ weight[g]; y[c] = sum_j softmax_j(Z[:, c])[j] X[j, c], gone wrong."""

from __future__ import annotations

from . import GRAD_OVERLAP, GRAD_SPLIT_K, HALF, PACKED, PE, SOFTMAX, TILE, WEIGHT_LAYOUT, WINDOW_COUNT, mutant, strict
from ._base import Bugs, backward_only
from ._base import attention_pool as _attention_pool


@strict
def control(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The bug-free base implementation (tests/mutants/_base.py); must pass."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens)


@mutant(SOFTMAX)
def softmax_over_features(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """The softmax normalises over the D features instead of the L window positions.

    ``logits.softmax(dim=-1)`` on a (..., L, D) tensor, the habit from
    attention where the last axis is the one to normalise; the seed's
    AttentionPool uses ``dim=-2``."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, softmax_dim=4)


@mutant(SOFTMAX)
def softmax_without_max_shift(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """exp(Z) / sum exp(Z) without subtracting the maximum.

    A hand-written softmax in a kernel: equal in exact arithmetic, but
    exp overflows to inf (inf / inf = NaN) once a logit exceeds ~88 in
    float32 (~709 in float64), and underflows to 0 / 0 below ~-103."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, shift=False)


@mutant(WINDOW_COUNT)
def no_window_at_exact_length(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """padding="valid": a sequence of exactly L tokens gets no window.

    The window count guarded by ``T > L`` instead of ``T >= L`` (the
    off-by-one every bounds check invites): right for every other length."""
    def count(n, L, S, padding):
        if padding == "left":
            return n // S
        return (n - L) // S + 1 if n > L else 0

    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, bugs=Bugs(count=count))


@mutant(PACKED)
def packed_pad_bleed(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """padding="left" with cu_seqlens: only the first packed sequence is
    padded; the others read the previous sequence's last L - S tokens where
    zero pad tokens belong.

    A varlen kernel that masks loads with ``t >= 0`` (the stream start)
    instead of ``t >= seq_start``."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, bugs=Bugs(pad_each_sequence=False))


@mutant(PE)
def pe_only_in_logits(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """pe enters the logits but the pooled values are the raw tokens.

    Treating pe like a rotary/positional term of the scores only: SPEC adds
    pe to the window before compression, so it is pooled as well."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, bugs=Bugs(pe_in_values=False))


@mutant(WEIGHT_LAYOUT)
def transposed_weight(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Z = X @ weight[g].T: the weight read in nn.Linear's (out, in) orientation.

    Porting the seed's ``nn.Linear`` (which computes X @ W.T) without the
    transposition that kvcompress's (G, D, D) weight needs."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, transpose_weight=True)


@mutant(HALF)
def half_logits(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Logits accumulated over D in x's dtype, softmax and pooling too.

    A kernel that keeps ``tl.dot`` outputs and the softmax in the input
    dtype: a bfloat16 logit of size 8 is off by up to 0.03, which moves the
    softmax weights by 3%; SPEC forbids storing logits in the input dtype."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, bugs=Bugs(half_accumulate=True))


@mutant(TILE)
def long_offset_zeroed(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """Tokens 4096 and later in a sequence are read as zeros.

    A load mask that bounds the in-sequence offset by a constexpr
    MAX_SEQLEN = 4096 (the largest sequence the kernel was tuned on)
    instead of the sequence's length: masked loads return ``other=0``
    without an error, and every shorter sequence is right."""
    return _attention_pool(x, weight, block_size=block_size, stride=stride, padding=padding, pe=pe,
                           cu_seqlens=cu_seqlens, bugs=Bugs(max_offset=4096))


@mutant(GRAD_SPLIT_K)
def weight_grad_first_split_only(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """weight's gradient comes only from the first half of the B * W windows.

    A split-K dW kernel: two programs each reduce X^T dZ over half of the
    windows into a partial, and the final reduction adds only partial 0.
    Right when B * W == 1."""
    return backward_only(_attention_pool, dict(bugs=Bugs(param_grad="first_half")), x, weight,
                         block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)


@mutant(GRAD_OVERLAP)
def dx_last_window_wins(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """A token's gradient comes only from the last window that holds it.

    A dx kernel with one program per window that stores its part where it
    must add it: with overlapping windows (S < L) the last writer wins.
    Right when S == L."""
    return backward_only(_attention_pool, dict(bugs=Bugs(dx_overlap="last")), x, weight, block_size=block_size,
                         stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
