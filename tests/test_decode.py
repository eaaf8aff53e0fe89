"""Fixed-shape decoding (kvcompress.decode; docs/decoding.md), on the torch
backend.

Properties:

- test_decode_equals_full_pass: streams fed one token per step through
  ``decode_step`` emit exactly the full pass's windows (kvcompress.functional
  over each whole sequence, same padding), each in the step that delivers
  its last token. Streams occupy random slots of a larger cache (inactive
  slots get NaN tokens, which must reach nothing), start at random steps,
  fresh or from a prefill hand-off (``last_tokens`` + ``add(..., n_tokens=)``),
  are reset mid-way (then restart their sequence) and removed when done;
  stream indices come as host lists, int tensors or bool masks. Bit for bit
  where the backend declares itself batch-invariant (mean_pool,
  weighted_pool), else within the tolerance model: both are within the
  bound of the same exact value, so they differ by at most twice it (the
  decode step compresses one window per row with stride = L, the full pass
  many with stride S: BLAS and reductions may round differently).
  Non-emitting rows are exactly 0; counters follow num_windows.
- test_compiled_step_equals_eager: ``torch.compile(fullgraph=True)`` of the
  step (inductor, CPU), no recompilation across steps and stream changes,
  equal to the eager step: bit for bit for mean_pool, weighted_pool and
  linear (pointwise ops in the same order, the products stay ATen calls),
  within twice the tolerance bound for attention_pool and gated_pool
  (inductor generates its own softmax), and mlp (inductor fuses its
  activation and bias adds).
- test_cache_methods_compile: add (from a prefill), remove and reset with
  tensor indices and masks trace with fullgraph=True.
- test_no_host_reads: an eager step never calls item/tolist/bool on a tensor.
- test_bad_input_*: clear TypeError/ValueError naming the argument, raised
  before the cache is written.
- test_docs_example: the example in docs/decoding.md runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

import kvcompress.decode as decode_module
import kvcompress.functional as kf
from kvcompress import backends
from kvcompress._windows import _num_windows
from kvcompress.decode import DecodeCache, decode_step, last_tokens
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import DTYPES, to_numpy
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import forward_bound
from tests._docs import run_doc_examples

DTYPE_CHOICES = ("float32", "float64", "bfloat16")


def _emits(t: int, L: int, S: int, padding: str) -> bool:
    """Whether a stream's token t (from 0) ends a window (SPEC section 2)."""
    return (t + 1) % S == 0 if padding == "left" else t >= L - 1 and (t - L + 1) % S == 0


def _params(case, inputs) -> list:
    """The positional arguments after x of a decode step: per-token inputs come per step, so only weights."""
    return [inputs.params[p.name] for p in RECORDS[case.kind].params if not p.per_token]


def _tokens(case, inputs) -> list[torch.Tensor]:
    """The kind's per-token inputs (x first) as contiguous (1, H, T, D) tensors of the case's dtype."""
    vals = [inputs.x64] + [inputs.params64[p.name] for p in RECORDS[case.kind].params if p.per_token]
    return [torch.from_numpy(v).to(DTYPES[case.dtype]) for v in vals]


def _kw(case, inputs) -> dict:
    kw = RECORDS[case.kind].extra_kwargs(case)
    if RECORDS[case.kind].kind.pe:
        kw["pe"] = inputs.pe
    return kw


def _as_streams(form: str, idx: list[int], N: int, device="cpu"):
    """Stream indices in one of the accepted forms."""
    if form == "list":
        return list(idx)
    if form == "tensor":
        return torch.tensor(idx, dtype=torch.int32, device=device)
    return torch.tensor([k in idx for k in range(N)], dtype=torch.bool, device=device)


@st.composite
def plans(draw, seqlens: tuple[int, ...], L: int, S: int):
    """Per stream: its cache slot, the step it starts at, how it starts
    (fresh or from a prefill of P tokens), and optionally a reset after r
    tokens (it then restarts its sequence from token 0)."""
    N = len(seqlens)
    extra = draw(st.integers(0, 2), label="unused_slots")
    slots = draw(st.permutations(range(N + extra)), label="slots")[:N]
    plan = []
    for k, n in enumerate(seqlens):
        start = draw(st.integers(0, 3), label=f"start_{k}")
        prefill = draw(st.one_of(st.none(), st.integers(0, n)), label=f"prefill_{k}")
        reset = draw(st.one_of(st.none(), st.integers(1, n)), label=f"reset_after_{k}") \
            if prefill is None and n >= 1 else None
        plan.append(dict(slot=slots[k], start=start, prefill=prefill, reset=reset))
    forms = draw(st.lists(st.sampled_from(("list", "tensor", "mask")), min_size=3, max_size=3), label="index_forms")
    extra_tail = draw(st.integers(0, 2), label="extra_tail_tokens")
    return N + extra, plan, forms, extra_tail


def _schedule(seqlens, plan):
    """Per stream, the list of (step, token) it receives, token numbers in
    its own current sequence, plus the reset step (or None)."""
    out = []
    for n, p in zip(seqlens, plan):
        first = p["prefill"] or 0
        toks = list(range(first, n))
        if p["reset"] is not None:
            toks = list(range(p["reset"])) + toks       # r tokens, reset, then the whole sequence
        out.append([(p["start"] + i, t) for i, t in enumerate(toks)])
    return out


def _run(case, inputs, N_max, plan, forms, extra_tail, *, compiled=None, device="cpu", backend="torch"):
    """Drive the cache (on ``device``, steps through ``backend``); returns per
    stream the decoded windows (list of (H, D_out) float64 arrays) after its
    last (re)start, and checks every step's emission, zero rows and counters."""
    kind, L, S, H, D = case.kind, case.L, case.S, case.H, case.D
    dev = torch.device(device)
    toks = [t.to(dev) for t in _tokens(case, inputs)]
    params = [p.to(dev) if isinstance(p, torch.Tensor) else p for p in _params(case, inputs)]
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in _kw(case, inputs).items()}
    starts = np.concatenate([[0], np.cumsum(case.seqlens)])
    cache = DecodeCache(kind, N_max, H, D, block_size=L, stride=S, padding=case.padding, dtype=DTYPES[case.dtype],
                        device=dev)
    sched = _schedule(case.seqlens, plan)
    n_steps = max((s[-1][0] + 1 for s in sched if s), default=0) + 1
    outs = [[] for _ in plan]
    step = compiled or decode_step
    for s in range(n_steps):
        # streams starting now: fresh ones together, prefilled ones together (from last_tokens of a packed prefill)
        fresh = [k for k, p in enumerate(plan) if p["start"] == s and p["prefill"] is None]
        pre = [k for k, p in enumerate(plan) if p["start"] == s and p["prefill"] is not None]
        if fresh:
            cache.add(_as_streams(forms[0], [plan[k]["slot"] for k in fresh], N_max, dev))
        if pre:
            P = [plan[k]["prefill"] for k in pre]
            cu = torch.tensor([0, *np.cumsum(P)], device=dev)
            packed = [torch.cat([t[:, :, starts[k]:starts[k] + p] for k, p in zip(pre, P)], 2) for t in toks]
            tails = [last_tokens(t, cu, L - 1 + extra_tail) for t in packed]         # [n, H, T_tail, D]
            slots = [plan[k]["slot"] for k in pre]
            if forms[1] == "mask":   # rows in slot order, (N_max, ...)
                order = sorted(range(len(pre)), key=lambda i: slots[i])
                full_tails = [t.new_zeros((N_max, *t.shape[1:])) for t in tails]
                lengths = torch.zeros(N_max, dtype=torch.int64, device=dev)
                for i in order:
                    for ft, t in zip(full_tails, tails):
                        ft[slots[i]] = t[i]
                    lengths[slots[i]] = P[i]
                cache.add(_as_streams("mask", slots, N_max, dev), *full_tails, n_tokens=lengths)
            else:
                cache.add(_as_streams(forms[1], slots, N_max, dev), *tails,
                          n_tokens=P if forms[1] == "list" else torch.tensor(P, device=dev))
        # this step's token of every stream that has one; NaN in every other row
        new = [t.new_full((N_max, H, D), float("nan")) for t in toks]
        live = {}
        for k, sch in enumerate(sched):
            hit = [t for st_, t in sch if st_ == s]
            if hit:
                live[k] = hit[0]
                for nt, t in zip(new, toks):
                    nt[plan[k]["slot"]] = t[0, :, starts[k] + hit[0]]
        # streams without a token this step must be inactive: remove the finished ones
        done = [plan[k]["slot"] for k, sch in enumerate(sched)
                if k not in live and (sch[-1][0] == s - 1 if sch else plan[k]["start"] == s)]
        if done:
            cache.remove(_as_streams(forms[2], done, N_max, dev))
        before = cache.n_windows.clone()
        y, emitted = step(kind, cache, *new, *params, backend=backend, **kw)
        y, emitted = y.cpu(), emitted.cpu()
        assert y.dtype == DTYPES[case.dtype] and tuple(y.shape) == (N_max, H, RECORDS[kind].d_out(case))
        assert emitted.dtype == torch.bool and tuple(emitted.shape) == (N_max,)
        expect = torch.zeros(N_max, dtype=torch.bool)
        for k, t in live.items():
            expect[plan[k]["slot"]] = _emits(t, L, S, case.padding)
        assert torch.equal(emitted, expect), f"step {s}: emitted {emitted.tolist()} != {expect.tolist()}"
        assert (y[~emitted] == 0).all(), f"step {s}: a row without a window is not 0"
        n_tokens, n_windows = cache.n_tokens.cpu(), cache.n_windows.cpu()
        assert torch.equal(n_windows - before.cpu(), emitted.long())
        for k, t in live.items():
            slot = plan[k]["slot"]
            assert n_tokens[slot] == t + 1 and n_windows[slot] == _num_windows(t + 1, L, S, case.padding)
            if emitted[slot]:
                outs[k].append(to_numpy(y[slot]))
        # resets: after r tokens the stream starts over, its earlier windows are checked below, then dropped
        for k, p in enumerate(plan):
            if p["reset"] and s == p["start"] + p["reset"] - 1:
                outs[k] = [("reset", list(outs[k]))]
                cache.reset(_as_streams(forms[0], [p["slot"]], N_max, dev))
    return outs, cache


def draw_streams(kind, data):
    """A packed case of 1-3 short streams (any dtype of DTYPE_CHOICES), its
    inputs and its strict bound, well conditioned: what the decoding
    properties (here and tests/test_paged.py) feed token by token."""
    dtype = data.draw(st.sampled_from(DTYPE_CHOICES), label="dtype")
    case = data.draw(cases(kind=kind, dtype=dtype, packed=True, max_windows=4, max_seqs=3, max_dim=6,
                           max_heads=4, layouts=("contiguous",)), label="case")
    assume(len(case.seqlens) >= 1)
    inputs = make_inputs(case, RECORDS[kind])
    bound = forward_bound(case, inputs, "strict")
    assume(bound.well_conditioned)
    return case, inputs, bound


@pytest.mark.parametrize("kind", KINDS)
@settings(deadline=None)
@given(data=st.data())
def test_decode_equals_full_pass(kind, data):
    case, inputs, bound = draw_streams(kind, data)
    N_max, plan, forms, extra_tail = data.draw(plans(case.seqlens, case.L, case.S), label="plan")
    note(f"plan={plan} forms={forms} N_max={N_max}")
    outs, _ = _run(case, inputs, N_max, plan, forms, extra_tail)

    _check_against_full_pass(case, inputs, plan, outs, bound)


# the Triton ring kernels (kvcompress/ops/_triton/ring.py) run in the interpreter here, which costs per
# program and per step (~2 s an example): a twelfth of the profile's examples, for the kinds that differ in
# what the kernels move (they are kind-agnostic data movement): one input with pad 0 and D_out = D
# (mean_pool), D_out != D (linear), two inputs side by side with pads 0 and -inf (gated_pool). The GPU
# tests run every kind through them.
RING_EXAMPLES = max(3, settings.default.max_examples // 12)
RING_KINDS = ("mean_pool", "linear", "gated_pool")


@pytest.mark.parametrize("kind", RING_KINDS)
@settings(deadline=None, max_examples=RING_EXAMPLES)
@given(data=st.data())
def test_ring_kernels_equal_full_pass(kind, data):
    """The step through the Triton ring kernels (the CUDA default; forced on
    CPU tensors here, in Triton's interpreter) passes the same checks as the
    torch formulation: emission, zero rows, counters, and the full pass's
    windows (bit for bit where the torch backend is batch-invariant: those
    windows keep the full pass's stride; else within the bound: the others
    are compressed as one sequence with stride L)."""
    case, inputs, bound = draw_streams(kind, data)
    N_max, plan, forms, extra_tail = data.draw(plans(case.seqlens, case.L, case.S), label="plan")
    old, decode_module.RING_KERNELS = decode_module.RING_KERNELS, "on"
    try:
        outs, _ = _run(case, inputs, N_max, plan, forms, extra_tail)
    finally:
        decode_module.RING_KERNELS = old
    _check_against_full_pass(case, inputs, plan, outs, bound)


@pytest.mark.parametrize("kind", ["linear", "gated_pool"])
def test_ring_kernels_with_the_triton_backend(kind):
    """Ring kernels and Triton compression together (interpreter), on the
    fixed plan, for both ways the windows reach the kernels (linear: one
    sequence with stride L; gated_pool with split: batch rows): every check
    of the property above, and the cache after the last step equal bit for
    bit to the torch formulation's. (The GPU tests run every kind.)"""
    case, inputs = _compile_case(kind)
    old = decode_module.RING_KERNELS
    try:
        decode_module.RING_KERNELS = "on"
        got, cache = _run(case, inputs, 4, _PLAN, ["tensor", "list", "mask"], 0, backend="triton")
        decode_module.RING_KERNELS = "off"
        _, twin = _run(case, inputs, 4, _PLAN, ["tensor", "list", "mask"], 0, backend="triton")
    finally:
        decode_module.RING_KERNELS = old
    for name in ("ring", "n_tokens", "n_windows", "active"):
        assert torch.equal(getattr(cache, name), getattr(twin, name)), name
    bound = forward_bound(case, inputs, backends.get(kind, "triton").precision)
    _check_against_full_pass(case, inputs, _PLAN, got, bound, events=False, exact=False)


def test_ring_kernels_past_one_feature_block(monkeypatch):
    """Head dims past the ring kernels' feature tile (MAX_BLOCK_D): the
    window, ring and output loops over feature blocks, gated_pool's two
    inputs side by side at offset D; equal to the torch formulation bit for
    bit (the same torch compression, in the same layout, on both sides)."""
    from kvcompress.ops._triton import ring
    monkeypatch.setattr(ring, "MAX_BLOCK_D", 4)       # D = 6 then spans two blocks, the second masked
    for kind in ("mean_pool", "gated_pool"):
        N, H, D, L, S = 3, 2, 6, 4, 2
        caches, outs = [], []
        for mode in ("on", "off"):
            monkeypatch.setattr(decode_module, "RING_KERNELS", mode)
            g, gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
            c = DecodeCache(kind, N, H, D, block_size=L, stride=S, padding="left")
            c.add([0, 2])
            ys = []
            for _ in range(7):
                new = [torch.randn(N, H, D, generator=gen) for _ in RECORDS[kind].kind.inputs]
                params = [torch.randn(1, L, D, generator=g)] if kind == "gated_pool" else []
                y, em = decode_step(kind, c, *new, *params, backend="torch")
                ys.append((y, em))
            caches.append(c)
            outs.append(ys)
        for (ya, ea), (yb, eb) in zip(*outs):
            assert torch.equal(ea, eb) and torch.equal(ya, yb), kind
        for name in ("ring", "n_tokens", "n_windows", "active"):
            assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), (kind, name)


def _check_against_full_pass(case, inputs, plan, outs, bound, *, events=True, exact=None):
    """Every stream's decoded windows (before a reset, and since its last
    start) are the full pass's windows of its sequence (the torch backend's,
    on the CPU): bit for bit on a batch-invariant backend (``exact``: by
    default the torch backend's promise), else within twice the tolerance
    bound."""
    kind, L, S = case.kind, case.L, case.S
    full = to_numpy(RECORDS[kind].call(getattr(kf, kind), case, inputs, backend="torch"))   # [1, H, W, D_out]
    exact = backends.get(kind, "torch").batch_invariant if exact is None else exact
    tol = np.broadcast_to(2 * bound.bound, full.shape)[0]                                 # [H, W, D_out]
    w0 = 0
    for k, (n, p) in enumerate(zip(case.seqlens, plan)):
        W = _num_windows(n, L, S, case.padding)
        skip = _num_windows(p["prefill"], L, S, case.padding) if p["prefill"] is not None else 0
        got, checks = outs[k], []
        if got and isinstance(got[0], tuple):     # windows before the reset: the full pass's first ones
            before, got = got[0][1], got[1:]
            assert len(before) == _num_windows(p["reset"], L, S, case.padding), f"stream {k}\n  {case!r}"
            checks.append((before, slice(w0, w0 + len(before))))
        assert len(got) == W - skip, f"stream {k}: {len(got)} windows, expected {W - skip}\n  {case!r}"
        checks.append((got, slice(w0 + skip, w0 + W)))
        for ws, sl in checks:
            if not ws:
                continue
            g, e, t = np.stack(ws, 1), full[0, :, sl], tol[:, sl]                          # [H, w, D_out]
            if exact:
                np.testing.assert_array_equal(g, e, err_msg=f"stream {k} not bit for bit\n  {case!r}")
            else:
                if events:
                    event(f"bit-exact although not promised: {bool(np.array_equal(g, e))}")
                err = np.abs(g - e)
                assert (err <= t).all(), f"stream {k}: worst error / bound {np.max(err / t):.3g}\n  {case!r}"
        w0 += W


# ---------------------------------------------------------------- compile

# one small configuration per kind: left pads, S not dividing L (gated_pool: split, so S | L)
_COMPILE = {k: dict(L=5, S=2) for k in KINDS} | {"gated_pool": dict(L=4, S=2, split=True)}
# inductor's softmax (exp, reductions) is its own code: the kinds with a softmax are compared by the model
_COMPILE_EXACT = ("mean_pool", "weighted_pool", "linear")


def _compile_case(kind, dtype="float32"):
    from kvcompress.testing.cases import Case
    c = _COMPILE[kind]
    case = Case(kind, dtype, B=1, H=2, G=2, T=23, D=4, block_size=c["L"], stride=c["S"], padding="left",
                seqlens=(11, 0, 12), use_pe=RECORDS[kind].kind.pe, D_out=3, F=5, bias=True, split=c.get("split", False),
                seed=7)
    return case, make_inputs(case, RECORDS[kind])


# three streams in four slots: one reset mid-way, one starting a step late, one from a prefill
_PLAN = [dict(slot=2, start=0, prefill=None, reset=4), dict(slot=0, start=1, prefill=None, reset=None),
         dict(slot=3, start=0, prefill=5, reset=None)]


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_step_equals_eager(kind):
    torch._dynamo.reset()
    case, inputs = _compile_case(kind)
    plan = _PLAN
    compiled = torch.compile(decode_step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, cache_c = _run(case, inputs, 4, plan, ["tensor", "list", "mask"], 0, compiled=compiled)
    want, cache_e = _run(case, inputs, 4, plan, ["tensor", "list", "mask"], 0)
    assert torch.equal(cache_c.n_tokens, cache_e.n_tokens) and torch.equal(cache_c.n_windows, cache_e.n_windows)
    assert torch.equal(cache_c.ring, cache_e.ring)
    bound = forward_bound(case, inputs, "strict")
    _check_against_full_pass(case, inputs, plan, got, bound, events=False)
    assert sum(len(g) for g in got) > 0
    if kind in _COMPILE_EXACT:
        for g, w in zip(got, want):
            assert len(g) == len(w)
            for a, b in zip(g, w):
                a, b = (a[1], b[1]) if isinstance(a, tuple) else ([a], [b])
                assert all(np.array_equal(u, v) for u, v in zip(a, b)), "compiled step differs from eager"


def test_cache_methods_compile():
    """add from a prefill (last_tokens, tensor lengths), remove and reset by mask trace without a graph break."""
    L, S = 4, 2
    x, z = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    cu = torch.tensor([0, 3, 10])

    def f(cache, idx, mask):
        cache.add(idx, last_tokens(x, cu, L - 1), last_tokens(z, cu, L - 1), n_tokens=cu[1:] - cu[:-1])
        cache.remove(mask)
        cache.reset(mask)

    caches = [DecodeCache("gated_pool", 4, 2, 4, block_size=L, stride=S, padding="left") for _ in range(2)]
    args = (torch.tensor([2, 0]), torch.tensor([False, True, False, False]))
    torch.compile(f, fullgraph=True, backend="eager")(caches[0], *args)
    f(caches[1], *args)
    for name in ("ring", "n_tokens", "n_windows", "active"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name
    assert caches[0].n_tokens.tolist() == [7, 0, 3, 0] and caches[0].n_windows.tolist() == [3, 0, 1, 0]
    assert caches[0].active.tolist() == [True, True, True, False]


# ---------------------------------------------------------------- GPU

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_backends(kind) -> list[str]:
    return [b.name for b in backends.backends(kind) if "cuda" in b.devices]


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("kind", KINDS)
def test_decode_on_gpu_equals_full_pass(kind, dtype):
    """Every backend registered for CUDA, driven through the CPU property's
    plan (reset, late start, prefill hand-off; indices as tensors, lists and
    masks on the device): the decoded windows are the full pass's (the torch
    backend on the CPU) within twice the looser bound of the two classes."""
    case, inputs = _compile_case(kind, dtype)
    for name in _cuda_backends(kind):
        got, _ = _run(case, inputs, 4, _PLAN, ["tensor", "list", "mask"], 0, device="cuda", backend=name)
        assert sum(len(g) for g in got) > 0
        bound = forward_bound(case, inputs, backends.get(kind, name).precision)
        _check_against_full_pass(case, inputs, _PLAN, got, bound, events=False, exact=False)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("kind", KINDS)
def test_step_replayed_from_a_cuda_graph(kind):
    """One decode step captured in a CUDA graph, replayed step after step
    (new tokens copied into the captured input, streams added and removed
    between replays with device masks), equals the eager step on a twin
    cache bit for bit: outputs, emitted masks, rings and counters; and no
    eager step synchronises (``torch.cuda.set_sync_debug_mode("error")``
    raises on any synchronising call)."""
    case, inputs = _compile_case(kind, "bfloat16")
    N, H, D, L, S, n_steps = 4, case.H, case.D, case.L, case.S, 3 * case.L
    dev = torch.device("cuda")
    params = [p.to(dev) if isinstance(p, torch.Tensor) else p for p in _params(case, inputs)]
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in _kw(case, inputs).items()}
    n_in = len(RECORDS[kind].kind.inputs)
    gen = torch.Generator(device=dev).manual_seed(3)
    tokens = torch.randn(n_steps, n_in, N, H, D, device=dev, generator=gen).to(torch.bfloat16)
    for name in _cuda_backends(kind):
        def make():
            c = DecodeCache(kind, N, H, D, block_size=L, stride=S, padding="left", dtype=torch.bfloat16, device=dev)
            c.add(torch.tensor([0, 1, 2], device=dev))             # slot 3 starts later
            return c

        graphed, eager, scratch = make(), make(), make()
        static = [torch.zeros(N, H, D, dtype=torch.bfloat16, device=dev) for _ in range(n_in)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                             # compile and warm up outside the capture
            decode_step(kind, scratch, *static, *params, backend=name, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_g, e_g = decode_step(kind, graphed, *static, *params, backend=name, **kw)
        joins = torch.tensor([False, False, False, True], device=dev)
        leaves = torch.tensor([True, False, False, False], device=dev)
        emitted = 0
        for t in range(n_steps):
            if t == L // 2:
                for c in (graphed, eager):
                    c.add(joins)
            if t == 2 * L:
                for c in (graphed, eager):
                    c.remove(leaves)
            for dst, src in zip(static, tokens[t]):
                dst.copy_(src)
            graph.replay()
            torch.cuda.set_sync_debug_mode("error")
            try:
                y_e, e_e = decode_step(kind, eager, *tokens[t], *params, backend=name, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(e_g, e_e), f"{name}, step {t}: emitted masks differ"
            assert torch.equal(y_g, y_e), f"{name}, step {t}: replayed output differs from eager"
            emitted += int(e_e.sum())
        for a in ("ring", "n_tokens", "n_windows", "active"):
            assert torch.equal(getattr(graphed, a), getattr(eager, a)), f"{name}: cache.{a} differs"
        assert emitted >= 3 * (n_steps // S) - 2, f"{name}: only {emitted} windows emitted"


def test_no_host_reads(monkeypatch):
    """An eager step reads no tensor value on the host."""
    cache = DecodeCache("linear", 3, 2, 4, block_size=4, stride=2, padding="left")
    cache.add([0, 2])
    w, pe = torch.randn(2, 4, 4, 3), torch.randn(2, 4, 4)
    decode_step("linear", cache, torch.randn(3, 2, 4), w, pe=pe)     # backends loaded

    def boom(*a, **k):
        raise AssertionError("host read of a tensor value")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for _ in range(3):
        decode_step("linear", cache, torch.randn(3, 2, 4), w, pe=pe)
    monkeypatch.undo()
    assert cache.n_tokens.tolist() == [4, 0, 4] and cache.n_windows.tolist() == [2, 0, 2]


# ---------------------------------------------------------------- errors

def _cache(kind="linear", **kw):
    c = DecodeCache(kind, 3, 2, 4, block_size=4, stride=2, padding="left", **kw)
    c.add([0, 1])
    return c


def _snap(c):
    return [getattr(c, n).clone() for n in ("ring", "n_tokens", "n_windows", "active")]


_W = torch.randn(2, 4, 4, 3)


@pytest.mark.parametrize("args, kw, exc, match", [
    (("mean", None, torch.randn(3, 2, 4)), {}, ValueError, "kind"),
    ((3, None, torch.randn(3, 2, 4)), {}, TypeError, "kind"),
    (("mean_pool", None, torch.randn(3, 2, 4)), {}, ValueError, "cache was made for kind"),
    (("linear", "cache", torch.randn(3, 2, 4), _W), {}, TypeError, "cache"),
    (("linear", None, torch.randn(2, 2, 4), _W), {}, ValueError, r"x must have shape \(N_max, H, D\)"),
    (("linear", None, torch.randn(3, 2, 5), _W), {}, ValueError, "x must have shape"),
    (("linear", None, torch.randn(1, 3, 2, 4), _W), {}, ValueError, "x must have shape"),
    (("linear", None, torch.randn(3, 2, 4, dtype=torch.float64), _W), {}, TypeError, "x must have the cache's dtype"),
    (("linear", None, "x", _W), {}, TypeError, "x must be a torch.Tensor"),
    (("linear", None, torch.randn(3, 2, 4), _W), {"pe": torch.randn(2, 3, 4)}, ValueError, "pe"),
    (("linear", None, torch.randn(3, 2, 4), _W), {"padding": "left"}, TypeError, "padding"),
    (("linear", None, torch.randn(3, 2, 4), _W), {"backend": 1}, TypeError, "backend"),
    (("linear", None, torch.randn(3, 2, 4), _W), {"backend": "cuda"}, ValueError, "backend"),
    (("linear", None, torch.randn(3, 2, 4), torch.randn(2, 3, 4, 3)), {}, ValueError, "weight"),
    (("linear", None, torch.randn(3, 2, 4), _W.double()), {}, TypeError, "weight"),
])
def test_bad_input_step(args, kw, exc, match):
    cache = _cache()
    args = (args[0], cache if args[1] is None else args[1], *args[2:])
    snap = _snap(cache)
    with pytest.raises(exc, match=match):
        decode_step(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(_snap(cache), snap)), "a failed step wrote the cache"


def test_bad_input_gated_pool():
    cache = _cache("gated_pool")
    x = torch.randn(3, 2, 4)
    with pytest.raises(TypeError, match="inputs"):
        decode_step("gated_pool", cache, x)
    with pytest.raises(ValueError, match="z must have shape"):
        decode_step("gated_pool", cache, x, torch.randn(3, 2, 3))
    with pytest.raises(TypeError, match="takes no pe"):
        decode_step("gated_pool", cache, x, x, pe=torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="bias"):   # with split, D_out = D / (L / S) = 2
        decode_step("gated_pool", cache, x, x, torch.randn(1, 4, 4), split=True)
    with pytest.raises(TypeError, match="split"):
        decode_step("gated_pool", cache, x, x, split=1)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(kind="nope"), ValueError, "kind"),
    (dict(max_streams=0), ValueError, "max_streams"),
    (dict(heads=2.0), TypeError, "heads"),
    (dict(block_size=2, stride=3), ValueError, "stride"),
    (dict(padding="same"), ValueError, "padding"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_bad_input_cache(kw, exc, match):
    args = dict(kind="linear", max_streams=3, heads=2, dim=4, block_size=4, stride=2) | kw
    with pytest.raises(exc, match=match):
        DecodeCache(args.pop("kind"), args.pop("max_streams"), args.pop("heads"), args.pop("dim"), **args)


def test_bad_input_add():
    c = _cache()
    snap = _snap(c)
    tail = torch.randn(1, 2, 3, 4)
    for streams, tail_, n_tok, exc, match in [
        ([3], (), None, ValueError, "streams"),
        ([0, 0], (), None, ValueError, "distinct"),
        (1.0, (), None, TypeError, "streams"),
        (torch.tensor([0.0]), (), None, TypeError, "streams"),
        (torch.tensor([True, False]), (), None, ValueError, "mask"),
        ([1], (), [3], ValueError, "n_tokens"),
        ([1], (tail,), None, ValueError, "n_tokens"),
        ([1], (torch.randn(1, 2, 2, 4),), [3], ValueError, "T_tail"),
        ([1], (tail.double(),), [3], TypeError, "dtype"),
        ([1], (tail,), [-1], ValueError, "n_tokens"),
        ([1], (tail,), torch.tensor([1.0]), TypeError, "n_tokens"),
        ([1], (tail, tail), [3], TypeError, "tail"),
    ]:
        with pytest.raises(exc, match=match):
            c.add(streams, *tail_, n_tokens=n_tok)
    assert all(torch.equal(a, b) for a, b in zip(_snap(c), snap))
    with pytest.raises(ValueError, match="x must be"):
        last_tokens(torch.randn(2, 2, 3, 4), torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="cu_seqlens"):
        last_tokens(torch.randn(1, 2, 3, 4), torch.tensor([0.0, 3.0]), 3)
    with pytest.raises(TypeError, match="count"):
        last_tokens(torch.randn(1, 2, 3, 4), torch.tensor([0, 3]), 3.0)


def test_docs_example():
    """The example in docs/decoding.md runs and its assertions hold."""
    run_doc_examples("decoding.md")
