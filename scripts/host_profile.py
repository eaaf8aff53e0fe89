"""Where the host time of one call goes: cProfile over many calls on tiny
inputs (the GPU finishes each kernel long before the CPU issues the next, so
the wall time is host time), forward and forward + backward, through
``kvcompress.functional`` with backend="triton".

    python3 scripts/host_profile.py [--kinds mean_pool,linear,mlp@gemm] [--calls 2000] [--out DIR]

A kind is run with backend="triton", or with the backend named after "@"
(``mlp@gemm``: mlp's cuBLAS backend, at G = H = 4 heads, where its per-group
loop runs four times; the other kinds at one head).

Prints per kind the wall microseconds per call without the profiler, then
the profile's top functions by own time (tottime) and by cumulative time.
On a machine without CUDA it runs the interpreter on the CPU, which only
checks that the script works (the interpreter's own time dominates).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool", "gated_pool")


def inputs(kind, device, dtype, grad, heads=1):
    """Tiny inputs (B = 1, H = G = ``heads``, T = 64, D = 16, L = 4, S = 2, pe
    and biases on) from scripts/gpu_perf.py's ``make``: x, the kind's
    parameters, pe."""
    import gpu_perf  # scripts/ is on sys.path
    gpu_perf.DEVICE = device
    return gpu_perf.make(kind, B=1, H=heads, T=64, D=16, L=4, S=2, dtype=dtype, layout="bhtd", pe=True, bias=True,
                         grad=grad)


def main(argv=None) -> int:
    import torch

    import kvcompress.functional as kf
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = a.calls if device == "cuda" else 3
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report = io.StringIO()

    def say(s=""):
        print(s, flush=True)
        report.write(s + "\n")

    say(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'interpreter'}), torch "
        f"{torch.__version__}, {calls} calls a measurement")
    for spec in a.kinds.split(","):
        kind, _, backend = spec.partition("@")
        backend = backend or "triton"
        fn = getattr(kf, kind)
        heads = 4 if backend == "gemm" else 1
        x, params, pe = inputs(kind, device, torch.bfloat16, grad=False, heads=heads)
        xg, pg, peg = inputs(kind, device, torch.bfloat16, grad=True, heads=heads)
        kw = dict(block_size=4, stride=2, padding="left", backend=backend)
        kwg = kw                        # gated_pool takes no pe (its bias takes pe's place)
        if kind != "gated_pool":
            kw, kwg = dict(kw, pe=pe), dict(kw, pe=peg)
        dy = torch.ones_like(fn(x, *params, **kw))

        def fwd(fn=fn, x=x, params=params, kw=kw):
            fn(x, *params, **kw)

        def fwdbwd(fn=fn, xg=xg, pg=pg, kwg=kwg, dy=dy):           # keywords built once, not in the timed call
            fn(xg, *pg, **kwg).backward(dy)
        for name, step in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            for _ in range(3):
                step()                              # compile, autotune
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            us = (time.perf_counter() - t0) / calls * 1e6
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                step()
            sync()
            prof.disable()
            say(f"\n### {spec} {name}: {us:.1f} us a call (wall, no profiler)")
            for order in ("tottime", "cumulative"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).strip_dirs().sort_stats(order).print_stats(a.top)
                body = s.getvalue()
                body = body[body.find("ncalls"):] if "ncalls" in body else body
                say(f"-- by {order} (per {calls} calls)\n{body.rstrip()}")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "host_profile.txt").write_text(report.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
