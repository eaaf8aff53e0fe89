#!/usr/bin/env python
"""Performance of the Triton kernels (by default mean_pool, weighted_pool
and linear, which have targets; ``--kinds`` adds mlp and attention_pool) on
a GPU: CUDA-graph and eager times, per-kernel profile, host overhead
(docs/triton-perf.md); runs saved as JSON compare side by side.

Run from the repository root on a CUDA machine (needs only torch, triton,
numpy):

    python scripts/gpu_perf.py --out perf.json                     # every kind (~2-3 min)
    python scripts/gpu_perf.py --kinds linear --layouts bthd       # a subset
    python scripts/gpu_perf.py --kinds mlp --T 8192 --layouts bhtd # mlp at a small size (F = L*D)
    python scripts/gpu_perf.py --label new --out new.json          # label a run (e.g. a kernel change) ...
    python scripts/gpu_perf.py --compare old.json,new.json         # ... and compare saved runs (no GPU)
    python scripts/gpu_perf.py --compile-only                      # no GPU: compile every config for sm_90
    python scripts/gpu_perf.py --dry-run-cpu                       # no GPU: every step on CPU, interpreter, tiny

Kernel versions v1 and v2 were compared this way in GPU run 5
(docs/gpu-runs.md); the losing kernels were then deleted. Case: the issue's NSA size, bfloat16, B=1, H=4, D=128, L=32,
S=16, T=131072, left padding, pe on (linear and mlp also with biases; mlp
F = L*D), weights per head (G = H); layouts bhtd (contiguous) and bthd (a (B, T, H, D) tensor seen
through transpose(1, 2)). Per kind, layout and version:

(a) profile: torch.profiler with CUDA activity over ``--profile-iters``
    calls of the forward and of forward + backward: every kernel launched
    (and memset/memcpy), launches per call, mean duration, share of the
    GPU time, and the GPU busy time per call;
(b) graph: forward, and forward + backward (``y = f(...); y.backward(g)``,
    grads set to None before capture so that each replay writes them
    afresh), captured in a CUDA graph after a warm-up on a side stream (as
    PyTorch's CUDA-graph docs require); median over ``--graph-reps``
    replays, each between its own events: the kernels' time without host
    overhead;
(c) eager: triton.testing.do_bench median (L2 flushed between calls), as
    scripts/gpu_check.py measures;
(d) host: the CPU time to issue one call (forward; forward + backward) at
    the NSA size without waiting for the GPU, through the backend's callable
    and through kvcompress.functional (argument validation included), and
    the wall time per call on tiny inputs, where the host is the bottleneck;
(e) rates against the targets at T = 131072 (H100: linear forward <= 0.10
    ms and forward + backward <= 0.30 ms; pools >= 2.3 TB/s forward, >= 2.0
    TB/s forward + backward; mlp >= 630 / 520 TFLOP/s (forward + backward
    counted as 3x the forward's FLOP); attention_pool has no rate target),
    bytes counted as scripts/gpu_check.py does: forward x + y; backward dy +
    dx, plus x again for weighted_pool and linear), for the graph time and
    the eager time, with the copy and matmul ceilings measured in the same
    process;
(f) correctness first: scripts/gpu_check.py's check of the NSA case
    (forward and every gradient against the exact values within the
    harness's tolerance model), so a fast wrong kernel cannot win.

The summary table is printed last (with ``--compare``, one line per saved
run and the speed-up of each over the first); ``--out`` writes everything
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool")
DEFAULT_KINDS = ("mean_pool", "weighted_pool", "linear")     # the kinds with bandwidth / latency targets
GEMM_KINDS = ("linear", "mlp")                                # rates in TFLOP/s, the others in TB/s
LAYOUTS = ("bhtd", "bthd")
TARGETS = {"linear": {"fwd_ms": 0.10, "fwdbwd_ms": 0.30},
           "mlp": {"fwd_tflops": 630, "fwdbwd_tflops": 520},
           "mean_pool": {"fwd_tbs": 2.3, "fwdbwd_tbs": 2.0},
           "weighted_pool": {"fwd_tbs": 2.3, "fwdbwd_tbs": 2.0}}
DEVICE = "cuda"        # "cpu" with --dry-run-cpu


def log(*a):
    print(*a, flush=True)


def sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the case


def nsa_size(dry: bool, T: int) -> dict:
    if dry:   # the interpreter costs ~0.1 s per kernel call: tiny, same structure
        return dict(B=1, H=2, T=48, D=16, L=8, S=4)
    return dict(B=1, H=4, T=T, D=128, L=32, S=16)


def make(kind, **kw):
    """benchmarks/inputs.py's nsa_arguments on this run's device (F = L*D for
    mlp, the seed's GroupedMLP): x (B, H, T, D) in the layout, the kind's
    parameters (G = H), pe or None; leaves requiring grad when ``grad``."""
    from benchmarks.inputs import nsa_arguments
    return nsa_arguments(kind, device=DEVICE, **kw)


def callable_of(kind, api, *, L, S, padding):
    """f(x, *params, pe) through the backend's registered callable ("backend",
    as scripts/gpu_check.py times it) or kvcompress.functional ("functional",
    with argument validation)."""
    if api == "backend":
        from kvcompress import backends as kb
        fn = kb.get(kind, "triton").fn
        return lambda x, params, pe: fn(x, *params, block_size=L, stride=S, padding=padding, pe=pe)
    import kvcompress.functional as kf
    fn = getattr(kf, kind)
    return lambda x, params, pe: fn(x, *params, block_size=L, stride=S, padding=padding, pe=pe, backend="triton")


def traffic(kind, *, B, H, T, D, L, S, padding):
    """(forward bytes, forward + backward bytes, forward FLOP) as scripts/gpu_check.py counts them."""
    W = T // S if padding == "left" else (T - L) // S + 1
    x_bytes, y_bytes = B * H * T * D * 2, B * H * W * D * 2
    fwd = x_bytes + y_bytes
    bwd = y_bytes + x_bytes + (x_bytes if kind != "mean_pool" else 0)
    if kind == "mlp":     # L*D -> F = L*D -> D (until GPU run 22 this counted 2 L D^2, 16.5x too few at NSA)
        F = L * D
        flop = 2 * B * H * W * (L * D * F + F * D)
    else:
        flop = 2 * B * H * W * L * D * D
    return fwd, fwd + bwd, flop


# --------------------------------------------------------------------------- (a) profile


def profile(step, iters):
    """Run ``step`` ``iters`` times under torch.profiler: per kernel name,
    launches per call, mean microseconds, share of GPU time; GPU busy time
    per call. In the CPU dry run the top-level CPU ops stand in for kernels."""
    import torch
    from torch.profiler import ProfilerActivity
    step()
    sync()
    acts = [ProfilerActivity.CUDA] if DEVICE == "cuda" else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        sync()
    agg = {}
    for e in prof.events():
        if DEVICE == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
        elif e.cpu_parent is not None:
            continue
        us = e.time_range.end - e.time_range.start
        n, tot = agg.get(e.name, (0, 0.0))
        agg[e.name] = (n + 1, tot + us)
    total = sum(t for _, t in agg.values()) or 1.0
    rows = [{"name": name, "per_call": n / iters, "mean_us": t / n, "us_per_call": t / iters, "share": t / total}
            for name, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
    return {"kernels": rows, "gpu_us_per_call": total / iters if agg else 0.0,
            "launches_per_call": sum(r["per_call"] for r in rows)}


# --------------------------------------------------------------------------- (b) CUDA graph


def graph_time(body, reset, reps):
    """Median milliseconds of one replay of ``body`` captured in a CUDA graph
    (``reset()`` runs before each warm-up call and before the capture: it
    sets grads to None, so the captured backward writes fresh grad buffers
    that each replay overwrites). The CPU dry run times ``body`` itself."""
    import torch
    if DEVICE != "cuda":
        times = []
        for _ in range(max(reps, 1)):
            reset()
            t0 = time.perf_counter()
            body()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    reset()
    body()                                       # autotuning and compilation, outside any capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                   # warm-up on a side stream before capture (PyTorch's docs)
        for _ in range(3):
            reset()
            body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(starts, ends):
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))
    del graph
    return ms


# --------------------------------------------------------------------------- (c) eager


def eager_time(fn, grad_to_none=None, quick=False):
    """Median milliseconds by triton.testing.do_bench (L2 flushed between
    calls); a plain timer in the CPU dry run."""
    import triton
    if DEVICE != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                   grad_to_none=grad_to_none, return_mode="median")


# --------------------------------------------------------------------------- (d) host


def issue_time(step, n):
    """Microseconds of CPU time to issue one ``step`` (no waiting: n calls back
    to back, well below the launch queue's depth), and the wall time per call
    once the GPU has finished them."""
    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    issue = (time.perf_counter() - t0) / n
    sync()
    wall = (time.perf_counter() - t0) / n
    return issue * 1e6, wall * 1e6


def host_overhead(kind, n):
    """Wall microseconds per call on tiny inputs (the host is the bottleneck),
    forward and forward + backward, through the backend and kvcompress.functional."""
    import torch
    out = {}
    for api in ("backend", "functional"):
        f = callable_of(kind, api, L=4, S=2, padding="left")
        x, params, pe = make(kind, B=1, H=1, T=64, D=16, L=4, S=2, dtype=torch.bfloat16, layout="bhtd", pe=True,
                             bias=True, grad=False)
        xs, ps, pes = make(kind, B=1, H=1, T=64, D=16, L=4, S=2, dtype=torch.bfloat16, layout="bhtd", pe=True,
                           bias=True, grad=True)
        g = torch.ones_like(f(x, params, pe))

        def fb(f=f, xs=xs, ps=ps, pes=pes, g=g):
            f(xs, ps, pes).backward(g)
        def fwd(f=f, x=x, params=params, pe=pe):
            return f(x, params, pe)
        for name, step in (("fwd", fwd), ("fwdbwd", fb)):
            _, wall = issue_time(step, n)
            out[f"tiny_{name}_{api}_us"] = wall
    return out


# --------------------------------------------------------------------------- one kind, one layout


def measure(kind, layout, a, size):
    import torch
    L, S, padding = size["L"], size["S"], "left"
    quick = a.quick or DEVICE != "cuda"
    res = {"kind": kind, "layout": layout, **size, "padding": padding, "pe": not a.no_pe,
           "bias": kind == "linear" and not a.no_bias}
    f = callable_of(kind, "backend", L=L, S=S, padding=padding)
    ff = callable_of(kind, "functional", L=L, S=S, padding=padding)
    x, params, pe = make(kind, **size, dtype=torch.bfloat16, layout=layout, pe=not a.no_pe,
                         bias=not a.no_bias, grad=False)
    xg, pg, peg = make(kind, **size, dtype=torch.bfloat16, layout=layout, pe=not a.no_pe,
                       bias=not a.no_bias, grad=True)
    leaves = [t for t in [xg, *pg, peg] if t is not None]
    dy = torch.randn_like(f(x, params, pe))
    sync()

    def fwd():
        return f(x, params, pe)

    def fwdbwd():
        f(xg, pg, peg).backward(dy)

    def reset():
        for t in leaves:
            t.grad = None

    def fwdbwd_fresh():       # grads set to None first: every call allocates them, as a training step does
        reset()
        fwdbwd()
    t0 = time.perf_counter()
    fwd()
    fwdbwd_fresh()
    sync()
    res["first_call_s"] = round(time.perf_counter() - t0, 2)          # autotuning and compilation
    iters = 2 if DEVICE != "cuda" else a.profile_iters
    res["profile_fwd"] = profile(fwd, iters)
    res["profile_fwdbwd"] = profile(fwdbwd_fresh, iters)
    reps = 2 if DEVICE != "cuda" else a.graph_reps
    res["graph_fwd_ms"] = graph_time(fwd, lambda: None, reps)
    res["graph_fwdbwd_ms"] = graph_time(fwdbwd, reset, reps)
    res["eager_fwd_ms"] = eager_time(fwd, quick=quick)
    res["eager_fwdbwd_ms"] = eager_time(fwdbwd, grad_to_none=leaves, quick=quick)
    n = 3 if DEVICE != "cuda" else 20
    res["issue_fwd_us"], res["wall_fwd_us"] = issue_time(fwd, n)
    res["issue_fwdbwd_us"], res["wall_fwdbwd_us"] = issue_time(fwdbwd_fresh, n)
    res["issue_fwd_functional_us"], _ = issue_time(lambda: ff(x, params, pe), n)
    res["issue_fwdbwd_functional_us"], _ = issue_time(lambda: (reset(), ff(xg, pg, peg).backward(dy)), n)
    fb, fbb, flop = traffic(kind, **size, padding=padding)
    for how in ("graph", "eager"):
        t_f, t_fb = res[f"{how}_fwd_ms"], res[f"{how}_fwdbwd_ms"]
        res[f"{how}_fwd_tbs"] = fb / (t_f * 1e-3) / 1e12
        res[f"{how}_fwdbwd_tbs"] = fbb / (t_fb * 1e-3) / 1e12
        if kind in GEMM_KINDS:
            res[f"{how}_fwd_tflops"] = flop / (t_f * 1e-3) / 1e12
            res[f"{how}_fwdbwd_tflops"] = 3 * flop / (t_fb * 1e-3) / 1e12
        if DEVICE == "cuda" and not a.quick and kind in TARGETS and a.T == 131072:   # the targets' size
            tg = TARGETS[kind]
            vals = {"fwd_ms": t_f, "fwdbwd_ms": t_fb, "fwd_tbs": res[f"{how}_fwd_tbs"],
                    "fwdbwd_tbs": res[f"{how}_fwdbwd_tbs"], "fwd_tflops": res.get(f"{how}_fwd_tflops"),
                    "fwdbwd_tflops": res.get(f"{how}_fwdbwd_tflops")}
            res[f"{how}_meets_targets"] = all(vals[k] <= v if k.endswith("_ms") else vals[k] >= v
                                              for k, v in tg.items())
    return res


def ceilings(quick):
    """Copy (TB/s, read + write bytes) and bf16 matmul (TFLOP/s), measured here
    (scripts/gpu_check.py's ceilings: benchmarks/timing.py's measure_ceilings)."""
    import gpu_check  # scripts/ is on sys.path
    gpu_check.DEVICE = DEVICE
    return gpu_check.ceilings(quick)


def correctness(kind):
    """scripts/gpu_check.py's check of its NSA case (tiny in the dry run):
    forward and every gradient against the exact values within the
    harness's tolerance model. {"ok": bool, "ratios": {...}} or {"error": ...} if the check
    cannot be imported or run."""
    try:
        import gpu_check
        gpu_check.DEVICE = DEVICE
        case = gpu_check.correctness_cases("dry" if DEVICE != "cuda" else "full")["nsa"]
        r = gpu_check.check(kind, case)
        return {"ok": bool(r["ok"]), "ratios": r["ratios"]}
    except Exception as e:     # report, do not hide the timings
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def autotuned():
    """The configuration every autotuned Launcher picked, per key."""
    from kvcompress.ops._triton import launch as tc
    from kvcompress.ops.attention_pool import triton_impl as ap
    from kvcompress.ops.linear import triton_impl as li
    from kvcompress.ops.mean_pool import triton_impl as mp
    from kvcompress.ops.mlp import triton_impl as ml
    from kvcompress.ops.weighted_pool import triton_impl as wp
    out = {}
    for mod in (mp, wp, li, ml, ap):
        for name, obj in vars(mod).items():
            if isinstance(obj, tc.Launcher) and obj.tuned is not None and obj.tuned.cache:
                out[f"{mod.__name__.split('.')[-2]}.{name}"] = {str(k): str(v) for k, v in obj.tuned.cache.items()}
    return out


def worker(a):
    """Measure this tree's kernels; write JSON to a.out (rewritten after each row)."""
    import torch
    import triton

    label = a.label
    res = {"label": label, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "triton": triton.__version__, "rows": [], "correctness": {}, "host": {}}
    log(f"[{label}] {res['device']}, torch {res['torch']}, triton {res['triton']}")
    t_start = time.perf_counter()
    res["ceilings"] = ceilings(a.quick)
    log(f"[{label}] ceilings: copy {res['ceilings']['copy_tbs']:.2f} TB/s, "
        f"bf16 matmul {res['ceilings']['matmul_bf16_tflops']:.0f} TFLOP/s")
    size = nsa_size(DEVICE != "cuda", a.T if not a.quick else 16384)

    def save():
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(res, fh, indent=1, default=str)
    for kind in a.kinds:
        if not a.skip_check:
            t0 = time.perf_counter()
            res["correctness"][kind] = c = correctness(kind)
            log(f"[{label}] correctness {kind}: {'PASS' if c.get('ok') else 'FAIL'} "
                f"{c.get('ratios', c.get('error'))} ({time.perf_counter() - t0:.1f} s)")
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        for layout in a.layouts:
            try:
                r = measure(kind, layout, a, size)
            except Exception as e:     # one failure must not hide the other rows
                import traceback
                traceback.print_exc()
                r = {"kind": kind, "layout": layout, "error": f"{type(e).__name__}: {e}"}
            res["rows"].append(r)
            if DEVICE == "cuda":      # the case's tensors are gone with measure(): give their memory back
                torch.cuda.empty_cache()
            if "error" not in r:
                log(f"[{label}] {kind:13s} {layout}: graph fwd {r['graph_fwd_ms']:.4f} ms, fwd+bwd "
                    f"{r['graph_fwdbwd_ms']:.4f} ms; eager fwd {r['eager_fwd_ms']:.4f} ms, fwd+bwd "
                    f"{r['eager_fwdbwd_ms']:.4f} ms; issue {r['issue_fwd_us']:.0f} / {r['issue_fwdbwd_us']:.0f} us")
                for mode in ("fwd", "fwdbwd"):
                    p = r[f"profile_{mode}"]
                    log(f"    {mode}: {p['launches_per_call']:.0f} launches, GPU {p['gpu_us_per_call']:.1f} us/call")
                    for k in p["kernels"]:
                        log(f"      {k['per_call']:4.1f} x {k['mean_us']:9.2f} us  {100 * k['share']:5.1f}%  "
                            f"{k['name'][:90]}")
            save()
        res["host"][kind] = host_overhead(kind, 5 if DEVICE != "cuda" else 500)
        save()
    res["autotuned"] = autotuned()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    return res


# --------------------------------------------------------------------------- summary


def summary(results, kinds, layouts):
    """The comparison table: one line per kind, layout and version; ratios to
    the first version; targets met or missed."""
    log("\n" + "=" * 118)
    log("SUMMARY (bf16, NSA size; graph = CUDA-graph replay (kernels only), eager = do_bench median; "
        "linear and mlp TFLOP/s, the others TB/s)")
    log("targets: linear fwd <= 0.10 ms, fwd+bwd <= 0.30 ms; pools fwd >= 2.3 TB/s, fwd+bwd >= 2.0 TB/s")
    for res in results:     # JSON of GPU run 5 and before names the run "variant"
        res.setdefault("label", res.get("variant", "?"))
    for res in results:
        c = res.get("ceilings", {})
        ok = {k: v.get("ok") for k, v in res.get("correctness", {}).items()}
        log(f"[{res['label']}] {res.get('device')}: copy {c.get('copy_tbs', 0):.2f} TB/s, matmul "
            f"{c.get('matmul_bf16_tflops', 0):.0f} TFLOP/s; correctness "
            + (", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in ok.items()) or "not run"))
    log(f"{'kind':14s}{'layout':7s}{'run':4s}| {'fwd graph':>10s} {'eager':>8s} {'rate':>7s} {'launch':>6s} "
        f"{'issue':>6s} | {'f+b graph':>10s} {'eager':>8s} {'rate':>7s} {'launch':>6s} {'issue':>6s} | target")
    by = {(r["kind"], r["layout"], res["label"]): r for res in results for r in res.get("rows", [])}
    variants = [res["label"] for res in results]
    for kind in kinds:
        for layout in layouts:
            base = None
            for v in variants:
                r = by.get((kind, layout, v))
                if r is None:
                    continue
                if "error" in r:
                    log(f"{kind:14s}{layout:7s}{v:4s}| ERROR {r['error'][:90]}")
                    continue
                unit = "tflops" if kind in GEMM_KINDS else "tbs"
                tgt = {True: "MET", False: "missed"}
                line = (f"{kind:14s}{layout:7s}{v:4s}| {r['graph_fwd_ms']:8.4f}ms {r['eager_fwd_ms']:8.4f} "
                        f"{r[f'graph_fwd_{unit}']:7.2f} {r['profile_fwd']['launches_per_call']:6.0f} "
                        f"{r['issue_fwd_us']:6.0f} | {r['graph_fwdbwd_ms']:8.4f}ms {r['eager_fwdbwd_ms']:8.4f} "
                        f"{r[f'graph_fwdbwd_{unit}']:7.2f} {r['profile_fwdbwd']['launches_per_call']:6.0f} "
                        f"{r['issue_fwdbwd_us']:6.0f} | graph {tgt.get(r.get('graph_meets_targets'), '-')}, "
                        f"eager {tgt.get(r.get('eager_meets_targets'), '-')}")
                log(line)
                if base is None:
                    base = r
                else:
                    log(f"{'':25s}| {base['graph_fwd_ms'] / r['graph_fwd_ms']:8.2f}x  "
                        f"{base['eager_fwd_ms'] / r['eager_fwd_ms']:7.2f}x {'':22s}| "
                        f"{base['graph_fwdbwd_ms'] / r['graph_fwdbwd_ms']:8.2f}x  "
                        f"{base['eager_fwdbwd_ms'] / r['eager_fwdbwd_ms']:7.2f}x   (speed-up of {v} over "
                        f"{variants[0]})")
    for res in results:
        for kind, h in res.get("host", {}).items():
            log(f"[{res['label']}] host, tiny inputs, wall us per call {kind:13s}: fwd {h['tiny_fwd_backend_us']:.0f}"
                f" (functional {h['tiny_fwd_functional_us']:.0f}), fwd+bwd {h['tiny_fwdbwd_backend_us']:.0f} "
                f"(functional {h['tiny_fwdbwd_functional_us']:.0f})")
    log("columns: rate = graph-time TFLOP/s (linear, mlp) or TB/s (the others); launch = kernels per call (profiler); "
        "issue = CPU us to issue one call at this size")
    log("=" * 118)


# --------------------------------------------------------------------------- compile only


def compile_only(dtypes, kinds=DEFAULT_KINDS):
    """Compile every configuration the autotuner may try for this script's
    kinds at the NSA size for sm_90 (scripts/gpu_check.py --compile-only
    for ``kinds``). Returns the rows."""
    import gpu_check  # scripts/ is on sys.path
    return gpu_check.compile_only(dtypes, kinds=kinds)


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help="comma list of " + ", ".join(KINDS) + " (default: the first three, which have targets)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of " + ", ".join(LAYOUTS))
    ap.add_argument("--label", default="this", help="this run's name in the summary and JSON (default 'this')")
    ap.add_argument("--compare", default=None,
                    help="comma list of JSON files of earlier runs (--out): print their summary side by side, "
                         "no GPU needed")
    ap.add_argument("--T", type=int, default=131072, help="tokens (default 131072, the NSA case)")
    ap.add_argument("--no-pe", action="store_true", help="without pe (the targets are stated with pe)")
    ap.add_argument("--no-bias", action="store_true", help="linear without bias")
    ap.add_argument("--profile-iters", type=int, default=20)
    ap.add_argument("--graph-reps", type=int, default=200)
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness check (f)")
    ap.add_argument("--quick", action="store_true", help="smoke run: T=16384, fewer repetitions")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: compile every config for sm_90")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="with --compile-only: bf16, fp16, fp32")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no GPU: every step on CPU in Triton's interpreter at tiny sizes (checks the script)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    a.layouts = [k.strip() for k in a.layouts.split(",") if k.strip()]
    for name, got, allowed in (("--kinds", a.kinds, KINDS), ("--layouts", a.layouts, LAYOUTS)):
        if not got or any(g not in allowed for g in got):
            ap.error(f"{name}: expected a comma list of {allowed}, got {got}")
    if a.compare:
        results = []
        for path in (p.strip() for p in a.compare.split(",") if p.strip()):
            with open(path) as fh:
                results.append(json.load(fh))
        summary(results, a.kinds, a.layouts)
        return 0
    if a.compile_only:
        rows = compile_only([d.strip() for d in a.dtypes.split(",") if d.strip()], a.kinds)
        if a.out:
            with open(a.out, "w") as fh:
                json.dump({"compile": rows}, fh, indent=1)
        return 0 if all("error" not in r and r["stack"] == 0 and r["shared"] <= 232448 for r in rows) else 1
    global DEVICE
    if a.dry_run_cpu:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"   # before kvcompress's Triton modules read it
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch
    if DEVICE == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --compile-only or --dry-run-cpu, or on a GPU machine")
    res = worker(a)
    summary([res], a.kinds, a.layouts)
    ok = all(c.get("ok") for c in res["correctness"].values()) and all("error" not in r for r in res["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
