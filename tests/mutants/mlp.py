"""mlp mutants: y = act(flat(X) @ w1[g] + b1[g]) @ w2[g] + b2[g], gone wrong."""

from __future__ import annotations

from . import BIAS_ACT, FLATTEN, GRAD_SPLIT_K, GROUPS, mutant, strict
from ._base import WRONG_ACTIVATIONS, Bugs, backward_only
from ._base import mlp as _mlp


@strict
def control(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
            cu_seqlens=None):
    """The bug-free base implementation (tests/mutants/_base.py); must pass."""
    return _mlp(x, w1, b1, w2, b2, activation=activation, block_size=block_size, stride=stride, padding=padding,
                pe=pe, cu_seqlens=cu_seqlens)


@mutant(FLATTEN)
def feature_major(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
                  cu_seqlens=None):
    """Flattens the window feature-major, (d n), instead of token-major (n d).

    ``window.transpose(-1, -2).reshape(...)`` or a kernel looping d outside
    j: the seed's ``Rearrange('b h w n d -> b h w (n d)')`` is token-major.
    Right when L == 1 or D == 1."""
    return _mlp(x, w1, b1, w2, b2, activation=activation, block_size=block_size, stride=stride, padding=padding,
                pe=pe, cu_seqlens=cu_seqlens, feature_major=True)


@mutant(BIAS_ACT)
def gelu_tanh(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
              cu_seqlens=None):
    """activation="gelu" uses the tanh approximation instead of the exact erf form.

    Triton has no erf-free fast path, so kernels often write the tanh GELU
    (|error| up to about 5e-4 |z|): invisible in bfloat16, wrong in
    float32."""
    return _mlp(x, w1, b1, w2, b2, activation=activation, block_size=block_size, stride=stride, padding=padding,
                pe=pe, cu_seqlens=cu_seqlens, activations={"gelu": WRONG_ACTIVATIONS["gelu_tanh"]})


@mutant(BIAS_ACT)
def relu_swallows_nan(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
                      cu_seqlens=None):
    """relu is ``where(z > 0, z, 0)``, which turns NaN into 0.

    ``tl.where(z > 0, z, 0.0)`` or ``max(0, z)`` with the comparison the
    wrong way round: a NaN token's window comes out finite (b2), and the
    NaN that should flag it is lost."""
    return _mlp(x, w1, b1, w2, b2, activation=activation, block_size=block_size, stride=stride, padding=padding,
                pe=pe, cu_seqlens=cu_seqlens, activations={"relu": WRONG_ACTIVATIONS["relu_where"]})


@mutant(BIAS_ACT)
def b2_only_with_b1(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
                    cu_seqlens=None):
    """b2 is dropped when b1 is None.

    One ``HAS_BIAS`` constexpr for both layers of a fused kernel, set from
    b1: right whenever both biases or neither are given."""
    return _mlp(x, w1, b1, w2, b2, activation=activation, block_size=block_size, stride=stride, padding=padding,
                pe=pe, cu_seqlens=cu_seqlens, b2_only_with_b1=True)


@mutant(GROUPS)
def group_modulo(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None,
                 cu_seqlens=None):
    """Head h uses weight group h % G instead of h // (H // G).

    The GQA mapping written the other way round (interleaved instead of
    contiguous groups): right when G == 1 or G == H."""
    return _mlp(x, w1, b1, w2, b2, activation=activation, block_size=block_size, stride=stride, padding=padding,
                pe=pe, cu_seqlens=cu_seqlens, bugs=Bugs(group_of_head=lambda h, H, G: h % G))


@mutant(GRAD_SPLIT_K)
def w1_grad_first_split_only(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid",
                             pe=None, cu_seqlens=None):
    """w1's gradient comes only from the first half of the B * W windows.

    A split-K dW1 kernel: two programs each reduce half of the windows into
    a partial, and the final reduction adds only partial 0 (the second
    partial's buffer never read). Right when B * W == 1."""
    return backward_only(_mlp, dict(bugs=Bugs(param_grad="first_half")), x, w1, b1, w2, b2, activation=activation,
                         block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
