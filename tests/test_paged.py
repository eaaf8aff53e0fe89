"""Decoding over paged caches (kvcompress.paged; docs/decoding.md, "Paged
caches"), on the torch backend.

Properties:

- test_paged_decode_equals_full_pass: streams in random rows of the block
  tables, their tokens in randomly placed pages of a KV pool of random page
  size (the test writes each new token there, as a model would), some
  starting from a prefill (its full pass stored with ``write_windows``),
  some starting late; rows without a stream are inactive and their block
  table rows hold garbage. After the last step every stream's compressed
  pages hold exactly the full pass's windows of its sequence (bit for bit on
  a batch-invariant backend, else within twice the tolerance bound), every
  step emits exactly where a window completes with y = 0 elsewhere, and
  every slot of the compressed pool that is not a window stays NaN (nothing
  else is written). Unwritten KV slots are NaN too, so a read of a wrong
  slot shows.
- test_paged_step_compiles: ``torch.compile(fullgraph=True)`` of the step.
- test_bad_input_*: clear TypeError/ValueError naming the argument, before
  anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import kvcompress.decode as decode_module
import kvcompress.functional as kf
from kvcompress._windows import _num_windows
from kvcompress.paged import paged_decode_step, write_windows
from kvcompress.testing.convert import DTYPES, to_numpy
from kvcompress.testing.records import KINDS, RECORDS
from tests.test_decode import (
    RING_EXAMPLES,
    RING_KINDS,
    _check_against_full_pass,
    _compile_case,
    _emits,
    _kw,
    _params,
    _tokens,
    draw_streams,
)

GARBAGE = (-3, 10 ** 6)      # block table entries of rows that are no stream, and past a stream's pages


class Pages:
    """A pool of pages (NaN when unwritten) and one block table row per stream."""

    def __init__(self, rows, lengths, page_size, n_extra_rows, H, D, dtype, rng, width_extra=1):
        pages = [-(-n // page_size) for n in lengths]
        P = sum(pages) + 2
        order = rng.permutation(P)
        self.page_size, self.P = page_size, P
        self.pool = torch.full((P, page_size, H, D), float("nan"), dtype=dtype)
        M = max(pages + [1]) + width_extra
        self.table = torch.tensor(rng.choice(GARBAGE, size=(len(rows) + n_extra_rows, M)), dtype=torch.int32)
        used = 0
        for row, n_pages in zip(rows, pages):
            self.table[row, :n_pages] = torch.from_numpy(order[used:used + n_pages].astype(np.int32))
            used += n_pages

    def slot(self, row, pos):
        return int(self.table[row, pos // self.page_size]), pos % self.page_size


@pytest.mark.parametrize("kind", KINDS)
@settings(deadline=None)
@given(data=st.data())
def test_paged_decode_equals_full_pass(kind, data):
    _paged_property(kind, data)


@pytest.mark.parametrize("kind", RING_KINDS)
@settings(deadline=None, max_examples=RING_EXAMPLES)
@given(data=st.data())
def test_paged_kernels_equal_full_pass(kind, data):
    """The same property through the Triton kernels of the paged step
    (``paged_window``, ``paged_advance``; the CUDA default), forced on CPU
    tensors in Triton's interpreter (test_decode.RING_EXAMPLES examples, the
    kinds of test_decode.RING_KINDS)."""
    old, decode_module.RING_KERNELS = decode_module.RING_KERNELS, "on"
    try:
        _paged_property(kind, data)
    finally:
        decode_module.RING_KERNELS = old


def _paged_property(kind, data):
    case, inputs, bound = draw_streams(kind, data)
    dtype = case.dtype
    L, S, H, D, pad = case.L, case.S, case.H, case.D, case.padding
    n_str = len(case.seqlens)
    extra_rows = data.draw(st.integers(0, 2), label="extra_rows")
    rows = data.draw(st.permutations(range(n_str + extra_rows)), label="rows")[:n_str]
    page_size = data.draw(st.integers(1, 5), label="page_size")
    out_page_size = data.draw(st.integers(1, 4), label="out_page_size")
    prefill = [data.draw(st.one_of(st.none(), st.integers(0, n)), label=f"prefill_{k}")
               for k, n in enumerate(case.seqlens)]
    start = [data.draw(st.integers(0, 2), label=f"start_{k}") for k in range(n_str)]
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    note(f"rows={rows} page_size={page_size} out_page_size={out_page_size} prefill={prefill} start={start}")
    rng = np.random.default_rng(seed)
    N = n_str + extra_rows
    dt = DTYPES[dtype]
    toks = _tokens(case, inputs)                                           # each (1, H, T, D)
    params, kw = _params(case, inputs), _kw(case, inputs)
    starts = np.concatenate([[0], np.cumsum(case.seqlens)])
    W = [_num_windows(n, L, S, pad) for n in case.seqlens]
    kv = Pages(rows, list(case.seqlens), page_size, extra_rows, H, D, dt, rng)
    kv_pools = [kv.pool] + [kv.pool.clone() for _ in toks[1:]]
    D_out = RECORDS[kind].d_out(case)
    out = Pages(rows, W, out_page_size, extra_rows, H, D_out, dt, rng)

    def put_token(k, t):
        page, off = kv.slot(rows[k], t)
        for pool, x in zip(kv_pools, toks):
            pool[page, off] = x[0, :, starts[k] + t]

    # prefill: tokens into the KV pages, the full pass of the packed prompts into the compressed pages
    pre = [k for k in range(n_str) if prefill[k] is not None]
    for k in pre:
        for t in range(prefill[k]):
            put_token(k, t)
    if pre:
        cu = torch.tensor([0, *np.cumsum([prefill[k] for k in pre])])
        packed = [torch.cat([x[:, :, starts[k]:starts[k] + prefill[k]] for k in pre], 2) for x in toks]
        y = getattr(kf, kind)(*packed, *params, block_size=L, stride=S, padding=pad, cu_seqlens=cu,
                              backend="torch", **kw)
        write_windows(out.pool, out.table[[rows[k] for k in pre]], y,
                      kf.compressed_cu_seqlens(cu, L, S, pad))

    # decode: one token per step for every started, unfinished stream
    seq_lens = torch.zeros(N, dtype=torch.int64)
    for k in pre:
        seq_lens[rows[k]] = prefill[k]
    n_steps = max(start[k] + case.seqlens[k] - (prefill[k] or 0) for k in range(n_str)) + 1
    for s in range(n_steps):
        active = torch.zeros(N, dtype=torch.bool)
        expect = torch.zeros(N, dtype=torch.bool)
        for k in range(n_str):
            t = int(seq_lens[rows[k]])
            if s >= start[k] and t < case.seqlens[k]:
                put_token(k, t)
                seq_lens[rows[k]] = t + 1
                active[rows[k]] = True
                expect[rows[k]] = _emits(t, L, S, pad)
        y, emitted = paged_decode_step(kind, tuple(kv_pools) if len(toks) > 1 else kv_pools[0], kv.table, seq_lens,
                                       out.pool, out.table, *params, block_size=L, stride=S, padding=pad,
                                       active=active, backend="torch", **kw)
        assert torch.equal(emitted, expect), f"step {s}: emitted {emitted.tolist()} != {expect.tolist()}"
        assert (y[~emitted] == 0).all(), f"step {s}: a row without a window is not 0"

    # every stream's windows, read back through its compressed block table
    outs, written = [], torch.zeros(out.P, out_page_size, dtype=torch.bool)
    for k in range(n_str):
        ws = []
        for w in range(W[k]):
            page, off = out.slot(rows[k], w)
            written[page, off] = True
            ws.append(to_numpy(out.pool[page, off]))
        outs.append(ws)
    plan = [dict(prefill=None, reset=None) for _ in range(n_str)]
    _check_against_full_pass(case, inputs, plan, outs, bound, events=False)
    assert out.pool[~written].isnan().all(), "a slot of the compressed pool that holds no window was written"


def _small(kind="linear"):
    """A small fixed configuration: (case, inputs, pools, table, seq_lens, out_pool, out_table, params, kw)."""
    case, inputs = _compile_case(kind)
    H, D = case.H, case.D
    n_in = len(RECORDS[kind].kind.inputs)
    pools = [torch.randn(6, 4, H, D) for _ in range(n_in)]
    table = torch.tensor([[0, 1, 2], [3, 4, 5]])
    seq_lens = torch.tensor([6, 9])                     # stream 0's token 5 completes window 2 (L = 5, S = 2)
    out_pool = torch.full((4, 2, H, RECORDS[kind].d_out(case)), float("nan"))
    out_table = torch.tensor([[0, 1], [2, 3]])
    return case, inputs, pools, table, seq_lens, out_pool, out_table, _params(case, inputs), _kw(case, inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_paged_step_compiles(kind):
    """fullgraph tracing (inductor, CPU), equal to the eager step within twice
    the bound (bit for bit not promised: inductor generates softmaxes)."""
    torch._dynamo.reset()
    case, inputs, pools, table, seq_lens, out_pool, out_table, params, kw = _small(kind)
    kvp = tuple(pools) if len(pools) > 1 else pools[0]
    step = torch.compile(paged_decode_step, fullgraph=True)
    outs = []
    for f in (step, paged_decode_step):
        o = out_pool.clone()
        y, e = f(kind, kvp, table, seq_lens, o, out_table, *params, block_size=case.L, stride=case.S,
                 padding="left", **kw)
        outs.append((y, e, o))
    (y1, e1, o1), (y2, e2, o2) = outs
    assert torch.equal(e1, e2) and e2.any()
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    assert torch.equal(o1.isnan(), o2.isnan())


def _call(base="linear", **over):
    """The arguments of a good call of kind ``base`` with ``over`` replacing some."""
    case, inputs, pools, table, seq_lens, out_pool, out_table, params, kw = _small(base)
    a = dict(kind=base, kv_pages=tuple(pools) if len(pools) > 1 else pools[0], block_table=table,
             seq_lens=seq_lens, out_pages=out_pool, out_block_table=out_table, block_size=case.L,
             stride=case.S, padding="left", **kw)
    a.update(over)
    before = a["out_pages"].clone()
    return a, params, before


@pytest.mark.parametrize("over, exc, match", [
    (dict(kind="conv"), ValueError, "kind"),
    (dict(block_table=torch.zeros(2, 3)), TypeError, "block_table"),
    (dict(block_table=torch.zeros(3, dtype=torch.int64)), ValueError, "block_table"),
    (dict(seq_lens=torch.zeros(3, dtype=torch.int64)), ValueError, "seq_lens"),
    (dict(seq_lens=[5, 9]), TypeError, "seq_lens"),
    (dict(out_block_table=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "out_block_table"),
    (dict(out_pages=torch.zeros(4, 2, 2, 3, dtype=torch.float64)), ValueError, "out_pages"),
    (dict(out_pages=torch.zeros(4, 2, 2, 7)), ValueError, "D_out"),
    (dict(kv_pages=torch.zeros(6, 4, 2, 4).transpose(0, 1)), ValueError, "back to back"),
    (dict(kv_pages=torch.zeros(6, 4, 2, 4, dtype=torch.int32)), TypeError, "kv_pages"),
    (dict(active=torch.ones(2)), TypeError, "active"),
    (dict(active=torch.ones(3, dtype=torch.bool)), ValueError, "active"),
    (dict(stride=0), ValueError, "stride"),
    (dict(split=True), TypeError, "split"),
])
def test_bad_input_step(over, exc, match):
    a, params, before = _call(**over)
    kind, pool = a.pop("kind"), a["out_pages"]
    with pytest.raises(exc, match=match):
        paged_decode_step(kind, a.pop("kv_pages"), a.pop("block_table"), a.pop("seq_lens"), a.pop("out_pages"),
                          a.pop("out_block_table"), *params, **a)
    assert torch.equal(pool.isnan(), before.isnan()) and torch.equal(pool.nan_to_num(), before.nan_to_num()), \
        "the compressed pool was written before the error"


def test_bad_input_gated_pool_pools():
    a, params, _ = _call("gated_pool")
    with pytest.raises(TypeError, match="tuple of 2 pools"):
        paged_decode_step("gated_pool", a["kv_pages"][0], a["block_table"], a["seq_lens"], a["out_pages"],
                          a["out_block_table"], *params, block_size=a["block_size"], stride=a["stride"],
                          padding="left", split=a.get("split", False))
    x, z = a["kv_pages"]
    with pytest.raises(ValueError, match="must agree"):
        paged_decode_step("gated_pool", (x, z[:3]), a["block_table"], a["seq_lens"], a["out_pages"],
                          a["out_block_table"], *params, block_size=a["block_size"], stride=a["stride"],
                          padding="left", split=a.get("split", False))


def test_bad_input_write_windows():
    out_pool = torch.full((4, 2, 2, 3), float("nan"))
    table = torch.tensor([[0, 1], [2, 3]])
    y = torch.randn(1, 2, 5, 3)
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="y"):
        write_windows(out_pool, table, y.double(), cu)
    with pytest.raises(ValueError, match="cu_windows"):
        write_windows(out_pool, table, y, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="out_block_table"):
        write_windows(out_pool, table.float(), y, cu)
    assert out_pool.isnan().all()
    write_windows(out_pool, table, y, cu)
    assert torch.equal(out_pool[0], y[0, :, 0:2].transpose(0, 1))
    assert torch.equal(out_pool[2], y[0, :, 2:4].transpose(0, 1)) and torch.equal(out_pool[3, 0], y[0, :, 4])
    assert out_pool[1].isnan().all() and out_pool[3, 1].isnan().all()


# ---------------------------------------------------------------- GPU

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("kind", KINDS)
def test_paged_step_replayed_from_a_cuda_graph(kind):
    """One paged step captured in a CUDA graph with static seq_lens and
    active (updated in place between replays), replayed over 16 tokens of
    three streams (one starting 3 tokens late, one 1 late), equals the eager
    step bit for bit (outputs, masks, the compressed pools) on every CUDA
    backend, and no eager step synchronises."""
    from kvcompress import backends

    case, inputs = _compile_case(kind, "bfloat16")
    H, D, L, S = case.H, case.D, case.L, case.S
    dev, bf = torch.device("cuda"), torch.bfloat16
    n_in = len(RECORDS[kind].kind.inputs)
    params = [p.to(dev) if isinstance(p, torch.Tensor) else p for p in _params(case, inputs)]
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in _kw(case, inputs).items()}
    gen = torch.Generator(device=dev).manual_seed(5)
    pools = [torch.randn(12, 4, H, D, device=dev, generator=gen).to(bf) for _ in range(n_in)]
    kvp = tuple(pools) if n_in > 1 else pools[0]
    table = torch.randperm(12, device=dev, generator=gen).view(3, 4)             # 16 tokens a stream
    out_table = torch.randperm(12, device=dev, generator=gen).view(3, 4)         # 8 windows a stream
    D_out = RECORDS[kind].d_out(case)
    late = torch.tensor([0, 3, 1], device=dev)
    for name in [b.name for b in backends.backends(kind) if "cuda" in b.devices]:
        nan = torch.full((12, 2, H, D_out), float("nan"), dtype=bf, device=dev)
        out_g, out_e, scratch = nan.clone(), nan.clone(), nan.clone()
        seq = torch.zeros(3, dtype=torch.int64, device=dev)
        active = torch.zeros(3, dtype=torch.bool, device=dev)

        def step(out, seq=seq, active=active, name=name):
            return paged_decode_step(kind, kvp, table, seq, out, out_table, *params, block_size=L, stride=S,
                                     padding="left", active=active, backend=name, **kw)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(scratch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_g, e_g = step(out_g)
        emitted = 0
        for t in range(1, 17):
            seq.copy_((t - late).clamp(min=0))
            active.copy_(seq > 0)
            graph.replay()
            torch.cuda.set_sync_debug_mode("error")
            try:
                y_e, e_e = step(out_e)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(e_g, e_e) and torch.equal(y_g, y_e), f"{name}, token {t}: replay != eager"
            emitted += int(e_e.sum())
        assert torch.equal(out_g.isnan(), out_e.isnan()) and torch.equal(out_g.nan_to_num(), out_e.nan_to_num())
        assert emitted == sum(_num_windows(16 - d, L, S, "left") for d in (0, 3, 1)), f"{name}: {emitted} windows"
