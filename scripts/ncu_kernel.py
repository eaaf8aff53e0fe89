#!/usr/bin/env python
"""One call of a kind's Triton kernels at the NSA shape inside an NVTX range
"measured", after warm-up calls (autotuning, compilation), for Nsight
Compute to profile only the tuned kernels:

    ncu --nvtx --nvtx-include "measured/" --clock-control none \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 scripts/ncu_kernel.py --kind attention_pool [--fwdbwd]

NSA shape: bfloat16, B = 1, H = 4, T = 131072 (``--T``), D = 128, L = 32,
S = 16, padding "left", pe on, keys laid out (B, T, H, D) (the layout
kvcompress-bench times), weights per head (G = H), biases on.
``--fwdbwd`` measures forward + backward (y.backward(dy)); else the
forward under torch.no_grad. ``--dry-run`` runs the same calls on a tiny
shape wherever torch runs (the interpreter on a CPU), with no range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", required=True)
    ap.add_argument("--fwdbwd", action="store_true")
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    import kvcompress.functional as kf
    from benchmarks.inputs import nsa_arguments
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T, D, L, S = (64, 16, 4, 2) if a.dry_run else (a.T, 128, 32, 16)
    x, params, pe = nsa_arguments(a.kind, B=1, H=4, T=T, D=D, L=L, S=S, dtype=torch.bfloat16, device=dev,
                                  layout="bthd", pe=True, bias=True, grad=a.fwdbwd)
    fn = getattr(kf, a.kind)

    def call():
        if a.fwdbwd:
            y = fn(x, *params, block_size=L, stride=S, padding="left", pe=pe, backend=a.backend)
            y.backward(torch.ones_like(y))
            for t in (x, *params, pe):
                if t is not None:
                    t.grad = None
        else:
            with torch.no_grad():
                fn(x, *params, block_size=L, stride=S, padding="left", pe=pe, backend=a.backend)

    for _ in range(3):
        call()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("measured")
    call()
    if dev == "cuda":
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    print(f"ncu_kernel: {a.kind} {'fwd+bwd' if a.fwdbwd else 'fwd'} at T = {T} done on {dev}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
