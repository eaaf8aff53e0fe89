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

import math

from hypothesis import strategies as st

from kvcompress.kinds import ACTIVATIONS, PADDINGS

from .cases import LAYOUTS, Case
from .domain import FULL, Domain
from .records import RECORDS

# value exponents: x ~ N(0, 1) * 2**x_exp. float16 reaches into its
# subnormals (2**-14) and stays far from 65504 once summed.
X_EXP = {"float64": (-60, 60), "float32": (-40, 40), "float16": (-16, 6), "bfloat16": (-40, 40)}
W_EXP = {"float64": (-20, 20), "float32": (-12, 12), "float16": (-6, 3), "bfloat16": (-12, 12)}
LOGIT_EXP = (-10, 3)


def seq_lengths(L: int, S: int, padding: str, max_windows: int, *, min_windows: int = 0) -> st.SearchStrategy[int]:
    """Sequence lengths drawn by window count (min_windows..max_windows) plus
    0..S-1 trailing tokens, so that empty and shorter-than-a-window sequences
    come up about once in max_windows + 1 draws, not most of the time."""
    def length(nr):
        n, r = nr
        if padding == "left":
            return n * S + r
        return L + (n - 1) * S + r if n > 0 else r * L // S   # n == 0: 0 <= T < L

    return st.tuples(st.integers(min_windows, max(min_windows, max_windows)), st.integers(0, S - 1)).map(length)


@st.composite
def cases(draw, *, kind: str, dtype: str, max_batch: int = 3, max_heads: int = 6, max_dim: int = 10,
          max_block: int = 6, max_windows: int = 6, max_seqs: int = 4, packed: bool | None = None,
          layouts: tuple[str, ...] = LAYOUTS, paddings: tuple[str, ...] = PADDINGS,
          magnitudes: bool = True, domain: Domain = FULL) -> Case:
    """A valid Case of ``kind`` in ``dtype``, inside ``domain``.

    max_windows bounds the windows per sequence; packed=None draws both
    batched and packed inputs. The size caps (max_*) bound the cost of an
    example; ``domain`` (kvcompress.testing.Domain) says what the
    implementation supports, and nothing outside it is ever drawn: a block
    size set, a stride rule, a head-dim multiple or a group rule replaces the
    corresponding draw rather than filtering it (a domain whose smallest
    block size exceeds max_block draws that block size). With the full
    domain the draws are exactly those of the unrestricted strategy.
    """
    rec = RECORDS[kind]
    caps = [(v, getattr(domain, f"max_{n}")) for n, v in (("batch", max_batch), ("heads", max_heads),
                                                        ("dim", max_dim))]
    max_batch, max_heads, max_dim = (v if cap is None else min(v, cap) for v, cap in caps)
    options = domain.block_size_options(max_block)
    if options is None:
        L = draw(st.integers(1, max_block), label="block_size")
    else:
        L = draw(st.sampled_from(options or domain.block_sizes[:1]), label="block_size")
    # gated_pool's split needs S | L and C = L / S dividing D: drawn first,
    # then S among the divisors of L (C = 1 only when L has no other)
    split = "split" in rec.kind.option_names and draw(st.booleans(), label="split")
    if domain.strides == "any":
        if split:
            S = draw(st.sampled_from([s for s in range(1, L + 1) if L % s == 0 and (s < L or L == 1)]),
                     label="stride")
        else:
            S = draw(st.integers(1, L), label="stride")
    else:
        S = draw(st.sampled_from(domain.stride_options(L)), label="stride")
        split = split and L % S == 0
    padding = draw(st.sampled_from(tuple(p for p in paddings if p in domain.paddings)), label="padding")
    if domain.groups == "any":
        G = draw(st.integers(1, max_heads), label="groups")
        H = G * draw(st.integers(1, max(1, max_heads // G)), label="heads_per_group")
    else:
        H = draw(st.integers(1, max_heads), label="heads")
        G = H if domain.groups == "per_head" else 1
    m = domain.head_dim_multiple
    dims = st.integers(1, max_dim) if m == 1 else st.integers(1, max(1, max_dim // m)).map(lambda k: k * m)
    if split:   # D a multiple of C (and of the domain's multiple)
        m_split = math.lcm(m, L // S)
        D = draw(st.integers(1, max(1, max(max_dim, m_split) // m_split)).map(lambda k: k * m_split), label="D")
    else:
        D = draw(dims, label="D")
    if packed is not None:
        is_packed = packed
    elif len(domain.inputs) == 2:
        is_packed = draw(st.booleans(), label="packed")
    else:
        is_packed = domain.inputs == ("packed",)
    min_windows = 0 if domain.empty else 1
    if domain.max_tokens is not None:   # the longest sequence a window count may make stays within max_tokens
        budget = domain.max_tokens // (max_seqs if is_packed else 1)
        fit = budget // S if padding == "left" else ((budget - L) // S + 1 if budget >= L else 0)
        max_windows = max(min_windows, min(max_windows, fit - 1))   # - 1: room for the S - 1 trailing tokens
    lengths = seq_lengths(L, S, padding, max_windows, min_windows=min_windows)
    if is_packed:
        seqlens = tuple(draw(st.lists(lengths, min_size=0 if domain.empty else 1, max_size=max_seqs),
                             label="seqlens"))
        B, T = 1, sum(seqlens)
        cu_dtype = draw(st.sampled_from(("int32", "int64")), label="cu_dtype")
    else:
        seqlens, cu_dtype = None, "int32"
        B = draw(st.integers(0 if domain.empty else 1, max_batch), label="B")
        T = draw(lengths, label="T")
    fields = dict(kind=kind, dtype=dtype, B=B, H=H, G=G, T=T, D=D, block_size=L, stride=S, padding=padding,
                  seqlens=seqlens, cu_dtype=cu_dtype)
    fields["use_pe"] = draw(st.booleans(), label="pe") if domain.pe and rec.kind.pe else False
    if "split" in rec.kind.option_names:
        fields["split"] = split
    if rec.has_dout:
        fields["D_out"] = D if domain.d_out_equals_d else draw(dims, label="D_out")
    if rec.has_bias:
        fields["bias"] = draw(st.booleans(), label="bias") if domain.bias else False
    if rec.has_hidden:
        max_f = 2 * max_dim if domain.max_hidden is None else min(2 * max_dim, domain.max_hidden)
        fields["F"] = draw(st.integers(1, max_f), label="F")
        fields["bias2"] = draw(st.booleans(), label="bias2") if domain.bias2 else False
        fields["activation"] = draw(st.sampled_from(tuple(a for a in ACTIVATIONS if a in domain.activations)),
                                    label="activation")
    fields["layout"] = draw(st.sampled_from(tuple(v for v in layouts if v in domain.layouts)), label="layout")
    fields["params_contiguous"] = draw(st.booleans(), label="params_contiguous")
    fields["seed"] = draw(st.integers(0, 2 ** 32 - 1), label="seed")
    if magnitudes:
        fields["x_exp"] = draw(st.integers(*X_EXP[dtype]), label="x_exp")
        if kind == "gated_pool":
            # gate scores z and the bias are logits: their scale decides
            # conditioning, as attention_pool's logits do
            fields["w_exp"] = draw(st.integers(*LOGIT_EXP), label="logit_exp")
        elif kind == "attention_pool":
            # the logits' scale, not the weights', decides conditioning: keep
            # |x| @ |W| near 2**logit_exp so few cases fail the 1/8 test
            lo, hi = W_EXP[dtype]
            logit_exp = draw(st.integers(*LOGIT_EXP), label="logit_exp")
            fields["w_exp"] = min(max(logit_exp - fields["x_exp"], lo), hi)
        else:
            fields["w_exp"] = draw(st.integers(*W_EXP[dtype]), label="w_exp")
    return Case(**fields)
