"""Hypothesis strategies for kvcompress configurations, reused by every
property and by contributors.

``cases(kind=..., dtype=...)`` draws a valid Case: batch from 0, heads and
groups with G | H, sequences from empty to several windows (packed with
cu_seqlens or batched), odd head dims, 1 <= S <= L, both paddings, pe,
biases and activations, memory layouts, and value magnitudes from tiny to
large within the dtype's safe range. Every draw is labelled, so a failure
prints which choice made it.
"""

from __future__ import annotations

from hypothesis import strategies as st

from .cases import LAYOUTS, Case
from .records import RECORDS

# value exponents: x ~ N(0, 1) * 2**x_exp. float16 reaches into its
# subnormals (2**-14) and stays far from 65504 once summed.
X_EXP = {"float64": (-60, 60), "float32": (-40, 40), "float16": (-16, 6), "bfloat16": (-40, 40)}
W_EXP = {"float64": (-20, 20), "float32": (-12, 12), "float16": (-6, 3), "bfloat16": (-12, 12)}
LOGIT_EXP = (-10, 3)
PADDINGS = ("valid", "left")
ACTIVATIONS = ("relu", "gelu", "silu")


def seq_lengths(L: int, S: int, padding: str, max_windows: int) -> st.SearchStrategy[int]:
    """Sequence lengths drawn by window count (0..max_windows) plus 0..S-1
    trailing tokens, so that empty and shorter-than-a-window sequences come
    up about once in max_windows + 1 draws, not most of the time."""
    def length(nr):
        n, r = nr
        if padding == "left":
            return n * S + r
        return L + (n - 1) * S + r if n > 0 else r * L // S   # n == 0: 0 <= T < L

    return st.tuples(st.integers(0, max_windows), st.integers(0, S - 1)).map(length)


@st.composite
def cases(draw, *, kind: str, dtype: str, max_batch: int = 3, max_heads: int = 6, max_dim: int = 10,
          max_block: int = 6, max_windows: int = 6, max_seqs: int = 4, packed: bool | None = None,
          layouts: tuple[str, ...] = LAYOUTS, paddings: tuple[str, ...] = PADDINGS,
          magnitudes: bool = True) -> Case:
    """A valid Case of ``kind`` in ``dtype``.

    max_windows bounds the windows per sequence; packed=None draws both
    batched and packed inputs.
    """
    rec = RECORDS[kind]
    L = draw(st.integers(1, max_block), label="block_size")
    S = draw(st.integers(1, L), label="stride")
    padding = draw(st.sampled_from(paddings), label="padding")
    G = draw(st.integers(1, max_heads), label="groups")
    H = G * draw(st.integers(1, max(1, max_heads // G)), label="heads_per_group")
    D = draw(st.integers(1, max_dim), label="D")
    is_packed = draw(st.booleans(), label="packed") if packed is None else packed
    lengths = seq_lengths(L, S, padding, max_windows)
    if is_packed:
        seqlens = tuple(draw(st.lists(lengths, min_size=0, max_size=max_seqs), label="seqlens"))
        B, T = 1, sum(seqlens)
        cu_dtype = draw(st.sampled_from(("int32", "int64")), label="cu_dtype")
    else:
        seqlens, cu_dtype = None, "int32"
        B = draw(st.integers(0, max_batch), label="B")
        T = draw(lengths, label="T")
    fields = dict(kind=kind, dtype=dtype, B=B, H=H, G=G, T=T, D=D, block_size=L, stride=S, padding=padding,
                  seqlens=seqlens, cu_dtype=cu_dtype)
    fields["use_pe"] = draw(st.booleans(), label="pe")
    if rec.has_dout:
        fields["D_out"] = draw(st.integers(1, max_dim), label="D_out")
    if rec.has_bias:
        fields["bias"] = draw(st.booleans(), label="bias")
    if rec.has_hidden:
        fields["F"] = draw(st.integers(1, 2 * max_dim), label="F")
        fields["bias2"] = draw(st.booleans(), label="bias2")
        fields["activation"] = draw(st.sampled_from(ACTIVATIONS), label="activation")
    fields["layout"] = draw(st.sampled_from(layouts), label="layout")
    fields["params_contiguous"] = draw(st.booleans(), label="params_contiguous")
    fields["seed"] = draw(st.integers(0, 2 ** 32 - 1), label="seed")
    if magnitudes:
        fields["x_exp"] = draw(st.integers(*X_EXP[dtype]), label="x_exp")
        if kind == "attention_pool":
            # the logits' scale, not the weights', decides conditioning: keep
            # |x| @ |W| near 2**logit_exp so few cases fail the 1/8 test
            lo, hi = W_EXP[dtype]
            logit_exp = draw(st.integers(*LOGIT_EXP), label="logit_exp")
            fields["w_exp"] = min(max(logit_exp - fields["x_exp"], lo), hi)
        else:
            fields["w_exp"] = draw(st.integers(*W_EXP[dtype]), label="w_exp")
    return Case(**fields)
