"""Hypothesis strategies for kvcompress configurations, reused by every
property and by contributors.

``cases(kind=..., dtype=...)`` draws a valid Case: heads and groups with
G | H (one shared set, one set per head, or 1 < G < H: the one grouping
where head h's set h // (H // G) differs from h % G), sequences of up to
several windows (packed with cu_seqlens or batched), odd head dims,
1 <= S <= L, both paddings, pe, biases and activations, memory layouts,
and value magnitudes from tiny to large within the dtype's safe range.
Empty outputs (B == 0, or no sequence as long as a window) are one explicit
branch, ``EMPTY``: every property's first example, then about one draw in
16; the other draws have a window at least (a packed batch's other
sequences may still be empty or short). Every draw is labelled, so a
failure prints which choice made it.
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
# the empty branch, the first draw of a case: at index 0, so Hypothesis's
# first (simplest) example of a property is empty; after it one draw in 16
# (sampled_from picks uniformly, where integers(0, n) would favour its
# bounds; a later draw would be left at its simplest value, empty, by
# Hypothesis's early zero-extended examples)
EMPTY = (True,) + (False,) * 15
# how G | H is drawn: G == 1, G == H, or 1 < G < H (needs H >= 4)
GROUPINGS = ("shared", "per_head", "grouped")


def seq_lengths(L: int, S: int, padding: str, max_windows: int, *, min_windows: int = 0,
                max_tokens: int | None = None) -> st.SearchStrategy[int]:
    """Sequence lengths drawn by window count (min_windows..max_windows) plus
    0..S-1 trailing tokens, so that empty and shorter-than-a-window sequences
    come up about once in max_windows + 1 draws, not most of the time.
    max_tokens caps the lengths without a window (they stay windowless)."""
    def length(nr):
        n, r = nr
        if padding == "left":
            t = n * S + r
        else:
            t = L + (n - 1) * S + r if n > 0 else r * L // S   # n == 0: 0 <= T < L
        return t if n > 0 or max_tokens is None else min(t, max_tokens)

    return st.tuples(st.integers(min_windows, max(min_windows, max_windows)), st.integers(0, S - 1)).map(length)


@st.composite
def groups_and_heads(draw, max_heads: int, max_grouped_heads: int | None = None) -> tuple[int, int]:
    """(G, H) with G | H, each grouping (GROUPINGS) that fits equally
    likely: G == 1 or G == H with H <= max_heads, or 1 < G < H (where the
    head -> set mapping h // (H // G) differs from h % G) with H <=
    max_grouped_heads (default max_heads; it needs 4)."""
    max_grouped = max_heads if max_grouped_heads is None else max_grouped_heads
    fits = [g for g in GROUPINGS if g != "grouped" or max_grouped >= 4]
    grouping = draw(st.sampled_from(fits), label="grouping")
    if grouping == "grouped":
        G = draw(st.integers(2, max_grouped // 2), label="groups")
        return G, G * draw(st.integers(2, max_grouped // G), label="heads_per_group")
    H = draw(st.integers(1, max_heads), label="heads")
    return (1 if grouping == "shared" else H), H


@st.composite
def cases(draw, *, kind: str, dtype: str, max_batch: int = 3, max_heads: int = 6,
          max_grouped_heads: int | None = None, max_rows: int | None = None, max_dim: int = 10,
          max_block: int = 6, max_windows: int = 6, max_seqs: int = 4, packed: bool | None = None,
          layouts: tuple[str, ...] = LAYOUTS, paddings: tuple[str, ...] = PADDINGS,
          magnitudes: bool = True, domain: Domain = FULL) -> Case:
    """A valid Case of ``kind`` in ``dtype``, inside ``domain``.

    max_windows bounds the windows per sequence; packed=None draws both
    batched and packed inputs. max_grouped_heads replaces max_heads when
    1 < G < H (which needs H >= 4), and max_rows bounds B * H, x's (b, h)
    rows: an emulated kernel pays per row, and these keep its cases small
    but for that one grouping, drawn with one batch row. The size caps
    (max_*) bound the cost of an example; ``domain``
    (kvcompress.testing.Domain) says what the implementation supports, and
    nothing outside it is ever drawn: a block size set, a stride rule, a
    head-dim multiple or a group rule replaces the corresponding draw rather
    than filtering it (a domain whose smallest block size exceeds max_block
    draws that block size). With the full domain the draws are exactly those
    of the unrestricted strategy.
    """
    rec = RECORDS[kind]
    empty = domain.empty and draw(st.sampled_from(EMPTY), label="empty")
    caps = [(v, getattr(domain, f"max_{n}")) for n, v in (("batch", max_batch), ("heads", max_heads),
                                                        ("dim", max_dim))]
    max_batch, max_heads, max_dim = (v if cap is None else min(v, cap) for v, cap in caps)
    max_grouped_heads = min(c for c in (max_heads if max_grouped_heads is None else max_grouped_heads,
                                        domain.max_heads, max_rows) if c is not None)
    max_heads = max_heads if max_rows is None else min(max_heads, max_rows)
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
        G, H = draw(groups_and_heads(max_heads, max_grouped_heads), label="groups")
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
    min_windows, budget, fits = (0 if domain.empty else 1), None, True
    if domain.max_tokens is not None:   # the longest sequence a window count may make stays within max_tokens
        budget = domain.max_tokens // (max_seqs if is_packed else 1)
        fit = budget // S if padding == "left" else ((budget - L) // S + 1 if budget >= L else 0)
        fits = fit - 1 >= 1                                # - 1: room for the S - 1 trailing tokens
        max_windows = max(1, min(max_windows, fit - 1))
    # empty: zero windows in all (B == 0, or every sequence shorter than a
    # window); forced when no window fits in the domain's max_tokens
    empty = domain.empty and (empty or not fits)
    lengths = seq_lengths(L, S, padding, max_windows if fits else 0, min_windows=min_windows, max_tokens=budget)
    short = seq_lengths(L, S, padding, 0, max_tokens=budget)       # no window
    windowed = seq_lengths(L, S, padding, max_windows, min_windows=1)
    if is_packed:
        if empty:
            seqlens = draw(st.lists(short, max_size=max_seqs), label="seqlens")
        else:   # a sequence with windows, at any place among the others (with domain.empty: any length)
            seqlens = draw(st.lists(lengths, max_size=max_seqs - 1), label="seqlens")
            seqlens.insert(draw(st.integers(0, len(seqlens)), label="windowed_seq"), draw(windowed, label="windowed"))
        seqlens = tuple(seqlens)
        B, T = 1, sum(seqlens)
        cu_dtype = draw(st.sampled_from(("int32", "int64")), label="cu_dtype")
    else:
        seqlens, cu_dtype = None, "int32"
        rows = max_batch if max_rows is None else max(1, min(max_batch, max_rows // H))
        if empty:   # no batch row (then any T), or sequences shorter than a window
            B = draw(st.integers(0, rows), label="B")
            T = draw(lengths if B == 0 else short, label="T")
        else:
            B = draw(st.integers(1, rows), label="B")
            T = draw(windowed, label="T")
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
