#!/usr/bin/env python
"""Where a benchmarked call's time goes, for any kind and entrant: the
per-kernel profile of kvcompress-bench's own configuration beside a peer's,
so that a miss in docs/bench/ gets its measured bottleneck in one call.

    python3 scripts/kind_profile.py --kind gated_pool [--setting 1] [--D 128] [--T 131072]
                                    [--entrants triton,deepseek-v4+compile] [--out profile.json]

The configuration, inputs and entrants are the benchmark suite's
(benchmarks/configs.py ``nsa_case``, benchmarks/inputs.py, benchmarks/
entrants.py): the NSA setting of the kind, its benchmark setting number
``--setting`` (gated_pool: 0 = CSA, L 8, S 4; 1 = HCA, L = S = 128), keys
(B, T, H, D), bfloat16 on CUDA. For each entrant and direction (fwd,
fwd+bwd, the call kvcompress-bench times, rotating its argument sets):
- ``triton.testing.do_bench`` median (ms), the steady-state time;
- a torch.profiler table of 5 calls: per kernel its device time per call,
  calls per call and share, and the host (CPU) time per call, sorted by
  device time.
The entrant's first call runs before any timing (compile, autotuning).
Nothing is checked here: kvcompress-bench's gate checks these entrants.
``--dry-run``: a tiny T on the CPU (float32, the interpreter for Triton
entrants), no do_bench, the profile's CPU side only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _profile(call, device: str, calls: int = 5) -> dict:
    """Per-kernel device time per call (us), sorted, and host time per call."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        if dev > 0:
            rows.append({"name": e.key[:90], "us_per_call": dev / calls, "calls_per_call": e.count / calls})
    rows.sort(key=lambda r: -r["us_per_call"])
    total = sum(r["us_per_call"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_call"] / total if total else 0.0
    host = sum(e.self_cpu_time_total for e in prof.key_averages()) / calls
    return {"kernels": rows[:25], "device_us_per_call": total, "host_us_per_call": host}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", required=True)
    ap.add_argument("--setting", type=int, default=0, help="the kind's benchmark setting number (default 0)")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--entrants", default=None,
                    help="comma list of entrant names (default: every kvcompress backend and peer of the setting)")
    ap.add_argument("--directions", default="fwd,fwd+bwd")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)

    from benchmarks.checks import head_tokens
    from benchmarks.configs import BenchConfig, nsa_case
    from benchmarks.entrants import NotApplicable, call_loop, entrants_for
    from benchmarks.inputs import ArgumentSets

    device = "cpu" if a.dry_run or not torch.cuda.is_available() else "cuda"
    dtype = "float32" if device == "cpu" else "bfloat16"
    D = 16 if a.dry_run else a.D
    T = max(64, 2 * nsa_case(a.kind, dtype, D, 64, a.setting).L) if a.dry_run else a.T   # two windows at least
    res = {"kind": a.kind, "setting": a.setting, "D": D, "T": T, "dtype": dtype, "device": device, "rows": []}
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    wanted = None if a.entrants is None else set(a.entrants.split(","))
    for direction in a.directions.split(","):
        cfg = BenchConfig(nsa_case(a.kind, dtype, D, T, a.setting), device, direction)
        grad = direction == "fwd+bwd"
        sets = ArgumentSets(cfg.case, device, head_tokens=head_tokens(cfg.case), max_sets=16 if device == "cuda"
                            else 2)
        for e in entrants_for(cfg):
            if wanted is not None and e.name not in wanted:
                continue
            row = {"entrant": e.name, "direction": direction, "label": e.label(cfg)}
            reason = e.skip_reason(cfg)
            if a.dry_run and e.family == "kvcompress":
                reason = None                                     # the interpreter runs the Triton entrants
            if e.compiled and device == "cpu":
                reason = "torch.compile is not run in the dry run"
            if reason:
                row["skipped"] = reason
                res["rows"].append(row)
                print(direction, e.name, "skipped:", reason, flush=True)
                continue
            try:
                call = call_loop(e.prepare(cfg, sets, grad), sets, grad)
                call()                                            # compile, autotune
                if device == "cuda":
                    import triton
                    call()
                    row["do_bench_ms"] = triton.testing.do_bench(call, warmup=25, rep=200)
                row.update(_profile(call, device, calls=2 if device == "cpu" else 5))
            except NotApplicable as err:
                row["skipped"] = str(err)
            except Exception as err:                              # report and go on to the next entrant
                row["error"] = repr(err)[:300]
            res["rows"].append(row)
            head = f"{direction} {e.name}: " + (f"{row['do_bench_ms']:.3f} ms, " if "do_bench_ms" in row else "")
            print(head + (f"device {row['device_us_per_call']:.0f} us/call, host {row['host_us_per_call']:.0f} "
                          f"us/call" if "kernels" in row else row.get("skipped", row.get("error", ""))), flush=True)
            for k in row.get("kernels", [])[:10]:
                print(f"    {k['us_per_call']:9.1f} us  x{k['calls_per_call']:<5.3g} {100 * k['share']:5.1f}%  "
                      f"{k['name']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
