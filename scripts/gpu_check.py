#!/usr/bin/env python
"""GPU check of the Triton backend: mean_pool, weighted_pool, linear, mlp,
attention_pool.

Run from the repository root on a CUDA machine (needs only torch, triton,
numpy; the seed package is optional):

    python scripts/gpu_check.py --out gpu_check.json            # the full run (several minutes on an H100)
    python scripts/gpu_check.py --quick --out quick.json        # smoke run: small sizes, few repetitions
    python scripts/gpu_check.py --kinds mlp --cases nsa         # a subset
    python scripts/gpu_check.py --compile-only                  # no GPU: compile every kernel config for sm_90
    python scripts/gpu_check.py --dry-run-cpu                   # no GPU: every step on CPU, interpreter, tiny

What it measures, per kind:

(a) correctness of the triton backend, forward and every gradient,
    bfloat16, at NSA sizes (B=1, H=4, D=128, L=32, S=16, T=131072, left
    padding, pe and bias on, x a (B, T, H, D) tensor seen through transpose;
    mlp with F = L*D as the seed's GroupedMLP, relu), at B=4, T=8192, D=192,
    at D=64 (mlp with gelu; attention_pool's one-pass backward), and packed
    with cu_seqlens (empty and short sequences): against the exact float64
    values within the tolerance model of kvcompress/testing (tolerance.py,
    gradients.py), the harness's own functions run on the GPU's tensors
    (``harness_model``; the torch backend's ratios are printed beside, as a
    check of the bound).
(b) timing (triton.testing.do_bench, median) of forward and forward +
    backward, triton vs the torch backend; for linear, mlp and
    attention_pool also torch.compile of the torch path and the seed's
    pipeline (ZeroPad + Unfold, then einops / its GroupedMLP / its
    AttentionPool; skipped if native_sparse_attention_pytorch is absent) and
    its torch.compile; peak memory allocated beyond the inputs, forward and
    forward + backward.
(c) ceilings measured in the same run (benchmarks/timing.py's
    measure_ceilings): a device-to-device copy (TB/s, read + write bytes)
    and a bfloat16 matmul (TFLOP/s); per timed case the
    effective TB/s (pools), TFLOP/s (linear, mlp: model flops, forward + backward
    counted as 3 forwards) or time over the floor (attention_pool: minimal
    bytes at the copy bandwidth), checked against the issue's targets.
(d) host overhead: wall time per call on tiny inputs, and the CPU time of
    issuing a call without waiting for the GPU.

The summary table is printed last; --out writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool")
# --compile-only also compiles gated_pool (its correctness and timing are the property suite's and kvcompress-bench's)
COMPILE_KINDS = (*KINDS, "gated_pool")
# issue targets: H100 80GB, bf16, B=1, H=4, D=128, L=32, S=16, T=131072
TARGETS = {"linear": {"fwd_ms": 0.10, "fwdbwd_ms": 0.30},
           # mlp: model TFLOP/s, speedup over torch.compile (of the seed's pipeline when installed, else of the
           # torch path), and peak extra memory at most this fraction of torch.compile's
           "mlp": {"fwd_tflops": 630, "fwdbwd_tflops": 520, "fwd_vs_compile": 1.05, "fwdbwd_vs_compile": 1.4,
                   "fwd_mem_vs_compile": 0.5, "fwdbwd_mem_vs_compile": 0.5},
           # attention_pool: time over the floor (minimal bytes at the measured copy bandwidth)
           "attention_pool": {"fwd_over_floor": 2.0, "fwdbwd_over_floor": 2.0},
           "mean_pool": {"fwd_tbs": 2.3, "fwdbwd_tbs": 2.0},
           "weighted_pool": {"fwd_tbs": 2.3, "fwdbwd_tbs": 2.0}}


DEVICE = "cuda"        # "cpu" with --dry-run-cpu (Triton's interpreter, tiny sizes: checks this script)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- inputs


def make(kind, **kw):
    """benchmarks/inputs.py's nsa_arguments on this run's device: x (B, H, T,
    D) in the layout, the kind's parameters (G = H), pe or None."""
    from benchmarks.inputs import nsa_arguments
    return nsa_arguments(kind, device=DEVICE, **kw)


PARAM_NAMES = {"mean_pool": [], "weighted_pool": ["weight"], "linear": ["weight", "bias"],
               "mlp": ["w1", "b1", "w2", "b2"], "attention_pool": ["weight"]}


def call(kind, backend, x, params, pe, *, L, S, padding, cu=None, activation="relu", **extra):
    """One call of ``kind`` through the triton backend's callable (extra: e.g.
    total_windows) or kvcompress.functional with ``backend``; activation for mlp."""
    import kvcompress.functional as kf
    if kind == "mlp":
        extra["activation"] = activation
    if backend == "triton":
        from kvcompress import backends as kb
        fn = kb.get(kind, "triton").fn
        return fn(x, *params, block_size=L, stride=S, padding=padding, pe=pe, cu_seqlens=cu, **extra)
    return getattr(kf, kind)(x, *params, block_size=L, stride=S, padding=padding, pe=pe, cu_seqlens=cu,
                             backend=backend, **extra)


# --------------------------------------------------------------------------- (a) correctness


def harness_model(kind, x, params, pe, dy, *, L, S, padding, seqlens=None, activation="relu", precision="strict"):
    """The exact float64 output and gradients of sum(y * dy) and the bound the
    tolerance model grants each element: ({"y" | "x" | "pe" | param name:
    (exact, bound)}, well_conditioned). No model of its own: the harness's
    (kvcompress.testing.gradients.model) runs on the tensors where they are
    (float64 on the GPU at NSA sizes), given a Case that describes them.

    x (B, H, T, D), params (in signature order), pe and dy in the dtype under
    test, on any device; seqlens: the packed sequences' lengths (B = 1);
    precision: the class (SPEC 3c) the implementation is held to."""
    import torch

    from kvcompress.testing import gradients
    from kvcompress.testing._xp import float64_inputs
    from kvcompress.testing.cases import Case
    from kvcompress.testing.records import RECORDS
    B, H, T, D = x.shape
    named = dict(zip(PARAM_NAMES[kind], params))
    d_out = {"linear": lambda: named["weight"].shape[-1], "mlp": lambda: named["w2"].shape[-1]}.get(kind, lambda: D)()
    case = Case(kind=kind, dtype=str(x.dtype).replace("torch.", ""), B=B, H=H, G=params[0].shape[0] if params else 1,
                T=T, D=D, block_size=L, stride=S, padding=padding, seqlens=None if seqlens is None else tuple(seqlens),
                use_pe=pe is not None, D_out=d_out, F=named["w1"].shape[-1] if kind == "mlp" else 1,
                activation=activation)
    assert [p.name for p in RECORDS[kind].params] == PARAM_NAMES[kind]
    with torch.no_grad():
        return gradients.model(case, float64_inputs(x, named, pe), dy.double(), precision)


def check(kind, case):
    import torch
    dtype = torch.bfloat16
    c = dict(case)
    name, seqlens, padding = c.pop("name"), c.pop("seqlens", None), c.pop("padding")
    use_pe, use_bias, activation = c.pop("pe", False), c.pop("bias", False), c.pop("activation", "relu")
    L, S = c["L"], c["S"]
    if seqlens:
        c["T"] = sum(seqlens)
    x, params, pe = make(kind, dtype=dtype, pe=use_pe, bias=use_bias, **c)
    cu = None
    if seqlens:
        cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()), device=DEVICE, dtype=torch.int32)
    named = {"x": x, "pe": pe}
    pnames = PARAM_NAMES[kind]
    named.update({n: p for n, p in zip(pnames, params)})
    t0 = time.perf_counter()

    def run(backend, values, dy):
        # clone keeps the strides of a dense tensor: x stays a (B, T, H, D) tensor seen as (B, H, T, D)
        leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in values.items()}
        y = call(kind, backend, leaves["x"], [leaves[n] for n in pnames], leaves["pe"], L=L, S=S, padding=padding,
                 cu=cu, activation=activation)
        if dy is None:
            dy = torch.randn(y.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(5)).to(
                y.dtype)
        y.backward(dy)
        return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}, dy

    y_tr, g_tr, dy = run("triton", named, None)
    sync()
    t_triton = time.perf_counter() - t0
    y_to, g_to, _ = run("torch", named, dy)
    B, H, W = y_tr.shape[:3]
    out = {"kind": kind, "case": name, "dtype": "bfloat16", "T": c["T"], "B": B, "W": W, "ok": True, "ratios": {},
           "triton_first_call_s": round(t_triton, 2)}

    def judge(got, exact, bound):
        err = (got.double() - exact).abs()
        finite = bool(torch.isfinite(got).all())
        ratio = float((err / bound).max()) if err.numel() else 0.0
        return ratio if finite else float("inf")

    # the exact values and the harness's tolerance model, on the device: each backend held to its class
    from kvcompress import backends as kb
    classes = {b: kb.get(kind, b).precision for b in ("triton", "torch")}
    models, conditioned = {}, {}
    for precision in set(classes.values()):
        models[precision], conditioned[precision] = harness_model(
            kind, x, params, pe, dy, L=L, S=S, padding=padding, seqlens=seqlens, activation=activation,
            precision=precision)
    # as the benchmark gate (benchmarks/checks.py, Checker.gate_class): where a class's model is
    # ill-conditioned (attention_pool's io-intermediates bound with pe at D >= 64, H200 run 63), the
    # backend is held to the RMS check instead (PEER_RMS_ULPS units of bfloat16 of the exact values' RMS)
    from benchmarks.checks import rms_ratio

    def rms_judge(got, exact, _bound):
        return rms_ratio(got.double(), exact, "bfloat16")

    judges = {b: judge if conditioned[classes[b]] else rms_judge for b in classes}
    out["well_conditioned"] = all(conditioned.values())
    out["checked_by"] = {b: classes[b] if conditioned[classes[b]] else "rms" for b in classes}
    out["precision"] = classes
    out["torch_ratios"] = {}
    for key, got, ref in [("y", y_tr, y_to)] + [(k, g_tr[k], g_to[k]) for k in g_tr]:
        out["ratios"][key] = judges["triton"](got, *models[classes["triton"]][key])
        out["torch_ratios"][key] = judges["torch"](ref, *models[classes["torch"]][key])
        out["ok"] &= out["ratios"][key] <= 1.0
    del models
    return out


def correctness_cases(mode):
    """mode: "full", "quick" or "dry" (CPU interpreter: tiny shapes, same structure)."""
    if mode == "dry":
        return {
            "nsa": dict(name="nsa", B=1, H=2, T=96, D=16, L=8, S=4, padding="left", pe=True, bias=True,
                        layout="bthd"),
            "b4d192": dict(name="b4d192", B=2, H=2, T=40, D=24, L=8, S=4, padding="valid"),
            "d64": dict(name="d64", B=2, H=2, T=48, D=8, L=4, S=2, padding="left", pe=True, bias=True,
                        activation="gelu"),
            "packed": dict(name="packed", B=1, H=2, T=0, D=16, L=8, S=4, padding="left", pe=True, layout="bthd",
                           seqlens=[3, 0, 50, 7, 0, 30]),
        }
    T = 16384 if mode == "quick" else 131072
    nsa = dict(B=1, H=4, T=T, D=128, L=32, S=16)
    seqlens = ([3, 0, 5000, 31, 0, 16] + [T - 5050]) if mode == "quick" else \
        ([3, 0, 40000, 31, 0, 17, 9000] + [T - 49051])
    return {
        "nsa": dict(name="nsa", **nsa, padding="left", pe=True, bias=True, layout="bthd"),
        "b4d192": dict(name="b4d192", B=4, H=4, T=2048 if mode == "quick" else 8192, D=192, L=32, S=16,
                       padding="valid"),
        "d64": dict(name="d64", B=2, H=4, T=4096 if mode == "quick" else 16384, D=64, L=32, S=16, padding="left",
                    pe=True, bias=True, activation="gelu"),
        "packed": dict(name="packed", B=1, H=4, T=0, D=128, L=32, S=16, padding="left", pe=True, layout="bthd",
                       seqlens=seqlens),
    }


# --------------------------------------------------------------------------- (b, c) timing and ceilings


def sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench(fn, quick, grad_to_none=None):
    """Median milliseconds: triton.testing.do_bench on a GPU (warmup, L2 flush
    between runs); a plain timer in the CPU dry run."""
    import triton
    if DEVICE != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                   grad_to_none=grad_to_none, return_mode="median")


def ceilings(quick):
    """Copy (TB/s, read + write bytes) and bfloat16 matmul (TFLOP/s) ceilings,
    measured now by benchmarks/timing.py's measure_ceilings with this
    script's timer (also scripts/gpu_perf.py's)."""
    import torch

    from benchmarks.timing import measure_ceilings
    c = measure_ceilings(DEVICE, torch.bfloat16, quick=quick or DEVICE != "cuda",
                         timer=lambda fn: bench(fn, quick) * 1e-3)
    return {"copy_tbs": c["bandwidth_gbps"] / 1e3, "matmul_bf16_tflops": c["matmul_tflops"]}


def seed_linear_fn(L, S, H, D):
    """The seed's compression pipeline for a per-position linear map: its
    split_compress_window (Rearrange, ZeroPad2d, Unfold, Rearrange, as in
    native_sparse_attention_pytorch) then an einsum; None if the seed is absent."""
    try:
        import native_sparse_attention_pytorch  # noqa: F401
        from einops import einsum
        from einops.layers.torch import Rearrange
        from torch import nn
    except ImportError:
        return None
    split = nn.Sequential(
        Rearrange("b h n d -> (b h) d 1 n"),
        nn.ZeroPad2d(((L - S), 0, 0, 0)),
        nn.Unfold(kernel_size=(1, L), stride=(1, S)),
        Rearrange("(b h) (d n) w -> b h w n d", d=D, h=H, n=L))

    def fn(x, w):
        return einsum(split(x), w, "b h w n d, h n d o -> b h w o")
    return fn


def seed_split(L, S, H, D):
    """The seed's split_compress_window (Rearrange, ZeroPad2d, Unfold, Rearrange,
    as in native_sparse_attention_pytorch): (B, H, T, D) -> windows
    (B, H, W, L, D), an unfolded copy."""
    from einops.layers.torch import Rearrange
    from torch import nn
    return nn.Sequential(
        Rearrange("b h n d -> (b h) d 1 n"),
        nn.ZeroPad2d(((L - S), 0, 0, 0)),
        nn.Unfold(kernel_size=(1, L), stride=(1, S)),
        Rearrange("(b h) (d n) w -> b h w n d", d=D, h=H, n=L))


def seed_fn(kind, L, S, H, D):
    """The seed's pipeline for ``kind`` as fn(x, *params): its window split,
    then an einsum (linear), its GroupedMLP (mlp; our w1, b1, w2, b2 as its
    parameters through functional_call) or its AttentionPool (its one
    (D, D) logit projection for every head: our weight[0], transposed for its
    nn.Linear); None if the seed package is absent."""
    try:
        import native_sparse_attention_pytorch.compress_networks as cn
        from einops import einsum
        from torch.func import functional_call
    except ImportError:
        return None
    split = seed_split(L, S, H, D)
    if kind == "linear":
        def fn(x, w, b=None):   # make() gives linear (weight, bias or None)
            y = einsum(split(x), w, "b h w n d, h n d o -> b h w o")
            return y if b is None else y + b[:, None, :]
    elif kind == "mlp":
        module = cn.GroupedMLP(D, L, H).to(DEVICE)

        def fn(x, w1, b1, w2, b2):
            return functional_call(module, {"net.0.weight": w1, "net.0.bias": b1[None, :, None],
                                            "net.2.weight": w2, "net.2.bias": b2[None, :, None]}, (split(x),))
    elif kind == "attention_pool":
        module = cn.AttentionPool(D, L).to(DEVICE)

        def fn(x, w):
            return functional_call(module, {"to_attn_logits.weight": w[0].t()}, (split(x),))
    else:
        return None
    return fn


def peak_extra(step):
    """Peak bytes allocated beyond what was allocated before ``step()`` (None on CPU)."""
    import torch
    if DEVICE != "cuda":
        step()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


# timing shapes (--timing-shapes): the issue's NSA case and the other sizes it asks to report
TIMING_SHAPES = {"nsa": dict(B=1, T=131072, D=128), "t8192": dict(B=1, T=8192, D=128),
                 "t65536": dict(B=1, T=65536, D=128), "b4": dict(B=4, T=131072, D=128),
                 "d192": dict(B=1, T=131072, D=192)}


def timing(kind, quick, ceil, shape="nsa"):
    import torch
    H, L, S = 4, 32, 16
    B, T, D = TIMING_SHAPES[shape]["B"], TIMING_SHAPES[shape]["T"], TIMING_SHAPES[shape]["D"]
    if quick:
        T = min(T, 16384)
    if DEVICE != "cuda":
        B, H, D, L, S, T = 1, 2, 16, 8, 4, 128
    padding = "valid" if kind in ("mean_pool", "weighted_pool", "linear") else "left"   # the seed pads left
    rows = []
    for layout in ("bhtd", "bthd"):
        x, params, _ = make(kind, B=B, H=H, T=T, D=D, L=L, S=S, dtype=torch.bfloat16, layout=layout,
                            bias=kind == "mlp")
        W = (T - L) // S + 1 if padding == "valid" else T // S
        F = L * D
        x_bytes, y_bytes = x.numel() * 2, B * H * W * D * 2
        flops = {"linear": 2 * B * H * W * L * D * D, "mlp": 2 * B * H * W * (L * D * F + F * D)}.get(kind)
        fwd_bytes = x_bytes + y_bytes
        # minimal traffic of forward + backward: mean reads dy, writes dx; the others also read x
        bwd_bytes = y_bytes + x_bytes + (x_bytes if kind != "mean_pool" else 0)

        def backend_fn(backend):
            return lambda xx, *pp: call(kind, backend, xx, list(pp), None, L=L, S=S, padding=padding)

        fns = {"triton": backend_fn("triton")}
        if layout == "bhtd":       # the baselines once, on the plain layout
            fns["torch"] = backend_fn("torch")
            if kind in ("linear", "mlp", "attention_pool"):
                seed = seed_fn(kind, L, S, H, D)
                if seed is None:
                    log("  seed package native_sparse_attention_pytorch not installed: seed pipeline skipped")
                else:
                    fns["seed"] = seed
                if DEVICE == "cuda":   # inductor needs a C++ compiler for CPU code: not in the dry run
                    fns["torch.compile"] = torch.compile(backend_fn("torch"))
                    if seed is not None and kind != "linear":
                        fns["seed.compile"] = torch.compile(seed)
        for name, fn in fns.items():
            try:
                f_ms = bench(lambda fn=fn, x=x, ps=params: fn(x, *ps), quick)
                with torch.no_grad():
                    mem_f = peak_extra(lambda fn=fn, x=x, ps=params: fn(x, *ps))
                xg = x.detach().requires_grad_(True)
                pg = [p.detach().requires_grad_(True) if p is not None else None for p in params]
                leaves = [xg, *[p for p in pg if p is not None]]
                dy = torch.randn_like(fn(x, *params))

                def step(fn=fn, xg=xg, pg=pg, dy=dy):
                    fn(xg, *pg).backward(dy)
                fb_ms = bench(step, quick, grad_to_none=leaves)
                for t in leaves:
                    t.grad = None
                mem_fb = peak_extra(step)
                for t in leaves:
                    t.grad = None
            except Exception as e:   # report and go on: one broken baseline must not hide the rest
                log(f"  {kind} {name} {layout}: {type(e).__name__}: {e}")
                rows.append({"kind": kind, "impl": name, "layout": layout, "error": repr(e)})
                continue
            r = {"kind": kind, "impl": name, "layout": layout, "shape": shape, "B": B, "T": T, "D": D,
                 "fwd_ms": f_ms, "fwdbwd_ms": fb_ms,
                 "fwd_mem_mib": None if mem_f is None else mem_f / 2 ** 20,
                 "fwdbwd_mem_mib": None if mem_fb is None else mem_fb / 2 ** 20}
            if flops is not None:     # linear, mlp: model flops (forward + backward = 3 forwards)
                r["fwd_tflops"] = flops / (f_ms * 1e-3) / 1e12
                r["fwdbwd_tflops"] = 3 * flops / (fb_ms * 1e-3) / 1e12
                r["fwd_frac"] = r["fwd_tflops"] / ceil["matmul_bf16_tflops"]
                r["fwdbwd_frac"] = r["fwdbwd_tflops"] / ceil["matmul_bf16_tflops"]
                r["fwd_tbs"] = fwd_bytes / (f_ms * 1e-3) / 1e12
            elif kind == "attention_pool":   # the floor: minimal bytes at the copy bandwidth (docs/triton.md)
                floor_f = fwd_bytes / (ceil["copy_tbs"] * 1e12) * 1e3
                floor_fb = (fwd_bytes + bwd_bytes) / (ceil["copy_tbs"] * 1e12) * 1e3
                r.update(floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb, fwd_over_floor=f_ms / floor_f,
                         fwdbwd_over_floor=fb_ms / floor_fb)
                r["fwd_tbs"] = fwd_bytes / (f_ms * 1e-3) / 1e12
                r["fwdbwd_tbs"] = (fwd_bytes + bwd_bytes) / (fb_ms * 1e-3) / 1e12
                r["fwd_frac"], r["fwdbwd_frac"] = 1 / r["fwd_over_floor"], 1 / r["fwdbwd_over_floor"]
            else:
                r["fwd_tbs"] = fwd_bytes / (f_ms * 1e-3) / 1e12
                r["fwdbwd_tbs"] = (fwd_bytes + bwd_bytes) / (fb_ms * 1e-3) / 1e12
                r["fwd_frac"] = r["fwd_tbs"] / ceil["copy_tbs"]
                r["fwdbwd_frac"] = r["fwdbwd_tbs"] / ceil["copy_tbs"]
            rows.append(r)
            mem = "" if mem_f is None else f", peak extra {mem_f / 2 ** 20:.0f} / {mem_fb / 2 ** 20:.0f} MiB"
            log(f"  {kind:14s} {name:14s} {layout}: fwd {f_ms:.4f} ms, fwd+bwd {fb_ms:.4f} ms{mem}")
    # comparisons with torch.compile (mlp: of the seed's pipeline when installed) and the targets
    base = {r["impl"]: r for r in rows if "error" not in r and r["layout"] == "bhtd"}
    ref = base.get("seed.compile") or base.get("torch.compile")
    for r in rows:
        if r.get("impl") != "triton" or "error" in r:
            continue
        if kind == "mlp" and ref is not None:
            r["compile_ref"] = ref["impl"]
            r["fwd_vs_compile"] = ref["fwd_ms"] / r["fwd_ms"]
            r["fwdbwd_vs_compile"] = ref["fwdbwd_ms"] / r["fwdbwd_ms"]
            if r["fwd_mem_mib"] is not None and ref["fwd_mem_mib"]:
                # lower is better for these two: the target is a ceiling
                r["fwd_mem_vs_compile"] = r["fwd_mem_mib"] / ref["fwd_mem_mib"]
                r["fwdbwd_mem_vs_compile"] = r["fwdbwd_mem_mib"] / ref["fwdbwd_mem_mib"]
        if not quick and DEVICE == "cuda" and kind in TARGETS and shape == "nsa":   # the targets are for NSA
            t = TARGETS[kind]
            lower = ("_ms", "_over_floor", "_mem_vs_compile")
            r["targets"] = {k: (None if r.get(k) is None else (r[k] <= v if k.endswith(lower) else r[k] >= v))
                            for k, v in t.items()}
            r["meets_targets"] = all(r["targets"].values())
    return rows


# --------------------------------------------------------------------------- (d) host overhead


def overhead(kind, quick):
    import torch
    x, params, _ = make(kind, B=1, H=1, T=64, D=16, L=4, S=2, dtype=torch.bfloat16)
    ps = list(params)
    n = 5 if DEVICE != "cuda" else 200 if quick else 1000
    out = {"kind": kind}
    for backend in ("triton", "torch"):
        def f(backend=backend):
            return call(kind, backend, x, ps, None, L=4, S=2, padding="valid")
        for _ in range(10):
            f()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        cpu = (time.perf_counter() - t0) / n
        sync()
        wall = (time.perf_counter() - t0) / n
        out[f"{backend}_issue_us"] = cpu * 1e6
        out[f"{backend}_wall_us"] = wall * 1e6
    return out


def autotuned():
    """The configuration each autotuned kernel picked (per key) in this run."""
    from kvcompress.ops.attention_pool import triton_impl as ap
    from kvcompress.ops.linear import triton_impl as li
    from kvcompress.ops.mean_pool import triton_impl as mp
    from kvcompress.ops.mlp import triton_impl as ml
    from kvcompress.ops.weighted_pool import triton_impl as wp
    out = {}
    for name, launcher in [("mean_pool_fwd", mp._FWD), ("mean_pool_bwd", mp._BWD), ("weighted_pool_fwd", wp._FWD),
                           ("weighted_pool_bwd", wp._BWD), ("linear_fwd", li._FWD), ("linear_dx", li._DX),
                           ("linear_dx_rows", li._DXR), ("linear_dw", li._DW), ("mlp_fwd", ml._FWD), ("mlp_dp", ml._DP),
                           ("mlp_dx", ml._DX),
                           ("mlp_dw1", ml._DW1), ("attention_pool_fwd", ap._FWD), ("attention_pool_bwd", ap._BWD)]:
        tuned = launcher.tuned
        if tuned is not None:
            out[name] = {str(k): str(v) for k, v in tuned.cache.items()}
    return out


# --------------------------------------------------------------------------- compile only


def compile_sm90(name, fn, cfg, ptrs, const, vals):
    """Compile one kernel configuration for sm_90 without a GPU, with the JIT's
    specialisations of a call whose integer arguments are ``vals`` (ints equal
    to 1 become constants, multiples of 16 are marked divisible); ``ptrs``
    names the pointer arguments and their element types, ``const`` the
    constexprs besides the config's. -> {kernel, config, shared, regs, stack,
    seconds} or {kernel, config, error}. Also used by scripts/gpu_perf.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sig, attrs, consts = {}, {}, dict(const, **cfg.kwargs)
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a in ptrs:
            sig[a], attrs[(i,)] = "*" + ptrs[a], [["tt.divisibility", 16]]
        elif vals.get(a, 3) == 1:
            sig[a], consts[a] = "constexpr", 1
        else:
            sig[a] = "i32"
            if vals.get(a, 3) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    r = {"kernel": name, "config": dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)}
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        reg, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
        r.update(shared=k.metadata.shared, regs=int(reg.group(1)) if reg else -1,
                 stack=int(stack.group(1)) if stack else -1, seconds=round(time.perf_counter() - t0, 2))
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return r


def compile_only(dtypes, kinds=COMPILE_KINDS, D=128, first_only=False, varlens=(False, True)):
    """Compile every configuration of every kernel for sm_90 (no GPU needed),
    with the JIT's specialisations of an NSA-sized call (ints equal to 1 are
    constants, multiples of 16 are marked divisible); report shared memory,
    registers and spill stack per config (cuobjdump). first_only: one
    configuration per kernel and variant (tests/test_compile_sm90.py: that
    every kernel compiles); varlens: fixed-length and/or packed."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from kvcompress.ops import _triton_pool as tp
    from kvcompress.ops.linear import triton_impl as li
    T, H, L, S = 131072, 4, 32, 16
    W = (T - L) // S + 1
    ints = dict(N=1, N_STEPS=0, T=T, W=W, NQ=T // S, L=L, S=S, PRE=0, sxb=T * H * D, sxh=D, sxt=H * D, sxd=1,
                syb=H * W * D, syh=W * D, syw=D, syd=1, H=H, HG=1, D=D, C=2, DO=D, HG_C=1, scg=D, scn=1, sbg=D, sbn=1,
                P=66, NSLOT=-(-(T // S) // li.SLOT_ROWS),
                sdb=H * W * D, sdh=W * D, sdw=D, sdd=1, sdn=1, sgb=T * H * D, sgh=D, sgt=H * D, sgd=1, WORK=15, B=1,
                sph=L * D, spj=D, spd=1, sos=H * L * D * D, sog=L * D * D, soj=D * D, sod=D, son=1,
                ROWS_PER_SPLIT=W)
    pool_w = dict(swg=L, swl=1)
    lin_w = dict(swg=L * D * D, swl=D * D, swd=D, swn=1)
    rows, done = [], set()

    def one(name, fn, cfg, ptrs, const, extra):
        if first_only and name in done:
            return
        done.add(name)
        r = compile_sm90(name, fn, cfg, ptrs, const, {**ints, **extra})
        rows.append(r)
        log(f"{name:34s} {str(r['config']):86s} " + (f"smem {r['shared']:6d} regs {r['regs']:3d} stack "
                                                      f"{r['stack']:5d}" if "error" not in r else r["error"]))

    import torch
    for dt in dtypes:
        tdt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dt])
        for varlen in varlens:
            tag = f"[{dt}{' varlen' if varlen else ''}]"
            seq = {"cu": "i64", "ccu": "i64", "cq": "i64"}
            probe = torch.empty(0, dtype=tdt)
            for unit, kname in ((True, "mean_pool"), (False, "weighted_pool")):
                if kname not in kinds:
                    continue
                for cfg in tp._pool_fwd_prune(tp.POOL_FWD_CONFIGS, {"x": probe, "C_PAD": 2, "D": D}):
                    one(f"pool_fwd_kernel {kname} {tag}", tp.pool_fwd_kernel, cfg,
                        {"x": dt, "wt": dt, "pe": dt, "y": dt, **seq},
                        dict(UNIT=unit, HAS_PE=True, IS_VARLEN=varlen, C_PAD=2, PE_J=16), pool_w)
                for cfg in tp._pool_bwd_prune(tp.POOL_BWD_CONFIGS, {"x": probe, "S_PAD": S, "D": D,
                                                                    "NEED_DW": not unit}):
                    one(f"pool_bwd_kernel {kname} {tag}", tp.pool_bwd_kernel, cfg,
                        {"dy": dt, "x": dt, "wt": dt, "dx": dt, "pw": "fp32", "pcs": "fp32", **seq},
                        dict(UNIT=unit, NEED_DX=True, NEED_DW=not unit, NEED_CS=True, IS_VARLEN=varlen, S_PAD=S,
                             C_PAD=2), pool_w)
            if "linear" in kinds:
                lin = dict(IS_VARLEN=varlen, DOT_F32=False)
                fits = {"D": D, "DO": D, "x": probe}
                for cfg in li._fits(li._FWD.tuned.configs, fits, "BLOCK_W"):
                    one(f"linear_fwd_kernel {tag}", li.linear_fwd_kernel, cfg,
                        {"x": dt, "w": dt, "pep": "fp32", "bias": dt, "y": dt, **seq},
                        dict(lin, HAS_PE=True, HAS_BIAS=True, BLOCK_L=32), lin_w)
                if dt != "fp32":      # float32 runs linear_bwd_kernel_dx (linear/triton_impl.py, DXR_MAX_K)
                    for cfg in li._dxr_fits(li._DXR.tuned.configs, {"C_PAD": 2, "DO_PAD": D, "D": D, "dy": probe}):
                        one(f"linear_bwd_kernel_dx_rows {tag}", li.linear_bwd_kernel_dx_rows, cfg,
                            {"dy": dt, "w": dt, "dx": dt, "pcs": "fp32", **seq},
                            dict(lin, C_PAD=2, DO_PAD=D, SLOT_ROWS=li.SLOT_ROWS, HAS_CS=True), lin_w)
                for cfg in li._fits(li._DX.tuned.configs, fits, "BLOCK_K"):
                    one(f"linear_bwd_kernel_dx {tag}", li.linear_bwd_kernel_dx, cfg,
                        {"dy": dt, "w": dt, "dx": dt, **seq}, lin, lin_w)
                for cfg in li._fits(li._DW.tuned.configs, fits, "BLOCK_W"):
                    one(f"linear_bwd_kernel_dw {tag}", li.linear_bwd_kernel_dw, cfg,
                        {"x": dt, "dy": dt, "pe": dt, "cs": "fp32", "dw": dt, **seq},
                        dict(lin, HAS_PE=True, DOT_TF32=False), lin_w)
            if "mlp" in kinds:
                compile_mlp(one, dt, tdt, tag, varlen, T=T, H=H, D=D, L=L, S=S, W=W)
            if "attention_pool" in kinds:
                compile_attention_pool(one, dt, tdt, tag, varlen, T=T, H=H, D=D, L=L, S=S, W=W)
            if "gated_pool" in kinds:
                compile_gated_pool(one, dt, tdt, tag, varlen, T=T, H=H, D=D)
        one1 = triton.Config({}, num_warps=4)
        if "weighted_pool" in kinds:
            one(f"pool_bwd_kernel_finalize [{dt}]", tp.pool_bwd_kernel_finalize, one1,
                {"pw": "fp32", "pcs": "fp32", "wt": dt, "pe": dt, "dw": dt, "dpe": dt},
                dict(UNIT=False, NEED_W=True, NEED_PE=True, NEED_CS=True, BLOCK_R=32, BLOCK_J=32, BLOCK_D=128),
                pool_w)
        if "linear" in kinds:
            one(f"linear_pe_kernel [{dt}]", li.linear_pe_kernel, one1, {"pe": dt, "w": dt, "out": "fp32"},
                dict(BLOCK_D=64, BLOCK_N=128), lin_w)
            one(f"linear_bwd_kernel_finalize [{dt}]", li.linear_bwd_kernel_finalize, one1,
                {"pcs": "fp32", "w": dt, "cs": "fp32", "db": dt, "dpe": dt},
                dict(NEED_CS=True, NEED_B=True, NEED_PE=True, DO_PAD=D, BLOCK_R=32, BLOCK_D=64), lin_w)
    bad = [r for r in rows if "error" in r or r["stack"] > 0 or r["shared"] > 232448]
    log(f"\ncompile-only: {len(rows)} kernel configurations for sm_90, {len(bad)} failing, spilling or over "
        f"227 KB of shared memory")
    for r in bad:
        what = r["error"] if "error" in r else f"stack {r['stack']}, shared {r['shared']}"
        log(f"  {r['kernel']} {r['config']}: {what}")
    return rows


def compile_mlp(one, dt, tdt, tag, varlen, *, T, H, D, L, S, W):
    """mlp's kernels at the NSA shape with F = L*D (the seed's GroupedMLP,
    expand 1): the fused forward, the dp kernel, and linear's dx / dw kernels
    with F as their D_out (the mlp module's own configurations)."""
    import torch

    from kvcompress.ops.mlp import triton_impl as ml
    F, DO, G = L * D, D, H
    BN = ml.block_n(DO)
    seq = {"cu": "i64", "ccu": "i64", "cq": "i64"}
    x_s = dict(sxb=T * H * D, sxh=D, sxt=H * D, sxd=1)
    w_s = dict(s1g=L * D * F, s1k=F, s1f=1, scg=F, scf=1, s2g=F * DO, s2f=DO, s2n=1, sbg=DO, sbn=1)
    sizes = dict(H=H, HG=1, HG_C=1, D=D, F=F, DO=DO, B=1, WORK=15)
    probe = {"D": D, "F": F, "DO": F, "BLOCK_N": BN, "x": torch.empty(0, dtype=tdt), "dy": torch.empty(0, dtype=tdt)}
    flags = dict(IS_VARLEN=varlen, HID_TF32=dt == "fp16", DOT_F32=False)
    for split in (False, True):            # small problems split F (partials in float32, no b2)
        for cfg in ml._fused_prune(ml._FWD.tuned.configs, {**probe, "SPLIT_F": split}, "fwd"):
            one(f"mlp_fwd_kernel {tag}{' split F' if split else ''}", ml.mlp_fwd_kernel, cfg,
                {"x": dt, "w1": dt, "cst": "fp32", "w2": dt, "b2": dt, "y": "fp32" if split else dt, **seq},
                dict(BLOCK_N=BN, ACT=0, HAS_CONST=True, HAS_B2=not split, SPLIT_F=split, **flags),
                dict(x_s, **w_s, **sizes, syb=H * W * DO, syh=W * DO, syw=DO, syd=1, sys=H * W * DO, F_CHUNK=512))
    for cfg in ml._fused_prune(ml._DP.tuned.configs, probe, "dp"):
        one(f"mlp_bwd_kernel_dp {tag}", ml.mlp_bwd_kernel_dp, cfg,
            {"x": dt, "w1": dt, "cst": "fp32", "w2": dt, "dy": dt, "dp": dt, "hid": "fp32" if dt == "fp16" else dt,
             **seq},
            dict(BLOCK_N=ml.dp_block_n(DO), ACT=1, HAS_CONST=True, NEED_DP=True, NEED_H=True, **flags),
            dict(x_s, **w_s, **sizes, sdb=H * W * DO, sdh=W * DO, sdw=DO, sdn=1, spb=H * W * F, sph=W * F, spw=F,
                 spf=1, shb=H * W * F, shh=W * F, shw=F, shf=1))
    hid_dt = "fp32" if dt == "fp16" else dt
    probe2 = {"D": F, "DO": DO, "x": torch.empty(0, dtype=torch.float32 if dt == "fp16" else tdt)}
    for cfg in ml._linear_prune(ml._DW2.tuned.configs, probe2, "BLOCK_W"):
        one(f"mlp dw2 (linear_bwd_kernel_dw) {tag}", ml._DW2.kernel, cfg,
            {"x": hid_dt, "dy": dt, "pe": dt, "cs": "fp32", "dw": "fp32", **seq},
            dict(IS_VARLEN=False, HAS_PE=False, DOT_F32=False, DOT_TF32=dt == "fp16"),
            dict(sxb=H * W * F, sxh=W * F, sxt=F, sxd=1, sdb=H * W * DO, sdh=W * DO, sdw=DO, sdn=1, sph=0, spj=0,
                 spd=0, sos=G * F * DO, sog=F * DO, soj=F * DO, sod=DO, son=1, B=1, H=H, HG=1, D=F, DO=DO,
                 ROWS_PER_SPLIT=W, WORK=15))
    lin = dict(swg=L * D * F, swl=D * F, swd=F, swn=1, DO=F)
    dp_s = dict(sdb=H * W * F, sdh=W * F, sdw=F, sdn=1)
    for cfg in ml._linear_prune(ml._DX.tuned.configs, probe, "BLOCK_K"):
        one(f"mlp dx (linear_bwd_kernel_dx) {tag}", ml._DX.kernel, cfg, {"dy": dt, "w": dt, "dx": dt, **seq},
            dict(IS_VARLEN=varlen, DOT_F32=False), dict(lin, **dp_s, sgb=T * H * D, sgh=D, sgt=H * D, sgd=1))
    for cfg in ml._linear_prune(ml._DW1.tuned.configs, probe, "BLOCK_W"):
        one(f"mlp dw1 (linear_bwd_kernel_dw) {tag}", ml._DW1.kernel, cfg,
            {"x": dt, "dy": dt, "pe": dt, "cs": "fp32", "dw": dt, **seq},
            dict(IS_VARLEN=varlen, HAS_PE=True, DOT_F32=False, DOT_TF32=False),
            dict(lin, **dp_s, sos=0, sog=L * D * F, soj=D * F, sod=F, son=1, ROWS_PER_SPLIT=W))


def compile_attention_pool(one, dt, tdt, tag, varlen, *, T, H, D, L, S, W):
    """attention_pool's kernels at the NSA shape: the forward (with the LSE for
    autograd), the fused backward (dx, dW and pe's sums in one pass) and the
    feature-blocked dW pass used when D > FUSED_MAX_D."""
    import torch

    from kvcompress.ops.attention_pool import triton_impl as ap
    C = -(-L // S)
    C_PAD = 1 << (C - 1).bit_length()
    seq = {"cu": "i64", "ccu": "i64", "cq": "i64"}
    ints = dict(sxb=T * H * D, sxh=D, sxt=H * D, sxd=1, swg=D * D, swd=D, swc=1, sph=L * D, spj=D, spd=1,
                syb=H * W * D, syh=W * D, syw=D, syd=1, slb=H * W * D, slh=W * D, slw=D, sld=1, H=H, HG=1, D=D, C=C,
                sdb=H * W * D, sdh=W * D, sdw=D, sdd=1, sgb=T * H * D, sgh=D, sgt=H * D, sgd=1, WORK=15)
    BD = max(16, 1 << (D - 1).bit_length())
    probe = {"C_PAD": C_PAD, "D": D, "x": torch.empty(0, dtype=tdt)}
    for cfg in ap._fwd_prune(ap._FWD.tuned.configs, probe):
        one(f"attention_pool_fwd_kernel {tag}", ap.attention_pool_fwd_kernel, cfg,
            {"x": dt, "w": dt, "cpe": "fp32", "pe": dt, "y": dt, "lse": "fp32", "y32": "fp32", **seq},
            dict(C_PAD=C_PAD, BLOCK_D=BD, IS_VARLEN=varlen, HAS_PE=True, HAS_LSE=True, DOT_F32=False), ints)
    ptrs = {"x": dt, "w": dt, "cpe": "fp32", "pe": dt, "dy": dt, "y": dt, "lse": "fp32", "dx": dt, "pw": "fp32",
            "pp": "fp32", **seq}
    # the launches the host makes (bwd_blocks): at D = 128 a dx pass and a dW (+ pe sums) pass; at
    # D <= FUSED_MAX_D one pass
    bb, Df = ap.bwd_blocks(D, tdt), ap.FUSED_MAX_D
    passes = [("dx", D, bb.BD, bb.dx_c, bb.ncb, True, False, False), ("dW", D, bb.BD, bb.dw_c, 1, False, True, True),
              ("fused", Df, Df, Df, 1, True, True, True)]
    for what, d, bd, bc, ncb, need_dx, need_dw, need_pe in passes:
        kw = {"BLOCK_D": bd, "BLOCK_C": bc, "NEED_DX": need_dx, "NEED_DW": need_dw, "x": torch.empty(0, dtype=tdt)}
        dims = dict(ints, D=d, swg=d * d, swd=d, sph=L * d, spj=d, syb=H * W * d, syh=W * d, syw=d, slb=H * W * d,
                    slh=W * d, slw=d, sdb=H * W * d, sdh=W * d, sdw=d, sxb=T * H * d, sxh=d, sxt=H * d, sgb=T * H * d,
                    sgh=d, sgt=H * d)
        for cfg in ap._bwd_prune(ap._BWD.tuned.configs, kw):
            one(f"attention_pool_bwd_kernel {what} D={d} {tag}", ap.attention_pool_bwd_kernel, cfg, ptrs,
                dict(BLOCK_D=bd, BLOCK_C=bc, NCB=ncb, L_PAD=L, IS_VARLEN=varlen, HAS_PE=True, NEED_DX=need_dx,
                     NEED_DW=need_dw, NEED_PE=need_pe, HID_TF32=dt == "fp16", DOT_F32=False), dims)


def compile_gated_pool(one, dt, tdt, tag, varlen, *, T, H, D):
    """gated_pool's kernels at DeepSeek-V4's two settings (kvcompress-bench's):
    CSA (L = 8, S = 4, split, D_out = D of Dx = 2D) and HCA (L = S = 128),
    G = 1 with a bias; the forward with its backward statistics (y kept
    before rounding for half input) and without, and the backward."""
    from kvcompress.ops.gated_pool import triton_impl as gp
    seq = {"cu": "i64", "ccu": "i64", "cq": "i64"}
    acc = "fp32"
    for name, L, S, split in (("CSA", 8, 4, True), ("HCA", 128, 128, False)):
        Dx = 2 * D if split else D
        W, NQ = T // S, T // S
        ints = dict(N=1, N_STEPS=0, T=T, W=W, NQ=NQ, L=L, S=S, PRE=L - S, sxb=T * H * Dx, sxh=Dx, sxt=H * Dx, sxd=1,
                    szb=T * H * Dx, szh=Dx, szt=H * Dx, szd=1, sbg=L * D, sbj=D, sbd=1, syb=H * W * D, syh=W * D,
                    syw=D, syd=1, H=H, HG=H, DO=D, DX=Dx, WORK=20, sdb=H * W * D, sdh=W * D, sdw=D, sdd=1,
                    ssb=H * W * D, ssh=W * D, ssw=D, ssd=1, sgb=T * H * Dx, sgh=Dx, sgt=H * Dx, sgd=1,
                    shb=T * H * Dx, shh=Dx, sht=H * Dx, shd=1, NT=-(-NQ // gp.BWD_BLOCK_Q))
        for stats in (False, True):
            cst = dict(SPLIT=split, HAS_BIAS=True, HAS_LSE=stats, HAS_YA=stats and dt != "fp32", IS_VARLEN=varlen,
                       ACC=gp.tl.float32)
            for cfg in gp._fwd_prune(gp._FWD.tuned.configs, {"DO": D, "L": L}):
                one(f"gated_pool_fwd_kernel {name}{' stats' if stats else ''} {tag}", gp.gated_pool_fwd_kernel, cfg,
                    {"x": dt, "z": dt, "bias": dt, "y": dt, "lse": acc, "ya": acc, **seq}, cst, ints)
        cst = dict(SPLIT=split, HAS_BIAS=True, NEED_DX=True, NEED_DZ=True, NEED_DB=True, IS_VARLEN=varlen,
                   ACC=gp.tl.float32, BLOCK_Q=gp.BWD_BLOCK_Q)
        for cfg in gp._bwd_prune(gp._BWD.tuned.configs, {"DX": Dx, "BLOCK_Q": gp.BWD_BLOCK_Q}):
            one(f"gated_pool_bwd_kernel {name} {tag}", gp.gated_pool_bwd_kernel, cfg,
                {"x": dt, "z": dt, "bias": dt, "dy": dt, "ys": acc, "lse": acc, "dx": dt, "dz": dt, "pb": acc, **seq},
                cst, ints)


# --------------------------------------------------------------------------- main


def _fmt_targets(r):
    if "targets" not in r:
        return ""
    bad = [k for k, v in r["targets"].items() if v is not True]
    return "  targets MET" if not bad else "  targets MISSED: " + ", ".join(
        f"{k}{' (not measured)' if r['targets'][k] is None else ''}" for k in bad)


def summary(res):
    log("\n" + "=" * 100)
    log("SUMMARY (bfloat16, H100 targets: linear fwd <= 0.10 ms, fwd+bwd <= 0.30 ms; pools fwd >= 2.3 TB/s, "
        "fwd+bwd >= 2.0 TB/s;\n  mlp fwd >= 630, fwd+bwd >= 520 model TFLOP/s, >= 1.05x / 1.4x torch.compile's speed, "
        "<= 0.5x its peak extra memory;\n  attention_pool fwd and fwd+bwd <= 2x the floor, minimal bytes at the "
        "measured copy bandwidth)")
    if "ceilings" in res:
        c = res["ceilings"]
        log(f"ceilings: copy {c['copy_tbs']:.2f} TB/s (read + write), "
            f"bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s")
    for r in res.get("correctness", []):
        worst = max(r["ratios"].values()) if r["ratios"] else 0.0
        extra = ""
        if "torch_ratios" in r:
            tw = max(r["torch_ratios"].values()) if r["torch_ratios"] else 0.0
            extra = f"  (vs exact model; torch backend worst {tw:.2g}" + \
                ("" if r.get("well_conditioned", True) else
                 f"; ill-conditioned class bound: checked by {r.get('checked_by')}") + ")"
        log(f"correct  {r['kind']:14s} {r['case']:8s} T={r['T']:<7d} {'PASS' if r['ok'] else 'FAIL'}  "
            f"worst error/bound {worst:.3g}  " + " ".join(f"{k}={v:.2g}" for k, v in r["ratios"].items()) + extra)
    for r in res.get("timing", []):
        if "error" in r:
            log(f"timing   {r['kind']:14s} {r['impl']:14s} {r['layout']}: ERROR {r['error'][:60]}")
            continue
        line = (f"timing   {r['kind']:14s} {r['impl']:14s} {r['layout']} {r.get('shape', 'nsa'):6s} "
                f"fwd {r['fwd_ms']:.4f} ms ")
        if "fwd_tflops" in r:
            line += (f"({r['fwd_tflops']:.0f} TFLOP/s, {100 * r['fwd_frac']:.0f}%)  fwd+bwd {r['fwdbwd_ms']:.4f} ms "
                     f"({r['fwdbwd_tflops']:.0f} TFLOP/s, {100 * r['fwdbwd_frac']:.0f}%)")
        elif "fwd_over_floor" in r:
            line += (f"({r['fwd_over_floor']:.2f}x floor {r['floor_fwd_ms']:.4f})  fwd+bwd {r['fwdbwd_ms']:.4f} ms "
                     f"({r['fwdbwd_over_floor']:.2f}x floor {r['floor_fwdbwd_ms']:.4f})")
        else:
            line += (f"({r['fwd_tbs']:.2f} TB/s, {100 * r['fwd_frac']:.0f}%)  fwd+bwd {r['fwdbwd_ms']:.4f} ms "
                     f"({r['fwdbwd_tbs']:.2f} TB/s, {100 * r['fwdbwd_frac']:.0f}%)")
        if r.get("fwd_mem_mib") is not None:
            line += f"  mem {r['fwd_mem_mib']:.0f}/{r['fwdbwd_mem_mib']:.0f} MiB"
        if "fwd_vs_compile" in r:
            line += (f"  vs {r['compile_ref']}: {r['fwd_vs_compile']:.2f}x/{r['fwdbwd_vs_compile']:.2f}x speed"
                     + (f", {r['fwd_mem_vs_compile']:.2f}x/{r['fwdbwd_mem_vs_compile']:.2f}x memory"
                        if "fwd_mem_vs_compile" in r else ""))
        log(line + _fmt_targets(r))
    for r in res.get("overhead", []):
        log(f"overhead {r['kind']:14s} per call: triton {r['triton_wall_us']:.1f} us wall, "
            f"{r['triton_issue_us']:.1f} us to issue; torch {r['torch_wall_us']:.1f} us wall, "
            f"{r['torch_issue_us']:.1f} us to issue")
    bad = [f"{r['kind']} {r['case']}" for r in res.get("correctness", []) if not r["ok"]]
    log(("CORRECTNESS FAILED: " + ", ".join(bad)) if bad else "correctness: all PASS")
    log("=" * 100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=None, help="comma list of " + ", ".join(KINDS) + " (default all; "
                    "--compile-only also gated_pool)")
    ap.add_argument("--cases", default="nsa,b4d192,d64,packed", help="correctness cases: nsa, b4d192, d64, packed")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repetitions")
    ap.add_argument("--timing-shapes", default="nsa",
                    help="comma list of timed shapes: nsa (B=1, T=131072, D=128), t8192, t65536, b4 (B=4), "
                         "d192 (D=192); H=4, L=32, S=16 throughout")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: compile every kernel config for sm_90")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no GPU: run every step of this script on CPU in Triton's interpreter at tiny sizes "
                         "(checks the script, measures nothing)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="with --compile-only: bf16, fp16, fp32")
    ap.add_argument("--head-dims", default="128,192",
                    help="with --compile-only: head dims D (NSA: 128 values, 192 keys)")
    ap.add_argument("--first-only", action="store_true",
                    help="with --compile-only: one configuration per kernel and variant, fixed-length calls only "
                         "(that every kernel compiles; tests/test_compile_sm90.py)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    known = COMPILE_KINDS if a.compile_only else KINDS
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()] if a.kinds is not None else list(known)
    bad = [k for k in kinds if k not in known]
    if bad:
        ap.error(f"--kinds: unknown {bad}; choose from {known}")
    shapes = [t.strip() for t in a.timing_shapes.split(",") if t.strip()]
    bad = [t for t in shapes if t not in TIMING_SHAPES]
    if bad or not shapes:
        ap.error(f"--timing-shapes: unknown {bad or shapes}; choose from {list(TIMING_SHAPES)}")
    res = {"argv": sys.argv[1:]}
    if a.compile_only:
        res["compile"] = []
        for D in [int(d) for d in a.head_dims.split(",") if d.strip()]:
            log(f"--- D = {D}")
            res["compile"] += compile_only([d.strip() for d in a.dtypes.split(",")], kinds, D, first_only=a.first_only,
                                           varlens=(False,) if a.first_only else (False, True))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
        return 0 if all("error" not in r and r["stack"] == 0 and r["shared"] <= 232448 for r in res["compile"]) else 1
    global DEVICE
    if a.dry_run_cpu:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"   # before kvcompress's Triton modules read it
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    if DEVICE == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --compile-only or --dry-run-cpu, or on a GPU machine")
    import kvcompress.ops.attention_pool.triton_impl  # noqa: F401
    import kvcompress.ops.linear.triton_impl  # noqa: F401  (registers the backends if ops/__init__ does not)
    import kvcompress.ops.mean_pool.triton_impl  # noqa: F401
    import kvcompress.ops.mlp.triton_impl  # noqa: F401
    import kvcompress.ops.weighted_pool.triton_impl  # noqa: F401
    res.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run, interpreter)",
               torch=torch.__version__, triton=triton.__version__)
    log(f"{res['device']}, torch {res['torch']}, triton {res['triton']}")
    t_start = time.perf_counter()
    res["ceilings"] = ceilings(a.quick)
    log(f"ceilings: {res['ceilings']}")
    if not a.skip_correctness:
        cases = correctness_cases("dry" if a.dry_run_cpu else "quick" if a.quick else "full")
        res["correctness"] = []
        for kind in kinds:
            for cname in [c.strip() for c in a.cases.split(",") if c.strip()]:
                t0 = time.perf_counter()
                r = check(kind, cases[cname])
                r["seconds"] = round(time.perf_counter() - t0, 1)
                res["correctness"].append(r)
                log(f"  correctness {kind} {cname}: {'PASS' if r['ok'] else 'FAIL'} {r['ratios']} ({r['seconds']} s)")
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    if not a.skip_timing:
        res["timing"] = []
        for kind in kinds:
            for shape in shapes:
                res["timing"] += timing(kind, a.quick, res["ceilings"], shape)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        res["overhead"] = [overhead(kind, a.quick) for kind in kinds]
    res["autotuned"] = autotuned()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    summary(res)
    ok = all(r["ok"] for r in res.get("correctness", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
