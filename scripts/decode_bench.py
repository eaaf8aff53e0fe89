"""Issue 15's latency table: one decode step of ``kvcompress.decode`` for N
streams, eager and replayed from a CUDA graph, next to recompressing the
prefixes from scratch, every kind and every CUDA backend, in one process.

Shape (NSA): H = 4 KV heads, D = 128, L = 32, S = 16, padding "left",
bfloat16, one weight set per head (mlp: F = L * D; gated_pool: no split,
D_out = D); every stream holds a PREFIX - 1 token prompt (default 4096 - 1)
handed over with ``DecodeCache.add`` and receives one token per step (a
window completes every S-th step; the step does the same work either way).

- ``eager``: wall time per step of R back-to-back steps, synchronised once
  at the end (host and device overlap as in a decoding loop: the larger of
  the two), median of 5 such loops;
- ``graph``: the same step captured once in a CUDA graph, R replays;
- ``recompress``: ``kvcompress.functional`` over all N prefixes of PREFIX
  tokens (the windows a step would otherwise recompute), the default
  backend, ``triton.testing.do_bench`` median;
- ``sync_free``: the eager step under ``torch.cuda.set_sync_debug_mode("error")``;
- ``graph_equals_eager``: from two identical caches, the replayed step's
  output, mask and cache equal the eager step's bit for bit;
- ``(torch step)`` rows: the same backend with the step's data movement in
  torch (``kvcompress.decode.RING_KERNELS = "off"``), beside the default
  rows, which move it with the two Triton ring kernels;
- ``paged`` rows (``--paged``): ``kvcompress.paged.paged_decode_step`` on the
  same shape, reading a paged KV cache (pages of 16 tokens) and writing a
  paged compressed cache, eager and replayed (its replay against eager
  steps is tests/test_paged.py's);
- ``+ inductor`` rows (at --compile-streams N, default 64): the same step
  through ``torch.compile(decode_step, fullgraph=True)`` (inductor fuses
  the step's index arithmetic, gathers and ring update), eager launches and
  captured in a CUDA graph; ``first_calls_s`` holds the compilation.

Usage (CUDA machine): python scripts/decode_bench.py [--streams 1,8,64,256]
[--kinds ...] [--out decode.json] [--md decode.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kvcompress.decode as decode_module
import kvcompress.functional as kf
from kvcompress import backends, kinds
from kvcompress.decode import DecodeCache, decode_step

H, D, L, S = 4, 128, 32, 16
DT = torch.bfloat16


def _params(kind, gen):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(DT)

    F = L * D
    return {"mean_pool": lambda: [], "weighted_pool": lambda: [rnd(H, L, scale=1 / L)],
            "linear": lambda: [rnd(H, L, D, D, scale=(L * D) ** -0.5), rnd(H, D)],
            "mlp": lambda: [rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F), rnd(H, F, D, scale=F ** -0.5),
                            rnd(H, D)],
            "attention_pool": lambda: [rnd(H, D, D, scale=D ** -0.5)],
            "gated_pool": lambda: [rnd(H, L, D)]}[kind]()


def _cache(kind, N, prefix, gen):
    n_in = len(kinds.get(kind).inputs)
    c = DecodeCache(kind, N, H, D, block_size=L, stride=S, padding="left", dtype=DT, device="cuda")
    tails = [torch.randn(N, H, L - 1, D, device="cuda", generator=gen).to(DT) for _ in range(n_in)]
    c.add(torch.arange(N, device="cuda"), *tails, n_tokens=torch.full((N,), prefix - 1, device="cuda"))
    return c


def _clone(c: DecodeCache) -> DecodeCache:
    new = DecodeCache(c.kind, c.max_streams, c.heads, c.dim, block_size=c.block_size, stride=c.stride,
                      padding=c.padding, dtype=c.dtype, device=c.device)
    for a in ("ring", "n_tokens", "n_windows", "active"):
        getattr(new, a).copy_(getattr(c, a))
    return new


def _loop_us(fn, R):
    """Median over 5 loops of R calls, synchronised at each loop's end: us per call."""
    out = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(R):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / R * 1e6)
    return statistics.median(out)


def one(kind, N, backend, prefix, R, gen, compiled=False, ring="auto"):
    old, decode_module.RING_KERNELS = decode_module.RING_KERNELS, ring
    try:
        return _one(kind, N, backend, prefix, R, gen, compiled, ring)
    finally:
        decode_module.RING_KERNELS = old


def _one(kind, N, backend, prefix, R, gen, compiled, ring):
    rec = kinds.get(kind)
    params = _params(kind, gen)
    kw = {"pe": torch.randn(H, L, D, device="cuda", generator=gen).to(DT)} if rec.pe else {}
    n_in = len(rec.inputs)
    tok = [torch.randn(N, H, D, device="cuda", generator=gen).to(DT) for _ in range(n_in)]
    r = {"kind": kind, "N": N, "backend": backend + (" + inductor" if compiled else "")
         + (" (torch step)" if ring == "off" and not compiled else "")}
    fn = torch.compile(decode_step, fullgraph=True, dynamic=False) if compiled else decode_step
    if compiled:
        torch._dynamo.reset()

    def step(c):
        return fn(kind, c, *tok, *params, backend=backend, **kw)

    cache = _cache(kind, N, prefix, gen)
    t0 = time.perf_counter()
    for _ in range(3):
        step(cache)                                    # compile, warm up
    torch.cuda.synchronize()
    r["first_calls_s"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(cache)
        r["sync_free"] = True
    except RuntimeError as e:
        r["sync_free"] = f"{str(e)[:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    r["eager_us"] = _loop_us(lambda: step(cache), R)

    # captured on the warmed cache itself (a compiled step may guard on the object), checked against a twin
    twin = _clone(cache)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg, eg = step(cache)
    g.replay()
    ye, ee = step(twin)
    r["graph_equals_eager"] = bool(torch.equal(yg, ye) and torch.equal(eg, ee) and all(
        torch.equal(getattr(cache, a), getattr(twin, a)) for a in ("ring", "n_tokens", "n_windows")))
    r["graph_us"] = _loop_us(g.replay, R)
    del g
    return r


def paged_one(kind, N, backend, prefix, R, gen, ring="auto", page_size=16):
    """``kvcompress.paged.paged_decode_step`` for N streams of ``prefix``
    tokens in a paged KV cache (pages of ``page_size`` tokens, streams' pages
    interleaved), eager and replayed from a CUDA graph (the same token each
    replay: fixed shapes, the same work)."""
    from kvcompress.paged import paged_decode_step

    old, decode_module.RING_KERNELS = decode_module.RING_KERNELS, ring
    try:
        rec = kinds.get(kind)
        params = _params(kind, gen)
        kw = {"pe": torch.randn(H, L, D, device="cuda", generator=gen).to(DT)} if rec.pe else {}
        M = -(-prefix // page_size)
        pools = tuple(torch.randn(N * M, page_size, H, D, device="cuda", generator=gen).to(DT) for _ in rec.inputs)
        table = torch.arange(N * M, device="cuda").view(M, N).t().contiguous()       # stream n: pages n, N + n, ...
        W = prefix // S
        Mo = -(-W // page_size)
        out_pages = torch.zeros(N * Mo, page_size, H, D, device="cuda", dtype=DT)
        out_table = torch.arange(N * Mo, device="cuda").view(N, Mo)
        seq_lens = torch.full((N,), prefix, device="cuda")
        kv = pools if len(pools) > 1 else pools[0]

        def step():
            return paged_decode_step(kind, kv, table, seq_lens, out_pages, out_table, *params, block_size=L,
                                     stride=S, padding="left", backend=backend, **kw)

        r = {"kind": kind, "N": N, "backend": f"paged {backend}" + (" (torch step)" if ring == "off" else "")}
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        r["eager_us"] = _loop_us(step, R)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        g.replay()
        r["graph_us"] = _loop_us(g.replay, R)
        r["sync_free"] = True
        r["graph_equals_eager"] = True       # not checked here: tests/test_paged.py replays against eager steps
        del g
        return r
    finally:
        decode_module.RING_KERNELS = old


def profile_graph(kind, N, backend, prefix, gen, replays=20):
    """The kernels of one replayed step (torch.profiler over ``replays``
    replays): [(name, calls per step, us per step)], longest first."""
    from torch.profiler import ProfilerActivity, profile

    rec = kinds.get(kind)
    params = _params(kind, gen)
    kw = {"pe": torch.randn(H, L, D, device="cuda", generator=gen).to(DT)} if rec.pe else {}
    tok = [torch.randn(N, H, D, device="cuda", generator=gen).to(DT) for _ in rec.inputs]
    cache = _cache(kind, N, prefix, gen)
    for _ in range(3):
        decode_step(kind, cache, *tok, *params, backend=backend, **kw)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        decode_step(kind, cache, *tok, *params, backend=backend, **kw)
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.count / replays, e.device_time_total / replays) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])


def recompress_us(kind, N, prefix, gen):
    import triton

    rec = kinds.get(kind)
    params = _params(kind, gen)
    kw = {"pe": torch.randn(H, L, D, device="cuda", generator=gen).to(DT)} if rec.pe else {}
    xs = [torch.randn(N, H, prefix, D, device="cuda", generator=gen).to(DT) for _ in rec.inputs]
    fn = getattr(kf, kind)
    return triton.testing.do_bench(lambda: fn(*xs, *params, block_size=L, stride=S, padding="left", **kw),
                                   warmup=5, rep=50) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(kinds.KINDS))
    ap.add_argument("--streams", default="1,8,64,256")
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--compile-streams", default="64",
                    help="stream counts at which the step is also measured under torch.compile(fullgraph=True)")
    ap.add_argument("--torch-step", default="64",
                    help="stream counts at which the step is also measured with its data movement in torch")
    ap.add_argument("--deadline", type=float, default=240, help="seconds after which no compiled variant starts")
    ap.add_argument("--profile", default=None, metavar="KIND:BACKEND[,...]",
                    help="only profile the CUDA-graph step of these at the first --streams N: its kernels and times")
    ap.add_argument("--paged", action="store_true", help="also time kvcompress.paged.paged_decode_step")
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    import triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    if a.profile:
        N = int(a.streams.split(",")[0])
        for item in a.profile.split(","):
            kind, backend = item.split(":")
            print(f"\n{kind}, {backend}, N = {N}: kernels of one replayed step (us per step)")
            for name, calls, us in profile_graph(kind, N, backend, a.prefix, gen):
                print(f"  {us:8.2f}  x{calls:4.1f}  {name[:110]}")
        return
    rows, start = [], time.perf_counter()
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bfloat16, "
            f"H={H}, D={D}, L={L}, S={S}, left, prefix {a.prefix}")
    print(head, flush=True)
    for kind in a.kinds.split(","):
        names = [b.name for b in backends.backends(kind) if "cuda" in b.devices]
        for N in (int(n) for n in a.streams.split(",")):
            base = recompress_us(kind, N, a.prefix, gen)
            variants = [(name, False, "auto") for name in names]
            if str(N) in a.torch_step.split(","):
                variants += [(name, False, "off") for name in names]
            if str(N) in a.compile_streams.split(","):
                variants += [(name, True, "auto") for name in names]
            if a.paged:
                for name in names:
                    for ring in (("auto", "off") if str(N) in a.torch_step.split(",") else ("auto",)):
                        try:
                            r = paged_one(kind, N, name, a.prefix, a.rounds, gen, ring)
                        except Exception as e:          # reported, the table goes on
                            r = {"kind": kind, "N": N, "backend": f"paged {name}",
                                 "error": f"{type(e).__name__}: {str(e)[:300]}"}
                        r["recompress_us"] = base
                        rows.append(r)
                        print(json.dumps(r), flush=True)
            for name, compiled, ring in variants:
                if compiled and time.perf_counter() - start > a.deadline:
                    continue
                try:
                    r = one(kind, N, name, a.prefix, a.rounds, gen, compiled, ring)
                except Exception as e:          # reported, the table goes on
                    r = {"kind": kind, "N": N, "backend": name + (" + inductor" if compiled else ""),
                         "error": f"{type(e).__name__}: {str(e)[:300]}"}
                r["recompress_us"] = base
                rows.append(r)
                print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    lines = [f"Decode step, {head}. Times in us per step (eager: host included; graph: CUDA-graph replay); "
             "recompress: all N prefixes through the default backend.", "",
             "| kind | N | backend | eager | graph | recompress | recompress / graph | sync-free | graph = eager |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['N']} | {r['backend']} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['kind']} | {r['N']} | {r['backend']} | {r['eager_us']:.1f} | {r['graph_us']:.1f} | "
                     f"{r['recompress_us']:.1f} | {r['recompress_us'] / r['graph_us']:.1f}x | "
                     f"{'yes' if r['sync_free'] is True else 'NO'} | {'yes' if r['graph_equals_eager'] else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        json.dump({"head": head, "rows": rows}, open(a.out, "w"), indent=1)
    if a.md:
        open(a.md, "w").write(text + "\n")


if __name__ == "__main__":
    main()
