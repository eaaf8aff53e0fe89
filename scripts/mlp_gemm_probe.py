"""Issue 14.1 probe: how fast can mlp go through cuBLAS at the NSA shape?

Times, in one process on one GPU (eager, triton.testing.do_bench medians),
forward and forward + backward, bfloat16, B = 1, H = 4, T, D = 128, L = 32,
S = 16, F = L * D, per-head weights (the seed's GroupedMLP), pe on,
padding "left":

- triton: kvcompress.functional.mlp(backend="triton") (the fused kernel);
- seed, seed+compile: the seed's GroupedMLP through the adapter
  (kvcompress/testing/adapters/seed.py), eager and torch.compile'd;
- kvcompress-gemm: kvcompress.functional.mlp(backend="gemm")
  (kvcompress/ops/mlp/gemm_impl.py): relu, the windows x + pe formed once
  in bf16, one GEMM per head with b1 in cuBLAS's bias epilogue, relu in
  place, the hidden layer stored in bf16; explicit backward by C = L / S
  chunk GEMMs over shifted row ranges of x;
- gemm: windows copied once (L / S copies of each token, bf16), then cuBLAS
  with fused epilogues: baddbmm(b1 + flat(pe) @ w1, A, w1), relu in place,
  baddbmm(b2, hidden, w2); the backward is five bmm's and a fold of dA
  back onto the tokens (C shifted adds). Hidden layer stored in bf16
  (io-intermediates, SPEC 3c);
- the matmul floor: the forward's flops at a bf16 bmm's measured rate.

Each variant's output, and kvcompress-gemm's gradients of every input, are
compared with the torch backend in float32 (RMS relative error), so a fast
wrong variant shows. Usage (on a CUDA machine):
python scripts/mlp_gemm_probe.py [--T 131072] [--out probe.json]

``--dry-run`` runs anywhere (the CPU without a GPU): a small shape
(T = 256, D = 16), every variant that runs on the device checked against
the torch backend (forward and gradients), nothing timed; it exits 1 if a
forward, or a gradient of kvcompress-gemm, is off by more than
``DRY_RUN_TOL`` (the gemm variant's bf16 backward is reported only: its
gradients measure ~3e-2 on that shape).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import kvcompress.functional as kf


class _MlpGemm(torch.autograd.Function):
    """x (B, H, T, D) -> (B, H, W, D) through cuBLAS; per-head weights
    w1 (H, L*D, F), b1 (H, F), w2 (H, F, D), b2 (H, D), pe (H, L, D);
    padding "left", S | L, T % S == 0 (the probe's shape only)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, pe, L, S):
        B, H, T, D = x.shape
        pad = L - S
        R = T // S
        xp = torch.nn.functional.pad(x.reshape(B * H, T, D), (0, 0, pad, 0))        # (BH, T + pad, D)
        A = xp.as_strided((B * H, R, L * D), (xp.stride(0), S * D, 1)).contiguous()  # the windows, bf16
        wh = w1.repeat(B, 1, 1) if B > 1 else w1
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        b1e = (b1.to(acc) + torch.einsum("hk,hkf->hf", pe.to(acc).flatten(1), w1.to(acc))).to(x.dtype)
        b1e = b1e.repeat(B, 1)[:, None, :]
        hidden = torch.baddbmm(b1e, A, wh).relu_()                                     # (BH, R, F)
        w2h = w2.repeat(B, 1, 1) if B > 1 else w2
        y = torch.baddbmm(b2.repeat(B, 1)[:, None, :], hidden, w2h)
        ctx.save_for_backward(A, hidden, w1, w2, pe)
        ctx.shape = (B, H, T, D, L, S)
        return y.view(B, H, R, -1)

    @staticmethod
    def backward(ctx, dy):
        A, hidden, w1, w2, pe = ctx.saved_tensors
        B, H, T, D, L, S = ctx.shape
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        R, C = T // S, L // S
        dy = dy.reshape(B * H, R, -1)
        dh = torch.bmm(dy, w2.repeat(B, 1, 1).mT if B > 1 else w2.mT).mul_(hidden > 0)
        dw2 = torch.bmm(hidden.mT, dy).view(B, H, *w2.shape[1:]).sum(0)
        db2 = dy.to(acc).sum(1).view(B, H, -1).sum(0).to(dy.dtype)
        db1f = dh.to(acc).sum(1).view(B, H, -1).sum(0)
        # b1 + flat(pe) @ w1 is the bias of every window: pe's share of dw1 is flat(pe)^T db1
        dw1 = (torch.bmm(A.mT, dh).view(B, H, *w1.shape[1:]).sum(0).to(acc)
               + pe.to(acc).flatten(1)[:, :, None] * db1f[:, None, :]).to(dy.dtype)
        dpe = torch.einsum("hf,hkf->hk", db1f, w1.to(acc)).view(H, L, D).to(dy.dtype)
        dA = torch.bmm(dh, w1.repeat(B, 1, 1).mT if B > 1 else w1.mT).view(B * H, R, C, S * D)
        dxp = torch.zeros(B * H, R + C - 1, S * D, dtype=acc, device=dy.device)
        for c in range(C):                   # window r's chunk c is token chunk r + c of the padded stream
            dxp[:, c:c + R] += dA[:, :, c]
        dx = dxp.view(B * H, (R + C - 1) * S, D)[:, L - S:].reshape(B, H, T, D).to(dy.dtype)
        return dx, dw1, db1f.to(dy.dtype), dw2, db2, dpe, None, None


def gemm_mlp(x, w1, b1, w2, b2, *, block_size, stride, pe, **_):
    return _MlpGemm.apply(x, w1, b1, w2, b2, pe, block_size, stride)


def kvcompress_gemm(x, *p, **k):
    return kf.mlp(x, *p, backend="gemm", **k)


# RMS relative error against the float32 torch backend that --dry-run accepts (bf16 inputs, the
# hidden layer rounded once: the variants here measure ~3e-3)
DRY_RUN_TOL = 2e-2
LEAF_NAMES = ("x", "w1", "b1", "w2", "b2", "pe")


def _rms_rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300))


def _grads(fn, leaves, gy, kw):
    """The gradients of every leaf of fn's output against gy."""
    xl, *ps, pel = leaves
    out = fn(xl, *ps, **dict(kw, pe=pel))
    return torch.autograd.grad(out, leaves, gy)


def dry_run(dev: str) -> int:
    """A small shape on ``dev``, no timing: every variant that runs there
    against the float32 torch backend, forward and (kvcompress-gemm, gemm)
    gradients. Returns the process exit status."""
    dt = torch.bfloat16
    B, H, T, D, L, S = 1, 4, 256, 16, 32, 16
    F = L * D
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    x = rnd(B, T, H, D).transpose(1, 2)
    params = [rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F, scale=0.1), rnd(H, F, D, scale=F ** -0.5),
              rnd(H, D, scale=0.1)]
    pe = rnd(H, L, D)
    kw = dict(block_size=L, stride=S, padding="left")
    leaves = [t.detach().float().requires_grad_() for t in (x, *params, pe)]
    y_ref = kf.mlp(*leaves[:5], backend="torch", pe=leaves[5], **kw)
    gy = torch.randn(y_ref.shape, generator=g, device=dev).to(dt)
    want = torch.autograd.grad(y_ref, leaves, gy.float())
    variants = {"kvcompress-gemm": kvcompress_gemm}
    if dev == "cuda":
        variants["gemm"] = gemm_mlp        # the probe's own cuBLAS variant (CUDA kernels only for bf16 bias adds)
    worst = 0.0
    for name, fn in variants.items():
        with torch.no_grad():
            err = _rms_rel(fn(x, *params, pe=pe, **kw), y_ref.detach())
        got = _grads(fn, [t.detach().requires_grad_() for t in (x, *params, pe)], gy, kw)
        gerr = {n: _rms_rel(a, b) for n, a, b in zip(LEAF_NAMES, got, want)}
        # every forward is held to the tolerance; the gradients of kvcompress-gemm (the probe's own
        # gemm variant computes its backward in bf16: its gradient errors are reported, not judged)
        worst = max(worst, err, *(gerr.values() if name == "kvcompress-gemm" else ()))
        print(name, json.dumps({"rms_rel_err": err, "grad_rms_rel_err": gerr}))
    ok = worst <= DRY_RUN_TOL
    print(f"dry run on {dev}: worst RMS relative error {worst:.2e} ({'ok' if ok else 'FAILED'}, tolerance "
          f"{DRY_RUN_TOL:g})")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--host", action="store_true",
                    help="only kvcompress-gemm: host time per call (issued without waiting), the GPU's busy time "
                         "(CUDA events), and any synchronising call (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, list kvcompress-gemm's kernels (forward, then forward + backward) by GPU time")
    ap.add_argument("--dry-run", action="store_true",
                    help="a small shape, every variant checked against the torch backend, nothing timed (no GPU "
                         "needed)")
    a = ap.parse_args(argv)
    if a.dry_run:
        return dry_run("cuda" if torch.cuda.is_available() else "cpu")

    import triton

    from kvcompress.testing.adapters import seed

    dev, dt = "cuda", torch.bfloat16
    B, H, T, D, L, S = 1, 4, a.T, a.D, 32, 16
    F = L * D
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    x = rnd(B, T, H, D).transpose(1, 2)                                    # bthd storage
    w1, b1 = rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F, scale=0.1)
    w2, b2 = rnd(H, F, D, scale=F ** -0.5), rnd(H, D, scale=0.1)
    pe = rnd(H, L, D)
    kw = dict(block_size=L, stride=S, padding="left", pe=pe)
    with torch.no_grad():
        ref = kf.mlp(x.float(), w1.float(), b1.float(), w2.float(), b2.float(), backend="torch",
                     **dict(kw, pe=pe.float())).double()

    def triton_mlp(x, *p, **k):
        return kf.mlp(x, *p, backend="triton", **k)

    if a.host:
        return _host(kvcompress_gemm, x, (w1, b1, w2, b2), kw)
    variants = {"triton": triton_mlp, "kvcompress-gemm": kvcompress_gemm, "gemm": gemm_mlp, "seed": seed.mlp,
                "seed+compile": torch.compile(seed.mlp, dynamic=False)}
    # the floor: the forward's flops at the rate of a bf16 bmm of the first layer's shape
    Am, Bm = rnd(H, T // S, L * D), rnd(H, L * D, F)
    ms = triton.testing.do_bench(lambda Am=Am, Bm=Bm: torch.bmm(Am, Bm), warmup=25, rep=100)
    rate = 2 * H * (T // S) * L * D * F / (ms * 1e-3)
    flops = 2 * B * H * (T // S) * (L * D * F + F * D)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": dict(B=B, H=H, T=T, D=D, L=L, S=S, F=F), "bmm_tflops": rate / 1e12,
           "floor_fwd_ms": flops / rate * 1e3, "floor_fb_ms": 3 * flops / rate * 1e3, "variants": {}}
    print(f"{out['device']}: bf16 bmm {rate / 1e12:.0f} TFLOP/s; floor fwd {out['floor_fwd_ms']:.3f} ms, "
          f"f+b {out['floor_fb_ms']:.3f} ms")
    del Am, Bm
    leaves = [t.detach().requires_grad_() for t in (x, w1, b1, w2, b2, pe)]
    for name, fn in variants.items():
        r = {}
        try:
            with torch.no_grad():
                y = fn(x, w1, b1, w2, b2, **kw)
                err = (y.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
                r["rms_rel_err"] = float(err)
                r["fwd_ms"] = triton.testing.do_bench(lambda fn=fn: fn(x, w1, b1, w2, b2, **kw), warmup=25,
                                                      rep=100)
            xl, *ps, pel = leaves
            gy = torch.randn(y.shape, generator=g, device=dev).to(dt)
            del y

            def fb(fn=fn, xl=xl, ps=ps, pel=pel, gy=gy):
                out_ = fn(xl, *ps, **dict(kw, pe=pel))
                out_.backward(gy)

            if name == "kvcompress-gemm":     # its gradients against the torch backend's in float32
                got = _grads(fn, leaves, gy, kw)
                want = _grads(lambda *t, **k: kf.mlp(*t, backend="torch", **k),
                              [t.detach().float().requires_grad_() for t in leaves], gy.float(), kw)
                r["grad_rms_rel_err"] = {n: _rms_rel(a_, b_) for n, a_, b_ in zip(LEAF_NAMES, got, want)}
                del got, want
            r["fb_ms"] = triton.testing.do_bench(fb, warmup=10, rep=100, grad_to_none=leaves)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fb()
            r["fb_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        except Exception as e:                      # a variant that cannot run is reported, not fatal
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out["variants"][name] = r
        print(name, json.dumps(r))
    best = {k: min((v[k] for n, v in out["variants"].items() if n.startswith("seed") and k in v), default=math.nan)
            for k in ("fwd_ms", "fb_ms")}
    for name, v in out["variants"].items():
        if "fwd_ms" in v and "fb_ms" in v:
            print(f"{name:14s} fwd {v['fwd_ms']:.3f} ms ({best['fwd_ms'] / v['fwd_ms']:.2f}x best seed, "
                  f"{v['fwd_ms'] / out['floor_fwd_ms']:.2f}x floor)  f+b {v['fb_ms']:.3f} ms "
                  f"({best['fb_ms'] / v['fb_ms']:.2f}x, {v['fb_ms'] / out['floor_fb_ms']:.2f}x floor)  "
                  f"rms {v['rms_rel_err']:.2e}  peak extra {v['fb_peak_extra_mib']:.0f} MiB")
    if a.profile:
        _profile(kvcompress_gemm, x, (w1, b1, w2, b2), kw, leaves)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


def _host(fn, x, params, kw):
    """Host microseconds to issue one forward and one forward + backward of
    fn (20 calls queued without waiting, after a warm-up), against the wall
    time per call with the GPU's work included; then one forward + backward
    under torch.cuda.set_sync_debug_mode("warn"), printing every
    synchronising call."""
    import time
    import warnings
    leaves = [t.detach().requires_grad_() for t in (x, *params, kw["pe"])]
    xl, *ps, pel = leaves

    def fwd():
        with torch.no_grad():
            fn(x, *params, **kw)

    def fb():
        y = fn(xl, *ps, **dict(kw, pe=pel))
        y.backward(torch.ones_like(y))
        for t in leaves:
            t.grad = None
    for name, f in (("forward", fwd), ("forward + backward", fb)):
        f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{name}: host {1e3 * (t1 - t0) / 20:.3f} ms per call issued, wall {1e3 * (t2 - t0) / 20:.3f} ms per call")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fb()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"synchronising calls in one forward + backward: {len(syncs)}")
    for m in syncs[:10]:
        print("  ", m)
    return 0


def _profile(fn, x, params, kw, leaves):
    """torch.profiler over three calls each of fn's forward and forward +
    backward: every kernel with its total GPU time, largest first."""
    from torch.profiler import ProfilerActivity, profile
    xl, *ps, pel = leaves
    for label in ("forward", "forward + backward"):
        def call():
            if label == "forward":
                with torch.no_grad():
                    fn(x, *params, **kw)
            else:
                y = fn(xl, *ps, **dict(kw, pe=pel))
                y.backward(torch.ones_like(y))
                for t in leaves:
                    t.grad = None
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
        print(f"--- kvcompress-gemm {label}, 3 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    raise SystemExit(main())
