"""kvcompress's own host time per eager call, on the CPU, no GPU needed
(issue 14, item 2: "eager calls that cost microseconds on the host").

    python scripts/host_overhead.py [--kinds linear,mean_pool] [--calls 200] [--batches 7] [--json out.json]

Every call goes through ``kvcompress.functional.<kind>`` on tiny bfloat16
inputs (B = H = 1, T = 64, D = 16, L = 4, S = 2, left padding, pe and
biases on; mlp F = L*D; gated_pool with its gate scores z and bias, no
split). Columns, microseconds per call (median over ``--batches`` batches
of ``--calls`` calls each, time.perf_counter; the spread is the batches'
min-max):

- validate: ``functional._dispatch`` replaced by a no-op, so only the
  argument validation and the call's assembly run;
- triton fwd / f+b: backend="triton" under TRITON_INTERPRET=1 with every
  Triton kernel launch stubbed out (the interpreter's ``run`` is a no-op):
  every Python step before and between the launches runs (validation,
  dispatch, the op wrapper, plans, allocations, kernel arguments, the
  Launcher) but no kernel does, so the outputs are garbage. This is the
  share of a GPU call's host time that is kvcompress's own, plus torch's
  allocations and autograd (Triton's own launch cost on a GPU comes on
  top; the Launcher's GPU branch keys its autotuning cache instead of
  computing the interpreter's tiles, about the same work);
- torch fwd / f+b: backend="torch", computing for real (not stubbed),
  for comparison.

f+b is ``y = f(...); y.backward(dy)`` with every input a leaf requiring
grad, the gradients reset to None before each call (as
``zero_grad(set_to_none=True)``). torch runs on one thread, so that the
numbers vary less between runs. The whole table takes well under a minute.
Timing only: nothing is asserted (tests/test_host_path.py tests the
behaviour of the fast paths).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"      # read when kvcompress.ops._triton.env is imported: before kvcompress

KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool", "gated_pool")
COLUMNS = ("validate", "triton fwd", "triton f+b", "torch fwd", "torch f+b")


def inputs(kind, *, grad, dtype=None, B=1, H=1, T=64, D=16, L=4, S=2, seed=0):
    """(x, params, kw) of one tiny call of ``kind``: x (B, H, T, D), the
    kind's tensor arguments after x in signature order (G = H; biases on),
    and the keyword arguments but ``backend`` (pe (H, L, D) on where the
    kind takes it). Every tensor is a leaf requiring grad when ``grad``."""
    import torch
    dtype = dtype or torch.bfloat16
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    F = L * D
    x = rnd(B, H, T, D)
    params = {"mean_pool": lambda: [],
              "weighted_pool": lambda: [rnd(H, L, scale=1 / L)],
              "linear": lambda: [rnd(H, L, D, D, scale=(L * D) ** -0.5), rnd(H, D)],
              "mlp": lambda: [rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F), rnd(H, F, D, scale=F ** -0.5),
                              rnd(H, D)],
              "attention_pool": lambda: [rnd(H, D, D, scale=D ** -0.5)],
              "gated_pool": lambda: [rnd(B, H, T, D), rnd(H, L, D)]}[kind]()
    kw = dict(block_size=L, stride=S, padding="left")
    if kind != "gated_pool":
        kw["pe"] = rnd(H, L, D)
    if grad:
        for t in [x, *params, kw.get("pe")]:
            if t is not None:
                t.requires_grad_(True)
    return x, params, kw


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel launch (through a Launcher or ``kernel[grid](...)``)
    returns at once under the interpreter: the grid is not run."""
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def no_dispatch():
    """``kvcompress.functional`` validates, then returns None instead of dispatching."""
    import kvcompress.functional as kf
    dispatch = kf._dispatch
    kf._dispatch = lambda *args, **kwargs: None
    try:
        yield
    finally:
        kf._dispatch = dispatch


def time_us(step, *, calls, batches):
    """(median, min, max) microseconds per call of ``step`` over ``batches``
    batches of ``calls`` calls, after a warm-up batch."""
    for _ in range(max(calls // 4, 3)):
        step()
    per = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per), min(per), max(per)


def steps(kind):
    """{column: (step, context)}: the calls this script times for ``kind``."""
    import torch

    import kvcompress.functional as kf
    fn = getattr(kf, kind)
    out = {}
    x, params, kw = inputs(kind, grad=False)
    out["validate"] = (lambda: fn(x, *params, **kw, backend="torch"), no_dispatch)
    for backend, ctx in (("triton", stubbed_launches), ("torch", contextlib.nullcontext)):
        xg, pg, kwg = inputs(kind, grad=True)
        leaves = [t for t in (xg, *pg, kwg.get("pe")) if t is not None]
        with ctx():
            dy = torch.ones_like(fn(x, *params, **kw, backend=backend))

        def fwd(backend=backend):
            fn(x, *params, **kw, backend=backend)

        def fwdbwd(backend=backend, xg=xg, pg=pg, kwg=kwg, leaves=leaves, dy=dy):
            for t in leaves:
                t.grad = None
            fn(xg, *pg, **kwg, backend=backend).backward(dy)
        out[f"{backend} fwd"] = (fwd, ctx)
        out[f"{backend} f+b"] = (fwdbwd, ctx)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--calls", type=int, default=200, help="calls per batch (default 200)")
    p.add_argument("--batches", type=int, default=7, help="batches per measurement, the median is shown (default 7)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import kvcompress
    results = {}
    for kind in a.kinds.split(","):
        results[kind] = {}
        for col, (step, ctx) in steps(kind).items():
            calls = a.calls if col != "torch f+b" and col != "torch fwd" else max(a.calls // 2, 1)
            with ctx():
                results[kind][col] = time_us(step, calls=calls, batches=a.batches)
    print(f"kvcompress host us per eager call (torch {torch.__version__}, {os.path.dirname(kvcompress.__file__)}; "
          f"median of {a.batches} batches, [min-max])\n")
    print("| kind | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for kind, row in results.items():
        print(f"| {kind} | " + " | ".join(f"{row[c][0]:.1f} [{row[c][1]:.0f}-{row[c][2]:.0f}]" for c in COLUMNS)
              + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
