"""Streaming compression (kvcompress.streaming, reference.streaming;
docs/streaming.md), on every registered backend.

Properties (each draws a packed Case for the streams' sequences and
parameters, then a chunking of every stream's tokens into steps):

- test_stream_equals_full_pass: the concatenation of what every stream
  emits equals the full pass (kvcompress.functional, same padding) over what
  it received, for every chunking; bit for bit where the same backend
  computes both and that backend's arithmetic does not depend on the batch
  (backends declaring batch_invariant), else within the tolerance model (two computations of the same
  exact value differ by at most the sum of their bounds). Every step is also
  checked by ``_run_stream``: a compressed token appears exactly in the step
  that delivers its window's last token; the state never holds more than
  L - 1 tokens per stream and holds exactly the last ones received (pad
  zeros included); zero-token streams change nothing; the old state is
  never modified.
- test_stream_matches_reference_streaming: the same chunking through the
  loop reference's streaming: same offsets every step, values within the
  tolerance model.
- test_reference_streaming_equals_reference_full_pass: loop vs loop, exact,
  in every dtype.
- test_reset: reset streams start over, the others continue.
- test_state_round_trip: torch.save/torch.load of state_dict() and .to()
  keep the state, and streaming continues bit for bit.
- test_left_pads_of_weight_zero_stream_as_the_full_pass, for the kinds
  whose left pads are not zero tokens (gated_pool: score -inf): the streams
  equal the full pass where a zero-score pad would not.
- test_state_pads_follow_the_kind: init_state(..., kind=), reset and
  state_dict keep such pads; a state made without kind= is refused with
  padding="left".
- test_bad_input_*: clear errors, raised before any backend runs, and the
  state unchanged after them.

What a kind takes comes from its record (kvcompress/kinds.py,
kvcompress/testing/records.py): its per-token inputs (gated_pool's z, kept
side by side with x in the state and sliced with x's tokens), the value of
its left pads (gated_pool's scores -inf), whether it takes pe, its options.
"""

from __future__ import annotations

import io
import re
from itertools import accumulate

import kvcompress_reference as reference
import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, note
from hypothesis import strategies as st
from kvcompress_reference import streaming as rs

import kvcompress.functional as kf
import kvcompress.streaming as ks
from kvcompress.testing.cases import Case, make_inputs, place, with_x
from kvcompress.testing.convert import DTYPES, NUMPY_DTYPES, round_to, to_numpy
from kvcompress.testing.impls import arm_tripwire, builtin_impls
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import forward_bound
from tests._docs import run_doc_examples

# Bit-exact against the full pass where the backend declares itself
# batch-invariant (kvcompress.backends.Backend.batch_invariant; the torch
# pools, which only add and multiply elementwise). torch's linear, mlp and
# attention_pool are not: ATen's CPU bmm computes a dot product with a
# sequential loop when K*M*N < 400 (baddbmm_cpu_kernel) and with MKL's
# blocked kernels otherwise, and MKL orders the sum differently for M = 1;
# M is the number of windows in the call, so a decode step and the full pass
# may round differently (cuBLAS picks kernels by shape too). Those are held
# to the tolerance model.

# streaming hands every step to the backend as packed sequences with any stride: the backends whose
# declared domain covers that (mlp's "gemm" serves dense inputs with S dividing L only)
IMPLS = [i for i in builtin_impls() if "packed" in i.domain.inputs and i.domain.strides == "any"]
DEVICE = IMPLS[0].device if IMPLS else "cpu"

# streamed with backend a vs the full pass with a itself and with the kind's
# first backend (across backends: the tolerance model); comparing the full
# passes of all backend pairs is test_conformance's job


def _pairs():
    out = []
    for a in IMPLS:
        first = next(i for i in IMPLS if i.kind == a.kind)
        out += [(a, b, d) for b in dict.fromkeys((a, first)) for d in a.dtypes if d in b.dtypes]
    return out


PAIRS = _pairs()
PAIR_IDS = [f"{a.kind}-{a.name}-vs-{b.name}-{d}" for a, b, d in PAIRS]
SINGLES = [(i, d) for i in IMPLS for d in i.dtypes]
SINGLE_IDS = [f"{i.id}-{d}" for i, d in SINGLES]
IMPL_IDS = [i.id for i in IMPLS]

# streams are fed step by step: keep sequences short (at most max_windows
# windows each) so that token-by-token chunkings stay cheap
SIZES = dict(packed=True, max_windows=4, max_seqs=4)


# ---------------------------------------------------------------- drawing

@st.composite
def chunkings(draw, seqlens: tuple[int, ...], *, max_steps: int = 6):
    """How N streams of the given lengths receive their tokens: a list over
    steps, each a list over streams of (a, b), stream k receiving its tokens
    a .. b - 1 in that step. Modes: random cuts (zero-token steps and
    streams included), token by token (decoding; a finished stream gets
    zero tokens), and a prefill followed by token-by-token decoding."""
    mode = draw(st.sampled_from(("cuts", "decode", "prefill+decode")), label="chunking")
    event(f"chunking={mode}")
    N = len(seqlens)
    if mode == "cuts":
        n_steps = draw(st.integers(1, max_steps), label="steps")
        bounds = [[0, *sorted(draw(st.lists(st.integers(0, n), min_size=n_steps - 1, max_size=n_steps - 1),
                                   label=f"cuts_{k}")), n] for k, n in enumerate(seqlens)]
    else:
        first = [0] * N
        if mode == "prefill+decode":
            first = [draw(st.integers(0, n), label=f"prefill_{k}") for k, n in enumerate(seqlens)]
        rest = max((n - f for n, f in zip(seqlens, first)), default=0)
        n_steps = rest + 1
        bounds = [[0, f, *(min(f + i, n) for i in range(1, rest + 1))] for f, n in zip(first, seqlens)]
    return [[(bounds[k][s], bounds[k][s + 1]) for k in range(N)] for s in range(n_steps)]


def _draw(data, kind, dtype, device=DEVICE, **kw):
    case = data.draw(cases(kind=kind, dtype=dtype, **{**SIZES, **kw}), label="case")
    inputs = make_inputs(case, RECORDS[kind], device)
    domain = kw.get("domain")                      # the backend's, from its limits: held to its precision class
    bound = forward_bound(case, inputs, "strict" if domain is None else domain.precision)
    assume(bound.well_conditioned)
    steps = data.draw(chunkings(case.seqlens), label="steps")
    note(f"steps (per stream: first, end token) = {steps}")
    event(f"padding={case.padding}")
    return case, inputs, bound, steps


# ---------------------------------------------------------------- running

def _starts(case):
    return [0, *accumulate(case.seqlens)]


def _tokens64(case, inputs) -> list[np.ndarray]:
    """The float64 values of the kind's per-token inputs, x first (gated_pool: x, z)."""
    return [inputs.x64] + [inputs.params64[p.name] for p in RECORDS[case.kind].params if p.per_token]


def _weights(case, inputs, *, torch_side: bool = True) -> list:
    """The positional arguments after the per-token inputs: the kind's parameters."""
    src = inputs.params if torch_side else inputs.params64
    return [src[p.name] for p in RECORDS[case.kind].params if not p.per_token]


def _pe(case, pe) -> dict:
    """pe as a keyword, for the kinds that take it."""
    return {"pe": pe} if RECORDS[case.kind].kind.pe else {}


def _n_in(kind) -> int:
    """How many per-token inputs the kind keeps side by side in a state."""
    return len(RECORDS[kind].kind.inputs)


def _zero_pads(kind) -> bool:
    """Whether the kind's left pads are zero tokens (not gated_pool's: scores -inf)."""
    return all(v == 0.0 for v in RECORDS[kind].kind.pad_fill)


def _step_x(case, inputs, chunk, device):
    """The packed new tokens of one step, for each per-token input (x first):
    float64 values, the same in the case's dtype and layout; and cu_new."""
    starts = _starts(case)
    vals64, vals = [], []
    for v64 in _tokens64(case, inputs):
        parts = [v64[:, :, starts[k] + a: starts[k] + b] for k, (a, b) in enumerate(chunk)]
        vals64.append(np.concatenate(parts, axis=2) if parts else v64[:, :, :0])
        vals.append(place(vals64[-1], DTYPES[case.dtype], device, case.layout))
    cu = [0, *accumulate(b - a for a, b in chunk)]
    return vals64, vals, torch.tensor(cu, dtype=getattr(torch, case.cu_dtype), device=device)


def _init_state(case, device, **kw):
    """Fresh streams for the case's kind: its inputs side by side, its pads."""
    return ks.init_state(len(case.seqlens), case.H, _n_in(case.kind) * case.D, block_size=case.L, stride=case.S,
                         padding=case.padding, dtype=DTYPES[case.dtype], device=device, kind=case.kind, **kw)


def _snapshot(state):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.state_dict().items()}


def _same_state(state, snap) -> bool:
    now = state.state_dict()
    return all(torch.equal(now[k], v) and now[k].dtype == v.dtype if isinstance(v, torch.Tensor) else now[k] == v
               for k, v in snap.items())


def _last_token(i, case) -> int:
    """Index (in its sequence) of the token that completes window i (SPEC section 2)."""
    return (i + 1) * case.S - 1 if case.padding == "left" else i * case.S + case.L - 1


def _emitted_between(a, b, case) -> int:
    """How many windows have their last token in [a, b)."""
    return sum(1 for i in range(b + 1) if a <= _last_token(i, case) < b)


def _run_stream(impl, case, inputs, steps, *, state=None):
    """Feed ``steps`` through kvcompress.streaming with ``impl``'s backend,
    checking every step; returns (outputs per stream as float64 arrays
    (1, H, W_k, D_out), the final state, the cu_y of every step)."""
    rec, device = RECORDS[case.kind], impl.device
    N, L, S = len(case.seqlens), case.L, case.S
    if state is None:
        state = _init_state(case, device)
    outs = [[] for _ in range(N)]
    cu_ys = []
    starts = _starts(case)
    fill, tokens64 = rec.kind.pad_fill, _tokens64(case, inputs)
    for s, chunk in enumerate(steps):
        _, xs, cu_new = _step_x(case, inputs, chunk, device)
        before = _snapshot(state)
        y, cu_y, new = ks.step(case.kind, state, xs[0], cu_new, *xs[1:], *_weights(case, inputs),
                               **_pe(case, inputs.pe), backend=impl.name, **rec.extra_kwargs(case))
        where = f"step {s} of {steps}\n  {case!r}"
        assert _same_state(state, before), f"step modified its input state; {where}"
        assert y.dtype == DTYPES[case.dtype] and y.device.type == device and y.shape[:2] == (1, case.H), where
        assert y.shape[3] == rec.d_out(case), where
        assert cu_y.dtype == cu_new.dtype and tuple(cu_y.shape) == (N + 1,), where
        cu_y_ = cu_y.tolist()
        assert cu_y_[0] == 0 and cu_y_[-1] == y.shape[2], where
        cu_ys.append(cu_y_)
        y64 = to_numpy(y)
        n_pend = new.n_pending.tolist()
        for k, (a, b) in enumerate(chunk):
            got = cu_y_[k + 1] - cu_y_[k]
            # a window is emitted exactly by the step delivering its last token
            assert got == _emitted_between(a, b, case), \
                f"stream {k} got tokens [{a}, {b}) and emitted {got} windows, expected " \
                f"{_emitted_between(a, b, case)}; {where}"
            outs[k].append(y64[:, :, cu_y_[k]:cu_y_[k + 1]])
            assert new.n_tokens[k].item() == b, where
            assert new.n_windows[k].item() == reference.num_windows(b, L, S, case.padding), where
            # the state holds the last n_pending tokens of the (left-padded)
            # sequence, at most L - 1 of them, and zeros after them; each
            # token is the kind's inputs side by side, a pad the kind's fill
            assert 0 <= n_pend[k] <= L - 1, f"stream {k} holds {n_pend[k]} > L - 1 tokens; {where}"
            pad = L - S if case.padding == "left" else 0
            seq = np.concatenate([np.concatenate([np.full((case.H, pad, case.D), f),
                                                  v64[0, :, starts[k]:starts[k] + b]], 1)
                                  for f, v64 in zip(fill, tokens64)], 2)             # [H, pad + b, n_in*D]
            held = to_numpy(new.pending[k]).transpose(1, 0, 2)               # [H, L-1, n_in*D]
            np.testing.assert_array_equal(held[:, :n_pend[k]], seq[:, seq.shape[1] - n_pend[k]:], err_msg=where)
            np.testing.assert_array_equal(held[:, n_pend[k]:], 0.0, err_msg=where)
            if a == b:
                # zero tokens: nothing emitted, this stream's state unchanged
                assert got == 0 and torch.equal(new.pending[k], state.pending[k]), where
                assert new.n_tokens[k] == state.n_tokens[k] and new.n_windows[k] == state.n_windows[k], where
                event("zero-token stream in a step")
        state = new
    D_out = rec.d_out(case)
    return [np.concatenate(o, axis=2) if o else np.zeros((1, case.H, 0, D_out)) for o in outs], state, cu_ys


def _packed(outs, case):
    D_out = RECORDS[case.kind].d_out(case)
    return np.concatenate(outs, axis=2) if outs else np.zeros((1, case.H, 0, D_out))


def _assert_equal_or_within(got, expected, tol, exact, what, case):
    """Bit for bit if ``exact``, else |got - expected| <= tol elementwise."""
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}\n  {case!r}"
    if exact:
        np.testing.assert_array_equal(got, expected, err_msg=f"{what}: not bit for bit\n  {case!r}")
        return
    err = np.abs(got - expected)
    assert (err <= tol).all(), f"{what}: worst error / bound {np.max(err / tol):.3g}\n  {case!r}"


def _two_impls(bound):
    """Two implementations computing the same exact value are each within
    their bound of it (kvcompress/testing/tolerance.py); a stream and the full
    pass compute the same windows from the same inputs, so their bounds are
    the same ``bound``, and they differ by at most twice it."""
    return 2 * bound


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("stream_impl, full_impl, dtype", PAIRS, ids=PAIR_IDS)
@given(data=st.data())
def test_stream_equals_full_pass(stream_impl, full_impl, dtype, data):
    case, inputs, bound, steps = _draw(data, stream_impl.kind, dtype, **stream_impl.limits)
    outs, state, _ = _run_stream(stream_impl, case, inputs, steps)
    full = to_numpy(RECORDS[case.kind].call(full_impl.fn, case, inputs))
    exact = stream_impl.name == full_impl.name and stream_impl.batch_invariant
    got = _packed(outs, case)
    if not exact and stream_impl.name == full_impl.name:
        event(f"bit-exact although not promised: {bool(np.array_equal(got, full))}")
    _assert_equal_or_within(got, full, _two_impls(bound.bound), exact,
                            f"{stream_impl.id} streamed vs {full_impl.name} full pass", case)


@pytest.mark.parametrize("builtin, dtype", SINGLES, ids=SINGLE_IDS)
@given(data=st.data())
def test_stream_matches_reference_streaming(builtin, dtype, data):
    case, inputs, bound, steps = _draw(data, builtin.kind, dtype, max_dim=6, max_windows=3, **builtin.limits)
    rec = RECORDS[case.kind]
    outs, _, cu_ys = _run_stream(builtin, case, inputs, steps)
    ref_state = rs.init_state(len(case.seqlens), case.H, _n_in(case.kind) * case.D, block_size=case.L,
                              stride=case.S, padding=case.padding, dtype=np.float64, kind=case.kind)
    ref_outs = []
    for s, chunk in enumerate(steps):
        xs64, _, cu_new = _step_x(case, inputs, chunk, "cpu")
        y, cu_y, ref_state = rs.step(case.kind, ref_state, xs64[0], cu_new.numpy(), *xs64[1:],
                                     *_weights(case, inputs, torch_side=False), **_pe(case, inputs.pe64),
                                     **rec.extra_kwargs(case))
        assert cu_y.tolist() == cu_ys[s], f"step {s}: offsets {cu_ys[s]} != reference {cu_y.tolist()}\n  {case!r}"
        ref_outs.append([y[:, :, cu_y[k]:cu_y[k + 1]] for k in range(len(chunk))])
    per_stream = [np.concatenate([r[k] for r in ref_outs], axis=2) for k in range(len(case.seqlens))]
    # the reference streaming computes in float64 like the reference full
    # pass, which the tolerance model's bound is measured against
    _assert_equal_or_within(_packed(outs, case), _packed(per_stream, case), bound.bound, False,
                            f"{builtin.id} streamed vs reference streaming", case)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_reference_streaming_equals_reference_full_pass(kind, data):
    dtype = data.draw(st.sampled_from(tuple(DTYPES)), label="dtype")
    case, inputs, _, steps = _draw(data, kind, dtype, device="cpu", max_dim=6, max_windows=3)
    rec, nd = RECORDS[kind], NUMPY_DTYPES[dtype]
    cast = {k: None if v is None else v.astype(nd) for k, v in inputs.params64.items()}
    weights = [cast[p.name] for p in rec.params if not p.per_token]
    pe = _pe(case, None if inputs.pe64 is None else inputs.pe64.astype(nd))
    full = rec.reference(inputs.x64.astype(nd), *cast.values(), **case.window_kwargs(), **pe,
                         cu_seqlens=inputs.cu64, **rec.extra_kwargs(case))
    state = rs.init_state(len(case.seqlens), case.H, _n_in(kind) * case.D, block_size=case.L, stride=case.S,
                          padding=case.padding, dtype=nd, kind=kind)
    per_stream = [[] for _ in case.seqlens]
    for chunk in steps:
        xs64, _, cu_new = _step_x(case, inputs, chunk, "cpu")
        xs = [v.astype(nd) for v in xs64]
        y, cu_y, new = rs.step(kind, state, xs[0], cu_new.numpy(), *xs[1:], *weights, **pe, **rec.extra_kwargs(case))
        for k, (a, b) in enumerate(chunk):
            assert cu_y[k + 1] - cu_y[k] == _emitted_between(a, b, case), f"stream {k}\n  {case!r}"
            assert len(new.pending[k]) <= case.L - 1 and new.n_tokens[k] == b, f"stream {k}\n  {case!r}"
            per_stream[k].append(y[:, :, cu_y[k]:cu_y[k + 1]])
        state = new
    got = _packed([np.concatenate(p, axis=2) for p in per_stream], case)
    assert got.dtype == full.dtype or got.size == 0, f"{got.dtype} != {full.dtype}"
    np.testing.assert_array_equal(got.astype(np.float64), full.astype(np.float64), err_msg=repr(case))


def _sub_case(case, inputs, spans, device):
    """The case and inputs whose packed sequences are the token spans
    [(first, end), ...] of the case's sequences (float64 values reused)."""
    starts = _starts(case)
    lens = tuple(e - f for f, e in spans)
    sub = case.replace(seqlens=lens, T=sum(lens))

    def take(v64):   # the spans of a per-token input, packed (x and z alike)
        parts = [v64[:, :, s + f:s + e] for s, (f, e) in zip(starts, spans)]
        return np.concatenate(parts, axis=2) if parts else v64[:, :, :0]
    return sub, with_x(sub, inputs, take(inputs.x64), device, tokens=take)


@pytest.mark.parametrize("builtin", IMPLS, ids=IMPL_IDS)
@given(data=st.data())
def test_reset(builtin, data):
    dtype = data.draw(st.sampled_from(builtin.dtypes), label="dtype")
    case, inputs, _, _ = _draw(data, builtin.kind, dtype, **builtin.limits)
    N, dev = len(case.seqlens), builtin.device
    split = [data.draw(st.integers(0, n), label=f"split_{k}") for k, n in enumerate(case.seqlens)]
    chosen = data.draw(st.lists(st.integers(0, N - 1), unique=True, max_size=N) if N else st.just([]),
                       label="reset_streams")
    streams = torch.tensor([k in chosen for k in range(N)], dtype=torch.bool) \
        if data.draw(st.booleans(), label="as_mask") else chosen

    # before the reset: each stream receives its first split[k] tokens
    before, before_inputs = _sub_case(case, inputs, [(0, m) for m in split], dev)
    outs1, state, _ = _run_stream(builtin, before, before_inputs,
                                  data.draw(chunkings(before.seqlens, max_steps=3), label="steps_before"))
    after_reset = ks.reset(state, streams)
    fresh = _init_state(case, dev)
    for k in range(N):
        src = fresh if k in chosen else state
        assert torch.equal(after_reset.pending[k], src.pending[k]) and after_reset.n_tokens[k] == src.n_tokens[k] \
            and after_reset.n_windows[k] == src.n_windows[k], f"stream {k} (reset: {k in chosen})\n  {case!r}"

    # after it: a reset stream receives the rest of its tokens as a new
    # sequence, the others continue theirs; "seen" is what each stream has
    # received since it (re)started, in its own token numbering
    seen, seen_inputs = _sub_case(case, inputs, [(m if k in chosen else 0, n) for k, (m, n) in
                                                 enumerate(zip(split, case.seqlens))], dev)
    rest = [n - m for m, n in zip(split, case.seqlens)]
    steps2 = data.draw(chunkings(tuple(rest), max_steps=3), label="steps_after")
    shift = [0 if k in chosen else m for k, m in enumerate(split)]
    steps2 = [[(a + d, b + d) for (a, b), d in zip(chunk, shift)] for chunk in steps2]
    outs2, _, _ = _run_stream(builtin, seen, seen_inputs, steps2, state=after_reset)
    got = [o2 if k in chosen else np.concatenate([o1, o2], axis=2) for k, (o1, o2) in enumerate(zip(outs1, outs2))]
    full = to_numpy(RECORDS[case.kind].call(builtin.fn, seen, seen_inputs))
    bound = forward_bound(seen, seen_inputs, builtin.domain.precision).bound
    _assert_equal_or_within(_packed(got, case), full, _two_impls(bound),
                            builtin.batch_invariant, f"{builtin.id} after resetting {chosen}", case)


@pytest.mark.parametrize("builtin", IMPLS, ids=IMPL_IDS)
@given(data=st.data())
def test_state_round_trip(builtin, data):
    dtype = data.draw(st.sampled_from(builtin.dtypes), label="dtype")
    case, inputs, _, steps = _draw(data, builtin.kind, dtype, **builtin.limits)
    cut = data.draw(st.integers(0, len(steps)), label="save_after_step")
    _, state, _ = _run_stream(builtin, case, inputs, steps[:cut])
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = ks.StreamState.from_state_dict(torch.load(buf, weights_only=True))
    assert _same_state(loaded, _snapshot(state)), f"save/load changed the state\n  {case!r}"
    other = "cuda" if builtin.device == "cpu" and torch.cuda.is_available() else "cpu"
    moved = state.to(other).to(builtin.device)
    assert _same_state(moved, _snapshot(state)), f".to({other!r}) and back changed the state\n  {case!r}"
    meta = state.to("meta")
    assert all(getattr(meta, n).device.type == "meta" and getattr(meta, n).shape == getattr(state, n).shape
               and getattr(meta, n).dtype == getattr(state, n).dtype for n in ("pending", "n_tokens", "n_windows"))
    # continuing from each copy gives the same bits
    base, _, _ = _run_stream(builtin, case, inputs, steps[cut:], state=state)
    for copy, what in ((loaded, "loaded"), (moved, "moved")):
        cont, _, _ = _run_stream(builtin, case, inputs, steps[cut:], state=copy)
        for k, (a, b) in enumerate(zip(base, cont)):
            np.testing.assert_array_equal(a, b, err_msg=f"stream {k} continued from the {what} state\n  {case!r}")


# ---------------------------------------------------------------- gated_pool's pads

# the kinds whose left pads are not zero tokens (gated_pool: value 0, score -inf)
FILL_IMPLS = [i for i in IMPLS if not _zero_pads(i.kind)]


@pytest.mark.parametrize("builtin", FILL_IMPLS, ids=[i.id for i in FILL_IMPLS])
@given(data=st.data())
def test_left_pads_of_weight_zero_stream_as_the_full_pass(builtin, data):
    """DeepSeek-V4's CSA windowing (L = 2S, padding="left", with and without
    split): a fresh stream holds L - S pads of score -inf, so what the streams
    emit equals the full pass for every chunking, sequences shorter than the
    pad included. The gate scores are far below 0, where a pad of score 0
    would take nearly all the weight: the full pass is checked to differ from
    zero-score pads, so this test tells the two apart."""
    rec = RECORDS[builtin.kind]
    dtype = "float32" if "float32" in builtin.dtypes else builtin.dtypes[0]
    seqlens = (0, 1, 2, 3, 8)
    split = data.draw(st.booleans(), label="split")
    case = Case(kind=builtin.kind, dtype=dtype, B=1, H=2, G=2, T=sum(seqlens), D=4, block_size=4, stride=2,
                padding="left", seqlens=seqlens, bias=True, split=split, layout="bthd", seed=11)
    shift = round_to(np.full(1, -20.0), dtype)[0]      # scores near -20 (rounded again after the shift)
    inputs = make_inputs(case, rec, builtin.device)
    inputs = with_x(case, inputs, inputs.x64, builtin.device, tokens=lambda z: round_to(z + shift, dtype))
    bound = forward_bound(case, inputs, builtin.domain.precision)
    assert bound.well_conditioned
    full = to_numpy(rec.call(builtin.fn, case, inputs))
    steps = data.draw(chunkings(seqlens), label="steps")
    outs, _, _ = _run_stream(builtin, case, inputs, steps)
    _assert_equal_or_within(_packed(outs, case), full, _two_impls(bound.bound), builtin.batch_invariant,
                            f"{builtin.id} streamed with left pads vs the full pass, steps {steps}", case)
    # pads of score 0 instead (the tokens explicitly padded with zeros, "valid" windows): far off
    pad, starts = case.L - case.S, _starts(case)
    padded = [np.concatenate([np.concatenate([np.zeros((1, case.H, pad, case.D)), v64[:, :, a:b]], 2)
                              for a, b in zip(starts, starts[1:])], 2) for v64 in _tokens64(case, inputs)]
    zero_case = case.replace(padding="valid", seqlens=tuple(m + pad for m in seqlens),
                             T=sum(seqlens) + pad * len(seqlens))
    zero_pads = to_numpy(rec.call(builtin.fn, zero_case, with_x(zero_case, inputs, padded[0], builtin.device,
                                                                tokens=lambda z: padded[1])))
    assert zero_pads.shape == full.shape and np.abs(zero_pads - full).max() > 0.1


def test_state_pads_follow_the_kind():
    """A kind whose left pads are not zero tokens (gated_pool: value 0,
    score -inf, side by side in the state): init_state(..., kind=) holds
    them, reset restores them, state_dict keeps the fill, in the runtime and
    in the reference. init_state without kind= holds zero pads: such a kind
    refuses it with padding="left"; with padding="valid" there are no pads,
    and it streams as the state made with kind=."""
    kinds = [k for k in KINDS if not _zero_pads(k)]
    assert "gated_pool" in kinds
    for kind in kinds:
        n_in, D = _n_in(kind), 3
        torch.manual_seed(0)
        xs = [torch.randn(1, 2, 7, D) for _ in range(n_in)]
        cu = torch.tensor([0, 2, 7])
        weights = [None] * sum(1 for p in RECORDS[kind].params if not p.per_token)
        match = re.escape(f"make the state with init_state(..., kind={kind!r})")
        ref_match = re.escape(f"make it with init_state(..., kind={kind!r})")
        with pytest.raises(ValueError, match=match):
            ks.step(kind, ks.init_state(2, 2, n_in * D, block_size=4, stride=2, padding="left"), xs[0], cu,
                    *xs[1:], *weights)
        with pytest.raises(ValueError, match=ref_match):
            rs.step(kind, rs.init_state(2, 2, n_in * D, block_size=4, stride=2, padding="left"), xs[0].numpy(),
                    cu.numpy(), *(t.numpy() for t in xs[1:]), *weights)
        outs = []
        for make in ({}, {"kind": kind}):
            state = ks.init_state(2, 2, n_in * D, block_size=4, stride=2, padding="valid", **make)
            for chunk in (cu, torch.tensor([0, 5, 7])):     # twice the tokens: windows from pending ones too
                y, cu_y, state = ks.step(kind, state, xs[0], chunk, *xs[1:], *weights)
                outs.append((make, y, cu_y))
        for (_, y1, cu1), (_, y2, cu2) in zip(outs[:2], outs[2:]):
            assert y1.shape[2] > 0 and torch.equal(y1, y2) and torch.equal(cu1, cu2), kind

        fill = torch.tensor(RECORDS[kind].kind.pad_fill).repeat_interleave(D)           # [n_in*D]
        state = ks.init_state(2, 2, n_in * D, block_size=4, stride=2, padding="left", kind=kind)
        assert state.fill == RECORDS[kind].kind.pad_fill
        assert torch.equal(state.pending[:, :2], fill.expand(2, 2, 2, -1)) and not state.pending[:, 2:].any()
        stepped = ks.step(kind, state, xs[0], cu, *xs[1:], *weights).state
        assert not torch.equal(stepped.pending[1], state.pending[1])
        again = ks.reset(stepped, [1])
        assert torch.equal(again.pending[1], state.pending[1]) and torch.equal(again.pending[0], stepped.pending[0])
        assert ks.StreamState.from_state_dict(again.state_dict()).fill == state.fill
        ref = rs.init_state(2, 2, n_in * D, block_size=4, stride=2, padding="left", dtype=np.float32, kind=kind)
        assert all(np.array_equal(t, np.broadcast_to(fill.numpy(), (2, n_in * D))) for p in ref.pending for t in p)
        ref_stepped = rs.step(kind, ref, xs[0].numpy(), cu.numpy(), *(t.numpy() for t in xs[1:]), *weights)[2]
        ref_again = rs.reset(ref_stepped, [1])
        assert len(ref_again.pending[1]) == 2 and all(np.array_equal(a, b) for a, b in zip(ref_again.pending[1],
                                                                                          ref.pending[1]))


# ---------------------------------------------------------------- bad input

@pytest.fixture
def tripwire(monkeypatch):
    """Every registered backend fails the test if it is reached."""
    arm_tripwire(monkeypatch)


def _valid_step(kind):
    """A state of 3 streams (H=4, G=2, D=3, L=4, S=2, left padding) that
    received 5, 0 and 3 tokens, and valid step arguments giving them 2, 0
    and 5 new tokens (params: the kind's other per-token inputs, then its
    parameters; pe where the kind takes it)."""
    rec = RECORDS[kind]
    case = Case(kind=kind, dtype="float32", B=1, H=4, G=2, T=7, D=3, block_size=4, stride=2, padding="left",
                seqlens=(2, 0, 5), D_out=5, F=6, use_pe=rec.kind.pe, bias=True, bias2=True)
    inputs = make_inputs(case, rec, "cpu")
    n_tokens = torch.tensor([5, 0, 3])
    n_windows = torch.tensor([reference.num_windows(int(t), 4, 2, "left") for t in n_tokens])   # [2, 0, 1]
    # the kind's inputs side by side: n_pending = n_tokens + (L - S) - n_windows * S = [3, 2, 3]
    pending = torch.zeros(3, 3, 4, _n_in(kind) * 3)
    pending[0, :3] = 1.0
    pending[2, :3] = 2.0
    pending[1, :2] = torch.tensor(rec.kind.pad_fill).repeat_interleave(3)    # stream 1 holds its two pads
    state = ks.StreamState(pending, n_tokens, n_windows, 4, 2, "left", rec.kind.pad_fill)
    return dict(kind=kind, state=state, x=inputs.x, cu_new=inputs.cu_seqlens, params=rec.args(inputs),
                kw=dict(**_pe(case, inputs.pe), **rec.extra_kwargs(case)))


def _call_step(a):
    return ks.step(a["kind"], a["state"], a["x"], a["cu_new"], *a["params"], **a["kw"])


def _set(name, fn):
    return lambda a: a.__setitem__(name, fn(a[name]))


def _kw(**kw):
    return lambda a: a["kw"].update(kw)


STEP_ERRORS = [
    ("kind", _set("kind", lambda k: "max_pool"), ValueError, "kind must be one of"),
    ("state not a StreamState", _set("state", lambda s: s.state_dict()), TypeError, "state must be a StreamState"),
    ("state counters", _set("state", lambda s: ks.StreamState(s.pending, s.n_tokens, s.n_windows + 1, 4, 2, "left",
                                                              s.fill)),
     ValueError, "state is inconsistent"),
    ("x not a tensor", _set("x", lambda x: x.numpy()), TypeError, "x must be a torch.Tensor"),
    ("x 3-D", _set("x", lambda x: x[0]), ValueError, r"x must have shape \(1, H=4, T_new, D=3\)"),
    ("x batch 2", _set("x", lambda x: x.expand(2, -1, -1, -1)), ValueError, r"got \(2, 4, 7, 3\)"),
    ("x heads", _set("x", lambda x: x[:, :2]), ValueError, "H=4"),
    ("x dim", _set("x", lambda x: x[..., :2]), ValueError, "D=3"),
    ("x dtype", _set("x", lambda x: x.double()), TypeError, "x must have the state's dtype torch.float32"),
    ("x device", _set("x", lambda x: x.to("meta")), ValueError, "x must be on the state's device"),
    ("cu_new list", _set("cu_new", lambda c: c.tolist()), TypeError, "cu_new must be a torch.Tensor"),
    ("cu_new float", _set("cu_new", lambda c: c.float()), TypeError, "cu_new must have dtype int32 or int64"),
    ("cu_new streams", _set("cu_new", lambda c: c[:-1]), ValueError, r"cu_new must have shape \(N\+1,\) = \(4,\)"),
    ("cu_new 2-D", _set("cu_new", lambda c: c[None]), ValueError, "cu_new must have shape"),
    ("cu_new device", _set("cu_new", lambda c: c.to("meta")), ValueError, "cu_new must be on x's device"),
    ("cu_new not from 0", _set("cu_new", lambda c: c + 1), ValueError, "non-decreasing from 0 to T_new=7"),
    ("cu_new short of T", _set("cu_new", lambda c: torch.tensor([0, 2, 2, 6])), ValueError, "to T_new=7"),
    ("cu_new decreasing", _set("cu_new", lambda c: torch.tensor([0, 5, 2, 7])), ValueError, "non-decreasing"),
    ("block_size given", _kw(block_size=4), TypeError, "takes no keyword arguments"),
    ("cu_seqlens given", _kw(cu_seqlens=torch.tensor([0, 7])), TypeError, "come from the state"),
    ("backend", _kw(backend="cuda-magic"), ValueError, "backend must be 'auto' or one of"),
    ("backend not a str", _kw(backend=3), TypeError, "backend must be a str"),
    ("kind not a str", _set("kind", lambda k: None), TypeError, "kind must be a str"),
]
PARAM_ERRORS = {
    "weighted_pool": [("weight shape", lambda a: a.__setitem__("params", [a["params"][0][:, :3]]), ValueError,
                       r"weight must have shape \(2, 4\)")],
    "linear": [("weight dtype", lambda a: a.__setitem__("params", [a["params"][0].double(), a["params"][1]]),
                TypeError, "weight must have x's dtype"),
               ("weight L", lambda a: a.__setitem__("params", [a["params"][0][:, :3], a["params"][1]]),
                ValueError, r"weight must have shape \(2, 4, 3, \?\)")],
    "mlp": [("activation", _kw(activation="tanh"), ValueError, "activation must be one of")],
    "attention_pool": [("weight shape", lambda a: a.__setitem__("params", [a["params"][0][:, :2]]), ValueError,
                        r"weight must have shape \(2, 3, 3\)")],
    "gated_pool": [("bias shape", lambda a: a["params"].__setitem__(1, a["params"][1][:, :3]), ValueError,
                    r"bias must have shape \(2, 4, 3\)"),
                   ("bias dtype", lambda a: a["params"].__setitem__(1, a["params"][1].double()), TypeError,
                    "bias must have x's dtype"),
                   ("split not a bool", _kw(split=1), TypeError, "split must be a bool, got int"),
                   ("split chunks", _kw(split=True), ValueError, "split needs C = block_size / stride = 2 to divide")],
}
# pe: checked for the kinds that take it, refused by the others
PE_ERRORS = [
    ("pe shape", lambda a: a["kw"].update(pe=a["kw"]["pe"][:, :3]), ValueError, r"pe must have shape \(4, 4, 3\)"),
    ("pe dtype", lambda a: a["kw"].update(pe=a["kw"]["pe"].double()), TypeError, "pe must have x's dtype"),
]
NO_PE_ERRORS = [("pe given", _kw(pe=torch.zeros(4, 4, 3)), TypeError, "takes no pe")]
# a kind's other per-token inputs (gated_pool's z) are checked like x
MORE_INPUT_ERRORS = [
    ("{name} missing", lambda a: a.__setitem__("params", []), TypeError, r"takes the inputs \('x', '{name}'"),
    ("{name} not a tensor", lambda a: a["params"].__setitem__(0, a["params"][0].numpy()), TypeError,
     "{name} must be a torch.Tensor"),
    ("{name} dim", lambda a: a["params"].__setitem__(0, a["params"][0][..., :2]), ValueError,
     r"{name} must have shape \(1, H=4, T_new, D=3\)"),
    ("{name} tokens", lambda a: a["params"].__setitem__(0, a["params"][0][:, :, :6]), ValueError,
     r"{name} must have shape \(1, H=4, T_new, D=3\) \(the new tokens of all streams, packed\), got \(1, 4, 6, 3\)"),
    ("{name} dtype", lambda a: a["params"].__setitem__(0, a["params"][0].double()), TypeError,
     "{name} must have the state's dtype torch.float32"),
    ("{name} device", lambda a: a["params"].__setitem__(0, a["params"][0].to("meta")), ValueError,
     "{name} must be on the state's device"),
    ("state of other dim", _set("state", lambda s: ks.init_state(3, 4, s.dim + 1, block_size=4, stride=2,
                                                                 padding="left")),
     ValueError, "side by side in the state, so init_state's dim must be"),
]
# a kind whose left pads are not zero tokens refuses a state made without kind=
PAD_FILL_ERRORS = [
    ("state without kind", _set("state", lambda s: ks.init_state(3, 4, s.dim, block_size=4, stride=2,
                                                                 padding="left")),
     ValueError, r"state holds left pads of value \(0.0,\), but {kind} pads with"),
]


def _kind_errors(kind):
    rec = RECORDS[kind].kind
    out = list(STEP_ERRORS) + (PE_ERRORS if rec.pe else NO_PE_ERRORS)
    if len(rec.inputs) > 1:    # the first other input (the rows mutate params[0])
        out += [(w.format(name=rec.inputs[1]), m, e, p.format(name=rec.inputs[1])) for w, m, e, p in MORE_INPUT_ERRORS]
    if not _zero_pads(kind):
        out += [(w, m, e, p.format(kind=kind)) for w, m, e, p in PAD_FILL_ERRORS]
    return out + PARAM_ERRORS.get(kind, [])


ERROR_CASES = [(kind, *e) for kind in KINDS for e in _kind_errors(kind)]


@pytest.mark.parametrize("kind, what, mutate, exc, match", ERROR_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ERROR_CASES])
def test_bad_input_step(tripwire, kind, what, mutate, exc, match):
    a = _valid_step(kind)
    state = a["state"]
    snap = _snapshot(state)
    mutate(a)
    with pytest.raises(exc, match=match):
        _call_step(a)
    assert _same_state(state, snap), f"{what}: the state changed although the step failed"
    if a["kind"] in KINDS and a["state"] is state:
        # the stateful wrapper keeps its state too (it refuses a bad kind or
        # state when built: test_bad_input_state)
        n_more = len(RECORDS[a["kind"]].kind.inputs) - 1      # gated_pool's z goes to each step
        params = list(a["params"])
        comp = ks.StreamingCompressor(a["kind"], *params[n_more:], state=state, **a["kw"])
        with pytest.raises(exc, match=match):
            comp.step(a["x"], a["cu_new"], *params[:n_more])
        assert comp.state is state and _same_state(state, snap), f"{what}: the wrapper's state changed"


@pytest.mark.parametrize("kind", KINDS)
def test_tripwire_is_armed(tripwire, kind):
    """The valid arguments reach the backend: the errors above are the validators'."""
    with pytest.raises(AssertionError, match="a backend ran"):
        _call_step(_valid_step(kind))


STATE_ERRORS = [
    ("reset mask length", lambda s: ks.reset(s, torch.tensor([True, False])), ValueError,
     r"mask must have shape \(N,\) = \(3,\)"),
    ("reset index range", lambda s: ks.reset(s, [0, 3]), ValueError, r"in \[0, N=3\), got \[3\]"),
    ("reset float tensor", lambda s: ks.reset(s, torch.tensor([0.0])), TypeError, "bool mask"),
    ("reset not a state", lambda s: ks.reset(s.state_dict(), [0]), TypeError, "state must be a StreamState"),
    ("load missing key", lambda s: ks.StreamState.from_state_dict(
        {k: v for k, v in s.state_dict().items() if k != "n_windows"}), ValueError, "lacks"),
    ("load bad counters", lambda s: ks.StreamState.from_state_dict(
        {**s.state_dict(), "n_windows": s.n_windows + 1}), ValueError, "n_windows = num_windows"),
    ("load pending shape", lambda s: ks.StreamState.from_state_dict(
        {**s.state_dict(), "pending": s.pending[:, :2]}), ValueError, "pending must have shape"),
    ("load counters dtype", lambda s: ks.StreamState.from_state_dict(
        {**s.state_dict(), "n_tokens": s.n_tokens.int()}), TypeError, "n_tokens must be an int64"),
    ("init num_streams", lambda s: ks.init_state(-1, 4, 3, block_size=4, stride=2), ValueError, "num_streams"),
    ("init heads float", lambda s: ks.init_state(3, 4.0, 3, block_size=4, stride=2), TypeError,
     "heads must be an int >= 1, got float"),
    ("init block_size bool", lambda s: ks.init_state(3, 4, 3, block_size=True, stride=1), TypeError,
     "block_size must be an int"),
    ("init padding not a str", lambda s: ks.init_state(3, 4, 3, block_size=4, stride=2, padding=None), TypeError,
     "padding must be a str"),
    ("wrapper kind not a str", lambda s: ks.StreamingCompressor(None, state=s), TypeError, "kind must be a str"),
    ("init stride", lambda s: ks.init_state(3, 4, 3, block_size=4, stride=5), ValueError, "stride"),
    ("init dtype", lambda s: ks.init_state(3, 4, 3, block_size=4, stride=2, dtype=torch.int32), TypeError, "dtype"),
    ("wrapper kind", lambda s: ks.StreamingCompressor("max_pool", state=s), ValueError, "kind must be one of"),
]


@pytest.mark.parametrize("what, call, exc, match", STATE_ERRORS, ids=[c[0] for c in STATE_ERRORS])
def test_bad_input_state(what, call, exc, match):
    state = _valid_step("mean_pool")["state"]
    snap = _snapshot(state)
    with pytest.raises(exc, match=match):
        call(state)
    assert _same_state(state, snap), f"{what}: the state changed"


def test_numpy_integers_are_integers():
    state = ks.init_state(np.int64(2), np.int32(4), np.int64(3), block_size=np.int64(4), stride=np.int16(2))
    assert (state.block_size, state.stride) == (4, 2) and type(state.block_size) is int
    state = ks.reset(state, [np.int64(1)])
    assert state.num_streams == 2 and state.heads == 4


def test_wrapper_equals_functional_step():
    """StreamingCompressor.step is step with the state carried along."""
    a = _valid_step("linear")
    comp = ks.StreamingCompressor("linear", *a["params"], state=a["state"], **a["kw"])
    y, cu_y = comp.step(a["x"], a["cu_new"])
    ref = _call_step(a)
    assert torch.equal(y, ref.y) and torch.equal(cu_y, ref.cu_y) and _same_state(comp.state, _snapshot(ref.state))
    comp.reset([1])
    assert torch.equal(comp.state.pending[1], torch.zeros_like(comp.state.pending[1]))
    assert comp.state.n_tokens[1] == 0 and comp.state.n_pending[1] == 2    # L - S pad zeros


def test_wrapper_streams_gated_pool_with_z_per_step():
    """gated_pool through StreamingCompressor: bias at construction, each
    step's gate scores z with its tokens; equal to the full pass."""
    H, D, L, S = 2, 4, 4, 2
    g = torch.Generator().manual_seed(3)
    x, z = (torch.randn(1, H, 11, D, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, L, D // 2, generator=g, dtype=torch.float64)
    state = ks.init_state(1, H, 2 * D, block_size=L, stride=S, padding="left", dtype=torch.float64,
                          kind="gated_pool")
    comp = ks.StreamingCompressor("gated_pool", bias, state=state, split=True)
    ys = [comp.step(x[:, :, a:b], torch.tensor([0, b - a]), z[:, :, a:b])[0] for a, b in ((0, 3), (3, 4), (4, 11))]
    full = kf.gated_pool(x, z, bias, split=True, block_size=L, stride=S, padding="left")
    assert torch.equal(torch.cat(ys, 2), full)
    with pytest.raises(TypeError, match="takes the inputs"):
        comp.step(x[:, :, :1], torch.tensor([0, 1]))


def test_docs_example():
    """The example in docs/streaming.md runs and its assertions hold."""
    run_doc_examples("streaming.md")
