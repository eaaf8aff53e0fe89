#!/usr/bin/env python
"""attention_pool's Triton kernels at the NSA shape, one launch
configuration at a time (issue 14 item 3): where the forward's and the
backward's time goes, and whether another configuration or more programs
would do better than the autotuner's pick.

For every configuration of the forward and of each backward pass (the dx
pass; the dW pass with and without pe's column sums) the script compiles it
alone, reads its registers and spills from the compiled kernel, and times
it (``triton.testing.do_bench`` median, ms). The backward passes are also
timed with more programs per (b, h) row than ``bwd_programs`` gives, and
the tuned forward + backward once. (Its per-kernel profile beside the
peers: ``scripts/kind_profile.py --kind attention_pool``.)

NSA shape: bfloat16, B = 1, H = 4, T = 131072, D = 128, L = 32, S = 16,
padding "left", pe on, keys (B, T, H, D), weights per head (G = H).
``--dry-run``: a tiny shape through the interpreter (CPU), nothing timed.

    python3 scripts/ap_sweep.py [--T 131072] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FWD = [(bk, bc, nw, st) for bk, bc, nw, st in [
    (128, 32, 8, 2), (128, 32, 8, 3), (128, 32, 8, 1), (32, 128, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2),
    (64, 32, 8, 3), (64, 32, 4, 2), (128, 16, 8, 2), (128, 16, 4, 2), (256, 16, 8, 2), (64, 16, 4, 2),
    (32, 64, 4, 3), (32, 32, 4, 2), (16, 64, 4, 2), (32, 16, 2, 2)]]
BWD = [(32, 8, 2), (32, 8, 3), (16, 8, 2), (16, 4, 2), (64, 8, 2), (32, 4, 2), (16, 4, 1), (64, 4, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    import triton

    import kvcompress.functional as kf
    from benchmarks.inputs import nsa_arguments
    from kvcompress.ops._triton.launch import cdiv, kernel_args, next_pow2, size_class, strides
    from kvcompress.ops._triton.plan import seq_plan
    from kvcompress.ops.attention_pool import triton_impl as ap_mod

    dev = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    T, D, L, S = (64, 16, 4, 2) if a.dry_run else (a.T, 128, 32, 16)
    B, H = 1, 4
    x, (w,), pe = nsa_arguments("attention_pool", B=B, H=H, T=T, D=D, L=L, S=S, dtype=torch.bfloat16, device=dev,
                                layout="bthd", pe=True)
    plan = seq_plan(x, block_size=L, stride=S, padding="left", cu_seqlens=None)
    fk, bk_ = ap_mod.attention_pool_fwd_kernel, ap_mod.attention_pool_bwd_kernel
    res: dict = {"shape": dict(B=B, H=H, T=T, D=D, L=L, S=S, dtype="bfloat16", pe=True), "fwd": [], "bwd": []}
    if dev == "cuda":
        res["device"] = torch.cuda.get_device_name()

    def bench(fn):
        if dev != "cuda":
            fn()
            return float("nan")
        return triton.testing.do_bench(fn, warmup=10, rep=60)

    def compiled(kernel):
        """(registers, spills) of the kernel's one compiled variant (caches cleared before)."""
        try:
            cache = next(iter(kernel.device_caches.values()))[0]
            k = next(iter(cache.values()))
            k._init_handles()
            return int(k.n_regs), int(k.n_spills)
        except Exception as e:   # the interpreter compiles nothing
            return None, repr(e)[:60]

    # ------------------------------------------------------------ forward
    _, stats, cpe = ap_mod._forward(x, w, pe, plan, True)   # the stats and pe's logits the backward passes read
    rows = plan.W
    BD = max(16, next_pow2(D))
    y = torch.empty((B, H, plan.W, D), dtype=x.dtype, device=dev)
    st2 = torch.empty_like(stats)
    lse, y32 = st2[:, :, :, 0], st2[:, :, :, 1]
    fargs = kernel_args(fk, x=x, w=w, cpe=cpe, pe=pe, y=y, lse=lse, y32=y32, **plan.seq_kwargs(),
                        **strides("sx", x, "bhtd"), **strides("sw", w, "gdc"), **strides("sp", pe, "hjd"),
                        **strides("sy", y, "bhwd"), **strides("sl", lse, "bhwd"), H=H, HG=1, D=D, C=plan.C,
                        WORK=size_class(B * H * plan.NQ))
    for cfg in (FWD if dev == "cuda" else FWD[:1]):
        bk, bc, nw, st = cfg
        if bk < 2 * plan.C_PAD:
            continue
        getattr(fk, "device_caches", {}).clear()
        grid = (cdiv(rows, bk - plan.C + 1), cdiv(D, bc), B * H)

        def run(bk=bk, bc=bc, nw=nw, st=st, grid=grid):
            fk[grid](*fargs, C_PAD=plan.C_PAD, BLOCK_K=bk, BLOCK_C=bc, BLOCK_D=BD, IS_VARLEN=False, HAS_PE=True,
                     HAS_LSE=True, DOT_F32=False, num_warps=nw, num_stages=st)
        t0 = time.time()
        try:
            run()
            ms = bench(run)
            ok = torch.allclose(st2, stats, rtol=0, atol=0) if dev == "cuda" else True
            regs, spills = compiled(fk)
            row = dict(cfg=cfg, ms=ms, regs=regs, spills=spills, same_as_tuned=bool(ok), grid=grid)
        except Exception as e:
            row = dict(cfg=cfg, error=repr(e)[:200])
        row["compile_s"] = round(time.time() - t0, 1)
        res["fwd"].append(row)
        print("fwd", row, flush=True)

    # ------------------------------------------------------------ backward passes
    dy = torch.randn((B, H, plan.W, D), device=dev, generator=torch.Generator(device=dev).manual_seed(1)).to(x.dtype)
    lse, yy = stats[:, :, :, 0], stats[:, :, :, 1]
    bb = ap_mod.bwd_blocks(D, x.dtype)
    base_prog = ap_mod.bwd_programs(plan.NQ, B * H, ap_mod.num_sms(x.device, cpu=2))
    res["bwd_blocks"] = bb.__dict__ if hasattr(bb, "__dict__") else str(bb)
    res["base_programs"] = base_prog

    def bwd_launch(cfg, n_prog, need_dx, need_dw, need_p, block_c, ncb):
        bkk, nw, st = cfg
        dx = torch.empty_like(x)
        pw = torch.empty((B * H, n_prog, D, D), dtype=torch.float32, device=dev)
        pp = torch.empty((B * H, n_prog, 2, L, D), dtype=torch.float32, device=dev)
        args = kernel_args(bk_, x=x, w=w, cpe=cpe, pe=pe, dy=dy, y=yy, lse=lse, pw=pw, pp=pp, **plan.seq_kwargs(),
                           **strides("sx", x, "bhtd"), **strides("sw", w, "gdc"), **strides("sp", pe, "hjd"),
                           **strides("sd", dy, "bhwd"), **strides("sy", yy, "bhwd"), **strides("sl", lse, "bhwd"),
                           H=H, HG=1, D=D, WORK=size_class(B * H * plan.NQ), dx=dx, **strides("sg", dx, "bhtd"))
        grid = (n_prog, cdiv(D, block_c) if not need_dx else 1, B * H)

        def run():
            bk_[grid](*args, BLOCK_K=bkk, BLOCK_C=block_c, BLOCK_D=bb.BD, NCB=ncb, L_PAD=next_pow2(L),
                      IS_VARLEN=False, HAS_PE=True, NEED_DX=need_dx, NEED_DW=need_dw, NEED_PE=need_p,
                      HID_TF32=False, DOT_F32=False, num_warps=nw, num_stages=st)
        return run

    passes = [("dx", True, False, False, bb.dx_c, bb.ncb), ("dw+pe", False, True, True, bb.dw_c, 1),
              ("dw", False, True, False, bb.dw_c, 1)]
    for name, ndx, ndw, npe, bc, ncb in passes:
        for cfg in (BWD if dev == "cuda" else BWD[:1]):
            for mult in ((1, 2, 4) if cfg == BWD[0] else (1,)):
                n_prog = max(1, base_prog * mult) if dev == "cuda" else 1
                if mult == 1:
                    getattr(bk_, "device_caches", {}).clear()
                t0 = time.time()
                try:
                    run = bwd_launch(cfg, n_prog, ndx, ndw, npe, bc, ncb)
                    run()
                    ms = bench(run)
                    regs, spills = compiled(bk_)
                    row = dict(pass_=name, cfg=cfg, programs=n_prog, ms=ms, regs=regs, spills=spills)
                except Exception as e:
                    row = dict(pass_=name, cfg=cfg, programs=n_prog, error=repr(e)[:200])
                row["compile_s"] = round(time.time() - t0, 1)
                res["bwd"].append(row)
                print("bwd", row, flush=True)

    # ------------------------------------------------------------ one tuned forward + backward
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    pg = pe.detach().requires_grad_(True)

    def fb():
        yv = kf.attention_pool(xg, wg, block_size=L, stride=S, padding="left", pe=pg, backend="triton")
        yv.backward(dy)
    for _ in range(3):
        fb()
    res["tuned_fb_ms"] = bench(fb)
    res["tuned_fwd"] = {str(k): str(v) for k, v in ap_mod._FWD.best.items()}
    res["tuned_bwd"] = {str(k): str(v) for k, v in ap_mod._BWD.best.items()}
    print("tuned f+b ms", res["tuned_fb_ms"], res["tuned_fwd"], res["tuned_bwd"])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
