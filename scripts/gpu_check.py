#!/usr/bin/env python
"""GPU check of the Triton backend: mean_pool, weighted_pool, linear.

Run from the repository root on a CUDA machine (needs only torch, triton,
numpy; the seed package is optional):

    python scripts/gpu_check.py --out gpu_check.json            # the full run (a few minutes on an H100)
    python scripts/gpu_check.py --quick --out quick.json        # smoke run: small sizes, few repetitions
    python scripts/gpu_check.py --kinds linear --cases nsa      # a subset
    python scripts/gpu_check.py --compile-only                  # no GPU: compile every kernel config for sm_90
    python scripts/gpu_check.py --dry-run-cpu                   # no GPU: every step on CPU, interpreter, tiny

What it measures, per kind:

(a) correctness of the triton backend against the torch backend, forward
    and every gradient, bfloat16, at NSA sizes (B=1, H=4, D=128, L=32, S=16,
    T=131072, left padding, pe and bias on, x a (B, T, H, D) tensor seen
    through transpose), at B=4, T=8192, D=192, and packed with cu_seqlens
    (empty and short sequences). The bound is derived as in
    tests/test_triton.py: both backends sum n products in float32 and round
    to bfloat16 at most twice, so they differ by at most
    2 ((2 u_o + n u_a) M + floors), M the same computation in float64 on
    absolute values.
(b) timing (triton.testing.do_bench, median) of forward and forward +
    backward, triton vs torch backend; for linear also the seed's pipeline
    (ZeroPad + Unfold + einops, skipped if native_sparse_attention_pytorch is
    absent) and torch.compile of the torch path.
(c) ceilings measured in the same run: a device-to-device copy (TB/s,
    read + write bytes) and a bfloat16 matmul (TFLOP/s); per timed case the
    effective TB/s (pools) or TFLOP/s (linear) and its fraction of the ceiling,
    checked against the issue's targets.
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

KINDS = ("mean_pool", "weighted_pool", "linear")
U = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}
TINY = {"bfloat16": 2.0 ** -133, "float16": 2.0 ** -24, "float32": 2.0 ** -149}   # smallest subnormals
TINY_ACC = 2.0 ** -126   # float32's smallest normal: GPU float32 math may flush subnormals to zero
# issue targets: H100 80GB, bf16, B=1, H=4, D=128, L=32, S=16, T=131072
TARGETS = {"linear": {"fwd_ms": 0.10, "fwdbwd_ms": 0.30},
           "mean_pool": {"fwd_tbs": 2.3, "fwdbwd_tbs": 2.0},
           "weighted_pool": {"fwd_tbs": 2.3, "fwdbwd_tbs": 2.0}}


DEVICE = "cuda"        # "cpu" with --dry-run-cpu (Triton's interpreter, tiny sizes: checks this script)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- inputs


def make(kind, *, B, H, T, D, L, S, dtype, layout="bhtd", pe=False, bias=False, seed=0):
    """x (B, H, T, D) in the layout, the kind's parameters (G = H), pe or None."""
    import torch
    device = DEVICE
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    if layout == "bthd":
        x = rnd(B, T, H, D).transpose(1, 2)
    else:
        x = rnd(B, H, T, D)
    params = {"mean_pool": [], "weighted_pool": [rnd(H, L, scale=1 / L)],
              "linear": [rnd(H, L, D, D, scale=(L * D) ** -0.5), rnd(H, D) if bias else None]}[kind]
    return x, params, (rnd(H, L, D) if pe else None)


def call(kind, backend, x, params, pe, *, L, S, padding, cu=None, **extra):
    import kvcompress.functional as kf
    if backend == "triton":
        from kvcompress import backends as kb
        fn = kb.get(kind, "triton").fn
        return fn(x, *params, block_size=L, stride=S, padding=padding, pe=pe, cu_seqlens=cu, **extra)
    return getattr(kf, kind)(x, *params, block_size=L, stride=S, padding=padding, pe=pe, cu_seqlens=cu,
                             backend=backend)


# --------------------------------------------------------------------------- (a) correctness


def n_terms(kind, name, *, L, S, D, BW, BHW):
    """Products summed into one element of ``name`` (see tests/test_triton.py::_n_terms)."""
    C = -(-L // S)
    if name == "y":
        return (L * D if kind == "linear" else L) + 3
    table = {
        "mean_pool": {"x": C, "pe": BW},
        "weighted_pool": {"x": C, "weight": 2 * BHW * D, "pe": BW},
        "linear": {"x": C * D, "weight": 2 * BHW, "bias": BHW, "pe": BW * D},
    }
    return table[kind][name] + 2


def check(kind, case):
    import torch
    dtype = torch.bfloat16
    c = dict(case)
    name, seqlens, padding = c.pop("name"), c.pop("seqlens", None), c.pop("padding")
    use_pe, use_bias = c.pop("pe", False), c.pop("bias", False)
    L, S = c["L"], c["S"]
    if seqlens:
        c["T"] = sum(seqlens)
    x, params, pe = make(kind, dtype=dtype, pe=use_pe, bias=use_bias, **c)
    cu = None
    if seqlens:
        cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()), device=DEVICE, dtype=torch.int32)
    named = {"x": x, "pe": pe}
    pnames = {"mean_pool": [], "weighted_pool": ["weight"], "linear": ["weight", "bias"]}[kind]
    named.update({n: p for n, p in zip(pnames, params)})
    t0 = time.perf_counter()

    def run(backend, values, dy):
        # clone keeps the strides of a dense tensor: x stays a (B, T, H, D) tensor seen as (B, H, T, D)
        leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in values.items()}
        y = call(kind, backend, leaves["x"], [leaves[n] for n in pnames], leaves["pe"], L=L, S=S, padding=padding,
                 cu=cu)
        if dy is None:
            dy = torch.randn(y.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(5)).to(
                y.dtype)
        y.backward(dy)
        return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}, dy

    y_tr, g_tr, dy = run("triton", named, None)
    sync()
    t_triton = time.perf_counter() - t0
    y_to, g_to, _ = run("torch", named, dy)
    absd = {k: v.detach().abs().double() if v is not None else None for k, v in named.items()}
    m_y, m_g, _ = run("torch", absd, dy.abs().double())
    B, H, W = y_tr.shape[:3]
    sizes = dict(L=L, S=S, D=c["D"], BW=B * W, BHW=B * W)
    out = {"kind": kind, "case": name, "dtype": "bfloat16", "T": c["T"], "B": B, "W": W, "ok": True, "ratios": {},
           "triton_first_call_s": round(t_triton, 2)}
    for key, got, want, mag in [("y", y_tr, y_to, m_y)] + [(k, g_tr[k], g_to[k], m_g[k]) for k in g_tr]:
        n = n_terms(kind, key, **sizes)
        # each backend: n float32 roundings, at most 2 to bfloat16 (tolerance.py's forward model)
        bound = 2 * ((2 * U["bfloat16"] + n * U["float32"]) * mag + TINY["bfloat16"] + n * TINY_ACC)
        err = (got.double() - want.double()).abs()
        finite = bool(torch.isfinite(got).all())
        ratio = float((err / bound).max()) if err.numel() else 0.0
        ok = finite and ratio <= 1.0
        out["ratios"][key] = ratio if finite else float("inf")
        out["ok"] &= ok
    return out


def correctness_cases(mode):
    """mode: "full", "quick" or "dry" (CPU interpreter: tiny shapes, same structure)."""
    if mode == "dry":
        return {
            "nsa": dict(name="nsa", B=1, H=2, T=96, D=16, L=8, S=4, padding="left", pe=True, bias=True,
                        layout="bthd"),
            "b4d192": dict(name="b4d192", B=2, H=2, T=40, D=24, L=8, S=4, padding="valid"),
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
    import torch
    n = (1 << 28) if quick else (1 << 30)                          # bytes per buffer
    bufs = [torch.empty(n // 2, dtype=torch.bfloat16, device=DEVICE).normal_(), None]
    bufs[1] = torch.empty_like(bufs[0])
    ms = bench(lambda: bufs[1].copy_(bufs[0]), quick)
    copy_tbs = 2 * n / (ms * 1e-3) / 1e12
    bufs.clear()
    m = 256 if DEVICE != "cuda" else 4096 if quick else 8192
    a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, quick)
    mm_tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return {"copy_tbs": copy_tbs, "matmul_bf16_tflops": mm_tflops}


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


def timing(kind, quick, ceil):
    import torch

    import kvcompress.functional as kf
    B, H, D, L, S = 1, 4, 128, 32, 16
    T = 16384 if quick else 131072
    if DEVICE != "cuda":
        H, D, L, S, T = 2, 16, 8, 4, 128
    rows = []
    for layout in ("bhtd", "bthd"):
        x, params, _ = make(kind, B=B, H=H, T=T, D=D, L=L, S=S, dtype=torch.bfloat16, layout=layout)
        W = (T - L) // S + 1
        x_bytes, y_bytes = x.numel() * 2, B * H * W * D * 2
        flops = 2 * B * H * W * L * D * D
        fwd_bytes = x_bytes + y_bytes
        # minimal traffic of forward + backward: mean reads dy, writes dx; weighted and linear also read x
        bwd_bytes = y_bytes + x_bytes + (x_bytes if kind != "mean_pool" else 0)
        def backend_fn(backend):
            return lambda xx, *pp: call(kind, backend, xx, list(pp), None, L=L, S=S, padding="valid")

        fns = {"triton": backend_fn("triton")}
        if layout == "bhtd":       # the baselines once, on the plain layout
            fns["torch"] = backend_fn("torch")
            if kind == "linear":
                seed = seed_linear_fn(L, S, H, D)
                if seed is None:
                    log("  seed package native_sparse_attention_pytorch not installed: seed pipeline skipped")
                else:
                    fns["seed"] = seed
                if DEVICE == "cuda":   # inductor needs a C++ compiler for CPU code: not in the dry run
                    fns["torch.compile"] = torch.compile(
                        lambda xx, *pp: kf.linear(xx, *pp, block_size=L, stride=S, backend="torch"))
        for name, fn in fns.items():
            ps = [p for p in params if p is not None]
            try:
                f_ms = bench(lambda fn=fn, x=x, ps=ps: fn(x, *ps), quick)
                xg = x.detach().requires_grad_(True)
                pg = [p.detach().requires_grad_(True) for p in ps]
                dy = torch.randn_like(fn(x, *ps))

                def step(fn=fn, xg=xg, pg=pg, dy=dy):
                    fn(xg, *pg).backward(dy)
                fb_ms = bench(step, quick, grad_to_none=[xg, *pg])
            except Exception as e:   # report and go on: one broken baseline must not hide the rest
                log(f"  {kind} {name} {layout}: {type(e).__name__}: {e}")
                rows.append({"kind": kind, "impl": name, "layout": layout, "error": repr(e)})
                continue
            r = {"kind": kind, "impl": name, "layout": layout, "T": T, "fwd_ms": f_ms, "fwdbwd_ms": fb_ms}
            if kind == "linear":
                r["fwd_tflops"] = flops / (f_ms * 1e-3) / 1e12
                r["fwdbwd_tflops"] = 3 * flops / (fb_ms * 1e-3) / 1e12
                r["fwd_frac"] = r["fwd_tflops"] / ceil["matmul_bf16_tflops"]
                r["fwdbwd_frac"] = r["fwdbwd_tflops"] / ceil["matmul_bf16_tflops"]
                r["fwd_tbs"] = fwd_bytes / (f_ms * 1e-3) / 1e12
            else:
                r["fwd_tbs"] = fwd_bytes / (f_ms * 1e-3) / 1e12
                r["fwdbwd_tbs"] = (fwd_bytes + bwd_bytes) / (fb_ms * 1e-3) / 1e12
                r["fwd_frac"] = r["fwd_tbs"] / ceil["copy_tbs"]
                r["fwdbwd_frac"] = r["fwdbwd_tbs"] / ceil["copy_tbs"]
            if name == "triton" and not quick and DEVICE == "cuda":
                t = TARGETS[kind]
                r["meets_targets"] = all(r[k] <= v if k.endswith("_ms") else r[k] >= v for k, v in t.items())
            rows.append(r)
            log(f"  {kind:14s} {name:14s} {layout}: fwd {f_ms:.4f} ms, fwd+bwd {fb_ms:.4f} ms")
    return rows


# --------------------------------------------------------------------------- (d) host overhead


def overhead(kind, quick):
    import torch
    x, params, _ = make(kind, B=1, H=1, T=64, D=16, L=4, S=2, dtype=torch.bfloat16)
    ps = [p for p in params if p is not None]
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
    from kvcompress.ops.linear import triton_impl as li
    from kvcompress.ops.mean_pool import triton_impl as mp
    from kvcompress.ops.weighted_pool import triton_impl as wp
    out = {}
    for name, launcher in [("mean_pool_fwd", mp._FWD), ("mean_pool_bwd", mp._BWD), ("weighted_pool_fwd", wp._FWD),
                           ("weighted_pool_bwd", wp._BWD), ("linear_fwd", li._FWD), ("linear_dx", li._DX),
                           ("linear_dw", li._DW)]:
        tuned = launcher.tuned
        if tuned is not None:
            out[name] = {str(k): str(v) for k, v in tuned.cache.items()}
    return out


# --------------------------------------------------------------------------- compile only


def compile_only(dtypes):
    """Compile every configuration of every kernel for sm_90 (no GPU needed),
    with the JIT's specialisations of an NSA-sized call (ints equal to 1 are
    constants, multiples of 16 are marked divisible); report shared memory,
    registers and spill stack per config (cuobjdump)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvcompress.ops import _triton_common as tc
    from kvcompress.ops.linear import triton_impl as li
    from kvcompress.ops.mean_pool import triton_impl as mp
    from kvcompress.ops.weighted_pool import triton_impl as wp
    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    T, H, D, L, S = 131072, 4, 128, 32, 16
    W = (T - L) // S + 1
    ints = dict(N=1, N_STEPS=0, T=T, W=W, NQ=T // S, L=L, S=S, PRE=0, sxb=T * H * D, sxh=D, sxt=H * D, sxd=1,
                syb=H * W * D, syh=W * D, syw=D, syd=1, H=H, HG=1, D=D, C=2, DO=D, HG_C=1, scg=D, scn=1,
                sdb=H * W * D, sdh=W * D, sdw=D, sdd=1, sdn=1, sgb=T * H * D, sgh=D, sgt=H * D, sgd=1, WORK=15, B=1,
                sph=L * D, spj=D, spd=1, sos=H * L * D * D, sog=L * D * D, soj=D * D, sod=D, son=1,
                ROWS_PER_SPLIT=W)
    pool_w = dict(swg=L, swl=1)
    lin_w = dict(swg=L * D * D, swl=D * D, swd=D, swn=1)
    rows = []

    def one(name, fn, cfg, ptrs, const, extra):
        vals = {**ints, **extra}
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
            k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
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
        rows.append(r)
        log(f"{name:34s} {str(r['config']):86s} " + (f"smem {r['shared']:6d} regs {r['regs']:3d} stack "
                                                      f"{r['stack']:5d}" if "error" not in r else r["error"]))

    for dt in dtypes:
        for varlen in (False, True):
            tag = f"[{dt}{' varlen' if varlen else ''}]"
            p = {"x": dt, "wt": dt, "cst": "fp32", "y": dt, "cu": "i64", "ccu": "i64", "cq": "i64"}
            for fn in (mp.mean_pool_fwd_kernel, wp.weighted_pool_fwd_kernel):
                for cfg in tc._pool_fwd_prune(tc.POOL_FWD_CONFIGS, {"C_PAD": 2, "D": D}):
                    one(f"{fn.__name__} {tag}", fn, cfg, p, dict(C_PAD=2, IS_VARLEN=varlen, HAS_CONST=True), pool_w)
            pb = {"dy": dt, "x": dt, "wt": dt, "dx": dt, "pw": "fp32", "cu": "i64", "ccu": "i64", "cq": "i64"}
            for fn, dw in ((mp.mean_pool_bwd_kernel, False), (wp.weighted_pool_bwd_kernel, True)):
                for cfg in tc.POOL_BWD_CONFIGS:
                    cfg = triton.Config({"BLOCK_K": 64, "BLOCK_D": 64 if dt == "fp32" else 128, **cfg.kwargs},
                                        num_warps=cfg.num_warps)
                    one(f"{fn.__name__} {tag}", fn, cfg, pb, dict(IS_VARLEN=varlen, NEED_DX=True, NEED_DW=dw), pool_w)
            import torch
            tdt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dt])
            probe = {"D": D, "DO": D, "x": torch.empty(0, dtype=tdt), "cst": torch.empty(0)}
            for name, launcher, ptrs, const, rows_name in [
                ("linear_fwd_kernel", li._FWD, {"x": dt, "w": dt, "cst": "fp32", "y": dt, "cu": "i64", "ccu": "i64",
                                                "cq": "i64"}, dict(IS_VARLEN=varlen, HAS_CONST=True, DOT_F32=False),
                 "BLOCK_W"),
                ("linear_bwd_kernel_dx", li._DX, {"dy": dt, "w": dt, "dx": dt, "cu": "i64", "ccu": "i64",
                                                  "cq": "i64"}, dict(IS_VARLEN=varlen, DOT_F32=False), "BLOCK_K"),
                ("linear_bwd_kernel_dw", li._DW, {"x": dt, "dy": dt, "pe": dt, "cs": "fp32", "dw": "fp32",
                                                  "cu": "i64", "ccu": "i64", "cq": "i64"},
                 dict(IS_VARLEN=varlen, HAS_PE=True, DOT_F32=False), "BLOCK_W")]:
                for cfg in li._fits(launcher.tuned.configs, probe, rows_name):
                    one(f"{name} {tag}", launcher.kernel, cfg, ptrs, const, lin_w)
    bad = [r for r in rows if "error" in r or r["stack"] > 0 or r["shared"] > 232448]
    log(f"\ncompile-only: {len(rows)} kernel configurations for sm_90, {len(bad)} failing, spilling or over "
        f"227 KB of shared memory")
    for r in bad:
        what = r["error"] if "error" in r else f"stack {r['stack']}, shared {r['shared']}"
        log(f"  {r['kernel']} {r['config']}: {what}")
    return rows


# --------------------------------------------------------------------------- main


def summary(res):
    log("\n" + "=" * 100)
    log("SUMMARY (bfloat16, H100 targets: linear fwd <= 0.10 ms, fwd+bwd <= 0.30 ms; pools fwd >= 2.3 TB/s, "
        "fwd+bwd >= 2.0 TB/s)")
    if "ceilings" in res:
        c = res["ceilings"]
        log(f"ceilings: copy {c['copy_tbs']:.2f} TB/s (read + write), "
            f"bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s")
    for r in res.get("correctness", []):
        worst = max(r["ratios"].values()) if r["ratios"] else 0.0
        log(f"correct  {r['kind']:14s} {r['case']:8s} T={r['T']:<7d} {'PASS' if r['ok'] else 'FAIL'}  "
            f"worst error/bound {worst:.3g}  " + " ".join(f"{k}={v:.2g}" for k, v in r["ratios"].items()))
    for r in res.get("timing", []):
        if "error" in r:
            log(f"timing   {r['kind']:14s} {r['impl']:14s} {r['layout']}: ERROR {r['error'][:60]}")
            continue
        unit = "TFLOP/s" if r["kind"] == "linear" else "TB/s"
        key = "tflops" if r["kind"] == "linear" else "tbs"
        fb = r.get(f"fwdbwd_{key}")
        tgt = {True: "  targets MET", False: "  targets MISSED"}.get(r.get("meets_targets"), "")
        log(f"timing   {r['kind']:14s} {r['impl']:14s} {r['layout']}  fwd {r['fwd_ms']:.4f} ms "
            f"({r[f'fwd_{key}']:.2f} {unit}, {100 * r['fwd_frac']:.0f}%)  fwd+bwd {r['fwdbwd_ms']:.4f} ms "
            f"({fb:.2f} {unit}, {100 * r['fwdbwd_frac']:.0f}%){tgt}")
    for r in res.get("overhead", []):
        log(f"overhead {r['kind']:14s} per call: triton {r['triton_wall_us']:.1f} us wall, "
            f"{r['triton_issue_us']:.1f} us to issue; torch {r['torch_wall_us']:.1f} us wall, "
            f"{r['torch_issue_us']:.1f} us to issue")
    log("=" * 100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ", ".join(KINDS))
    ap.add_argument("--cases", default="nsa,b4d192,packed", help="correctness cases: nsa, b4d192, packed")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repetitions")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: compile every kernel config for sm_90")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no GPU: run every step of this script on CPU in Triton's interpreter at tiny sizes "
                         "(checks the script, measures nothing)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="with --compile-only: bf16, fp16, fp32")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"--kinds: unknown {bad}; choose from {KINDS}")
    res = {"argv": sys.argv[1:]}
    if a.compile_only:
        res["compile"] = compile_only([d.strip() for d in a.dtypes.split(",")])
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
    import kvcompress.ops.linear.triton_impl  # noqa: F401  (registers the backends if ops/__init__ does not)
    import kvcompress.ops.mean_pool.triton_impl  # noqa: F401
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
            res["timing"] += timing(kind, a.quick, res["ceilings"])
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
