#!/usr/bin/env python
"""CPU time of the vectorized torch backend against the seed, for linear,
mlp, attention_pool and weighted_pool (issue 14, item 4), forward and
forward + backward; prints a markdown table.

    python scripts/cpu_formulations.py                           # every kind, T 2048/8192, D 64/128
    python scripts/cpu_formulations.py --kinds mlp --T 2048 --D 64 --repeats 3
    python scripts/cpu_formulations.py --root /tmp/old           # A/B: time the kvcompress package in /tmp/old

Case (the issue's): float32, B=1, H=4, L=32, S=16, padding "left", pe on,
D_out = D. Parameters are those of the seed each kind is compared with:
linear and mlp per head (G = H, as the seed's ConvLinearCompress and
GroupedMLP hold them), biases on, mlp with relu and F = L*D (GroupedMLP's
default expand_factor 1); attention_pool G = 1 (the seed's AttentionPool
holds one Linear for every head), its weight near the identity (the seed's
initialisation) plus noise; weighted_pool G = H, weight (H, L). torch's
thread count is left at its default (``OMP_NUM_THREADS=1`` steadies a
machine that others share).

"seed" is kvcompress/testing/adapters/seed.py: the seed's windowing (pad,
unfold, pe added to every window) and its module (ConvLinearCompress,
GroupedMLP, AttentionPool; needs the PyPI package
native-sparse-attention-pytorch==0.2.3), eager. weighted_pool has no seed
module: as in benchmarks/entrants.py, its seed is the same windows reduced
by ``torch.einsum("bhwnd,hn->bhwd")``. "torch" is
``kvcompress.functional.<kind>(..., backend="torch")``. Both are called in
one process, interleaved call by call (so that a neighbour's load on a
shared machine hits both alike), after one warm-up call each; each cell is
the median over ``--repeats`` calls, and the min columns the fastest call
(a check on a neighbour's bursts of load). Forward runs under
torch.no_grad; forward + backward is ``y = f(...); y.backward(g)`` with x,
the parameters and pe requiring grad (gradients reset to None between
calls). "speed-up" is seed / torch: above 1 the torch backend is faster.

``--root DIR`` puts DIR first on sys.path, so that ``import kvcompress``
finds the package in DIR/kvcompress (a copy of an older version, say)
instead of this checkout's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

KINDS = ("linear", "mlp", "attention_pool", "weighted_pool")


def make(kind, *, T, D, B=1, H=4, L=32, S=16, grad, seed=0):
    """x (B, H, T, D), the kind's parameters (a tuple, as the seed's adapter
    takes them) and pe (H, L, D), all float32, requiring grad when ``grad``."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, base=None):
        t = torch.randn(*shape, generator=g) * scale
        return (t if base is None else t + base).requires_grad_(grad)

    x = rnd(B, H, T, D)
    pe = rnd(H, L, D, scale=0.1)
    if kind == "linear":
        params = (rnd(H, L, D, D, scale=(L * D) ** -0.5), rnd(H, D, scale=0.1))
    elif kind == "mlp":
        F = L * D
        params = (rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F, scale=0.1),
                  rnd(H, F, D, scale=F ** -0.5), rnd(H, D, scale=0.1))
    elif kind == "attention_pool":
        params = (rnd(1, D, D, scale=D ** -0.5, base=torch.eye(D)),)
    else:
        params = (rnd(H, L, scale=L ** -0.5),)
    return x, params, pe


def seed_weighted_pool(x, weight, *, block_size, stride, padding, pe=None, cu_seqlens=None):
    """weighted_pool on the seed's windows (no seed module exists): x
    (B, H, T, D), weight (H, L) -> (B, H, W, D)."""
    import torch

    from kvcompress.testing.adapters import seed
    kv = seed.windows(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
    return torch.einsum("bhwnd,hn->bhwd", kv, weight)


def calls(kind, *, T, D, L=32, S=16):
    """{"seed": fwd, "torch": fwd} and the same for forward + backward: each
    a no-argument callable doing one call on its own inputs."""
    import torch

    import kvcompress.functional as kf
    from kvcompress.testing.adapters import seed
    kw = dict(block_size=L, stride=S, padding="left")
    fns = {"seed": seed_weighted_pool if kind == "weighted_pool" else getattr(seed, kind),
           "torch": lambda *a, **k: getattr(kf, kind)(*a, **k, backend="torch")}
    out = {}
    for name, fn in fns.items():
        x, params, pe = make(kind, T=T, D=D, grad=False)
        out[("fwd", name)] = (lambda fn=fn, x=x, params=params, pe=pe: fn(x, *params, pe=pe, **kw))
        xg, pg, peg = make(kind, T=T, D=D, grad=True)
        leaves = [xg, *pg, peg]
        gy = torch.randn(fn(xg, *pg, pe=peg, **kw).shape)

        def fb(fn=fn, xg=xg, pg=pg, peg=peg, leaves=leaves, gy=gy):
            for t in leaves:
                t.grad = None
            fn(xg, *pg, pe=peg, **kw).backward(gy)
        out[("fwdbwd", name)] = fb
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, from " + ",".join(KINDS))
    p.add_argument("--T", default="2048,8192", help="comma-separated sequence lengths")
    p.add_argument("--D", default="64,128", help="comma-separated head dimensions")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated, from fwd,fwdbwd")
    p.add_argument("--root", default=None, help="directory holding the kvcompress package to time")
    a = p.parse_args(argv)
    if a.root:
        sys.path.insert(0, os.path.abspath(a.root))
    import torch

    import kvcompress
    print(f"kvcompress from {os.path.dirname(kvcompress.__file__)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs; float32, B=1, H=4, L=32, S=16, left, pe on; "
          f"median of {a.repeats}\n")
    print("| kind | T | D | mode | seed ms | torch ms | speed-up | seed min | torch min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in a.kinds.split(","):
        for T in map(int, a.T.split(",")):
            for D in map(int, a.D.split(",")):
                fns = calls(kind, T=T, D=D)
                for mode in a.modes.split(","):
                    pair = [(name, fns[(mode, name)]) for name in ("seed", "torch")]
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        for _, fn in pair:      # warm-up: allocator, lazy imports, the seed's module cache
                            fn()
                        times = {name: [] for name, _ in pair}
                        for _ in range(a.repeats):
                            for name, fn in pair:
                                t0 = time.perf_counter()
                                fn()
                                times[name].append(time.perf_counter() - t0)
                    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
                    lo = {name: 1e3 * min(v) for name, v in times.items()}
                    print(f"| {kind} | {T} | {D} | {mode} | {ms['seed']:.1f} | {ms['torch']:.1f} | "
                          f"{ms['seed'] / ms['torch']:.2f}x | {lo['seed']:.1f} | {lo['torch']:.1f} |", flush=True)
                del fns
    return 0


if __name__ == "__main__":
    sys.exit(main())
