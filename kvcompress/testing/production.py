"""Production-shape cases: the sizes NSA runs at, where kernels tile.

``strategies.cases`` stops at D <= 10, L <= 6 and a handful of windows, so a
kernel's second feature tile, its second block of windows or a token offset
past 4096 is never reached there. ``production_cases`` draws NSA-like cases
(NSA, arXiv 2502.11089, uses L = 32, S = 16, D = 128 by default):

- D in {64, 128, 192, 256} (D_out alike for linear and mlp, F modest),
- L in {16, 32, 64}, S from L/4 to L,
- one long sequence per example, batched or packed beside shorter ones
  (empty and shorter-than-a-window ones included where the domain allows),
- H up to 16 with G | H, both paddings, pe, biases, layouts,
- unit-scale values (tokens N(0, 1), weights N(0, 1) / sqrt(fan_in)).

Each example hits, with high probability, the three tile boundaries of a
typical kernel (64-wide feature tiles, 256-window blocks, long sequences):
D > 64, more than 256 windows in a sequence, tokens beyond 4096 in a
sequence; the smallest draw (what Hypothesis tries first and shrinks
towards) hits all three. On the CPU a work budget caps the cost of one
example at about a second (T up to 8k, D up to 128); on a GPU sequences
reach 64k tokens. Everything is drawn inside the implementation's Domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import kvcompress_reference as reference
from hypothesis import strategies as st

from .cases import LAYOUTS, Case
from .domain import FULL, Domain
from .records import RECORDS
from .strategies import ACTIVATIONS, PADDINGS

# the tile boundaries every example should cross (features, windows of one
# sequence, tokens of one sequence): a kernel with 64-wide feature tiles,
# 256 windows per program or 4096-token offsets goes wrong past them
FEATURE_TILE = 64
WINDOW_BLOCK = 256
LONG_OFFSET = 4096
BLOCK_SIZES = (32, 16, 64)     # NSA's default first: the smallest draw


@dataclass(frozen=True)
class Budget:
    """What one example may cost on a device.

    dims: head dims in draw order (the first is the smallest draw).
    max_tokens: tokens of the longest sequence (and of the whole input).
    max_heads, max_batch, max_seqs, max_hidden: caps.
    elements: B * H * T * D (the input, in float64 for the oracle).
    work: multiply-adds of one pass, B * H * T * (L / S) * D * C (C: D_out,
    F or D; 1 for the pools).
    params: elements of the largest parameter (G * L * D * D_out, G * L * D * F).
    """

    dims: tuple[int, ...]
    max_tokens: int
    max_heads: int
    max_batch: int
    max_seqs: int
    max_hidden: int
    elements: int
    work: int
    params: int


BUDGETS = {
    # one example about a second on this project's 2-core CI machine
    "cpu": Budget(dims=(128, 64), max_tokens=8192, max_heads=16, max_batch=4, max_seqs=4, max_hidden=128,
                  elements=2 ** 22, work=2 ** 29, params=2 ** 22),
    # NSA's prefill lengths; the float64 oracle runs on the host
    "cuda": Budget(dims=(128, 256, 192, 64), max_tokens=65536, max_heads=16, max_batch=8, max_seqs=8,
                   max_hidden=256, elements=2 ** 26, work=2 ** 35, params=2 ** 24),
}


def _weighted(draw, options, weights, label):
    """options[i] with probability weights[i] / sum(weights); the first
    option is the smallest draw."""
    k = draw(st.integers(0, sum(weights) - 1), label=label)
    for option, w in zip(options, weights):
        if k < w:
            return option
        k -= w
    raise AssertionError("unreachable")


def _mostly_first(draw, options, label, odds=4):
    """options[0] with probability odds / (odds + 1), else uniform over the rest."""
    if len(options) == 1:
        return options[0]
    rest = len(options) - 1
    return _weighted(draw, options, [odds * rest] + [1] * rest, label)


def tokens_for_windows(W: int, L: int, S: int, padding: str) -> int:
    """The fewest tokens of a sequence with W windows (SPEC section 2)."""
    if W <= 0:
        return 0
    return W * S if padding == "left" else L + (W - 1) * S


def _dims(options, multiple, cap):
    """Head dims: the budget's options that the domain allows, else the
    largest multiples of ``multiple`` up to ``cap``."""
    ok = [d for d in options if d % multiple == 0 and d <= cap]
    if ok:
        return ok
    top = cap // multiple * multiple
    return [d for d in (top, top - multiple) if d >= multiple] or [multiple]


def _per_token_work(kind, D, C, F, L, S):
    """Multiply-adds per token and head of one pass (see Budget.work)."""
    per_window_position = {"mean_pool": D, "weighted_pool": D, "linear": D * C, "mlp": D * F,
                           "attention_pool": D * D, "gated_pool": 2 * D}[kind]
    return max(1, per_window_position * L // S + (F * C if kind == "mlp" else 0))


@st.composite
def production_cases(draw, *, kind: str, dtype: str, device: str = "cpu", domain: Domain = FULL) -> Case:
    """A Case of ``kind`` in ``dtype`` at production shapes, inside ``domain``.

    device: "cpu" or "cuda", which budget (``BUDGETS``) bounds the cost.
    domain: the implementation's kvcompress.testing.Domain; nothing outside
    it is drawn (its block sizes, strides, paddings, inputs, groups, head-dim
    multiple, pe, biases, activations, layouts, empty inputs and size caps).
    Where the domain rules out a tile boundary (max_dim <= 64, strides
    S == L = 64 with 8k tokens, max_tokens <= 4096) the cases stay inside it
    and that boundary is not reached. Raises ValueError for an unknown
    kind or device.
    """
    if kind not in RECORDS:
        raise ValueError(f"production_cases: unknown kind {kind!r}")
    if device not in BUDGETS:
        raise ValueError(f"production_cases: device must be one of {tuple(BUDGETS)}, got {device!r}")
    rec, bud = RECORDS[kind], BUDGETS[device]

    def cap(value, limit):
        return value if limit is None else min(value, limit)

    max_tokens = cap(bud.max_tokens, domain.max_tokens)
    # block size and stride: NSA's, L/4 <= S <= L, strides that give more
    # than 256 windows within the token budget most of the time
    blocks = [L for L in BLOCK_SIZES if domain.block_sizes is None or L in domain.block_sizes]
    if not blocks:   # a domain without 16/32/64: its own sizes up to 128, else its smallest
        blocks = [L for L in domain.block_sizes if L <= 128] or list(domain.block_sizes[:1])
    L = draw(st.sampled_from(blocks), label="block_size")
    strides = [S for S in domain.stride_options(L) if 4 * S >= L] or domain.stride_options(L)
    padding = draw(st.sampled_from(tuple(p for p in PADDINGS if p in domain.paddings)), label="padding")
    fits = [S for S in strides if tokens_for_windows(WINDOW_BLOCK + 1, L, S, padding) <= max_tokens]
    nsa = [S for S in fits if 2 * S == L]
    fits = nsa + [S for S in fits if S not in nsa]
    rest = [S for S in strides if S not in fits]
    if fits and rest:   # one draw, so the smallest draw is NSA's stride (shrinking and the first example agree)
        S = _weighted(draw, fits + rest, [5 * len(rest)] * len(fits) + [len(fits)] * len(rest), "stride")
    else:
        S = draw(st.sampled_from(fits or strides), label="stride")

    # feature dims: D > 64 most of the time
    m = domain.head_dim_multiple
    dims = _dims(bud.dims, m, cap(max(bud.dims), domain.max_dim))
    big = [d for d in dims if d > FEATURE_TILE]
    small = [d for d in dims if d <= FEATURE_TILE]
    D = _weighted(draw, big + small, [4 * len(small) or 1] * len(big) + [len(big) or 1] * len(small), "D") \
        if big and small else draw(st.sampled_from(dims), label="D")
    D_out, F = D, 1
    if rec.has_dout and not domain.d_out_equals_d:
        D_out = draw(st.sampled_from(dims), label="D_out") if draw(st.booleans(), label="D_out_differs") else D
    if rec.has_hidden:
        max_f = cap(bud.max_hidden, domain.max_hidden)
        F = draw(st.integers(min(16, max_f), max_f), label="F")
    C = {"linear": D_out, "mlp": D_out, "attention_pool": D}.get(kind, 1)
    per_token = _per_token_work(kind, D, C, F, L, S)
    per_group = {"linear": L * D * D_out, "mlp": L * D * F, "attention_pool": D * D, "weighted_pool": L,
                 "gated_pool": L * D}.get(kind, 0)

    # the long sequence: past 4096 tokens and 256 windows most of the time
    rows = min(bud.elements // D, bud.work // per_token)       # B * H * T within budget
    top = min(max_tokens, rows)
    far = max(LONG_OFFSET + 1, tokens_for_windows(WINDOW_BLOCK + 1, L, S, padding))
    far = far if far <= top else LONG_OFFSET + 1     # a stride too long for 256 windows: still far tokens
    if far <= top and draw(st.integers(0, 5), label="long_sequence") < 5:
        lo = far
    else:
        lo = max(1 if domain.empty else L, min(top, 2 * L))
    lo = min(lo, top)

    # heads and groups, within what the long sequence leaves of the budget
    max_heads = max(1, min(cap(bud.max_heads, domain.max_heads), rows // max(lo, 1)))
    if domain.groups == "any":
        H = draw(st.integers(1, max_heads), label="heads")
        divisors = [g for g in range(1, H + 1) if H % g == 0 and (per_group == 0 or g * per_group <= bud.params)]
        G = draw(st.sampled_from(divisors or [1]), label="groups")
    else:
        if domain.groups == "per_head" and per_group:
            max_heads = max(1, min(max_heads, bud.params // per_group))
        H = draw(st.integers(1, max_heads), label="heads")
        G = H if domain.groups == "per_head" else 1
    n_long = lo + draw(st.integers(0, max(0, min(top, rows // H) - lo)), label="long_extra_tokens")

    if len(domain.inputs) == 2:
        packed = draw(st.booleans(), label="packed")
    else:
        packed = domain.inputs == ("packed",)
    if packed:
        # a few more sequences beside the long one, in the tokens left
        left = max(0, min(max_tokens, rows // H) - n_long)
        n_other = draw(st.integers(0, bud.max_seqs - 1), label="other_sequences")
        shortest = 0 if domain.empty else tokens_for_windows(1, L, S, padding)
        others = []
        for _ in range(n_other):
            if left < shortest:
                break
            n = draw(st.integers(shortest, min(left, max(shortest, 4 * L))), label="other_length")
            others.append(n)
            left -= n
        at = draw(st.integers(0, len(others)), label="long_sequence_index")
        seqlens = tuple(others[:at] + [n_long] + others[at:])
        B, T = 1, sum(seqlens)
        cu_dtype = draw(st.sampled_from(("int32", "int64")), label="cu_dtype")
    else:
        seqlens, cu_dtype, T = None, "int32", n_long
        max_batch = max(1, min(cap(bud.max_batch, domain.max_batch), rows // (H * max(T, 1))))
        B = draw(st.integers(1, max_batch), label="B")

    fields = dict(kind=kind, dtype=dtype, B=B, H=H, G=G, T=T, D=D, block_size=L, stride=S, padding=padding,
                  seqlens=seqlens, cu_dtype=cu_dtype, D_out=D_out if rec.has_dout else 1, F=F)
    fields["use_pe"] = draw(st.booleans(), label="pe") if domain.pe and rec.kind.pe else False
    if "split" in rec.kind.option_names:   # S | L and C = L / S | D (block sizes and dims are powers of two here)
        C = L // S
        # always drawn: a conditional draw would make the feasible strides the "larger" examples to shrink from
        fields["split"] = draw(st.booleans(), label="split") and L % S == 0 and D % C == 0
    if rec.has_bias:
        fields["bias"] = draw(st.booleans(), label="bias") if domain.bias else False
    if rec.has_hidden:
        fields["bias2"] = draw(st.booleans(), label="bias2") if domain.bias2 else False
        fields["activation"] = draw(st.sampled_from(tuple(a for a in ACTIVATIONS if a in domain.activations)),
                                    label="activation")
    fields["layout"] = draw(st.sampled_from(tuple(v for v in LAYOUTS if v in domain.layouts)), label="layout")
    fields["params_contiguous"] = draw(st.booleans(), label="params_contiguous")
    fields["seed"] = draw(st.integers(0, 2 ** 32 - 1), label="seed")
    return Case(**fields)


def regimes(case: Case) -> list[str]:
    """The tile boundaries a case crosses: "D>64" (a second feature tile,
    input or output), "windows>256" (in one sequence), "tokens>4096" (in one
    sequence)."""
    seqs = [case.T] if case.seqlens is None else list(case.seqlens)
    out = []
    if max(case.D, case.D_out) > FEATURE_TILE:
        out.append(f"D>{FEATURE_TILE}")
    if any(reference.num_windows(n, case.L, case.S, case.padding) > WINDOW_BLOCK for n in seqs):
        out.append(f"windows>{WINDOW_BLOCK}")
    if max(seqs, default=0) > LONG_OFFSET:
        out.append(f"tokens>{LONG_OFFSET}")
    return out
