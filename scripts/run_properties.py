"""Run each selected test of the property suite in a pytest process of its
own, several at a time, under one deadline, and summarise what each did.

Why not pytest-xdist: on the GPU a long profile (``thorough``, 1000 examples a
property) is cut by the lease's time limit, and an interrupted xdist session
raised INTERNALERROR and printed no summary at all (GPU run 9). Here every
test has its own process and log, so a test cut at the deadline loses only
itself; the summary gives each test's outcome, wall time and Hypothesis'
example counts (``--hypothesis-show-statistics``).

Usage (scripts/gpu_session.sh's ``thorough`` phase):

    python3 scripts/run_properties.py --deadline 540 --jobs 16 --out DIR -- \\
        kvcompress/testing/properties/test_conformance.py kvcompress/testing/properties/test_gradients.py \\
        -k triton --kvcompress-profile thorough

Everything after ``--`` goes to pytest, first to collect the test ids, then
to each test's run. Writes DIR/summary.md (a table) and DIR/tests.log (every
test's output, one after another). Exit status 0 iff every test passed.

``--split K --split-match TEXT`` runs each test whose id contains TEXT as K
processes instead of one, part i with ``--hypothesis-seed i`` and the
``thorough-part`` profile of ceil(``--examples`` / K) examples (conftest.py),
so a property too slow for one process within the deadline still gets its
``--examples`` random examples in all.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# slowest first (longest-processing-time order keeps the tail short): the
# nonlinear kinds' gradient properties take the longest
_ORDER = ("gradients", "mlp", "attention_pool", "linear", "weighted_pool", "mean_pool")


def collect(pytest_args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *pytest_args], capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(f"run_properties: no tests collected\n{out.stdout}\n{out.stderr}")
    return ids


def priority(test_id: str) -> int:
    return -sum(1 << (len(_ORDER) - i) for i, word in enumerate(_ORDER) if word in test_id)


def examples(log: str) -> str:
    """Hypothesis' statistics: passing / failing / invalid examples summed over
    its phases, or '-' when the test printed none (interrupted, not a property)."""
    counts = [0, 0, 0]
    found = False
    for m in re.finditer(r"(\d+) passing, (\d+) failing, and (\d+) invalid", log):
        found = True
        for i in range(3):
            counts[i] += int(m.group(i + 1))
    return "{} / {} / {}".format(*counts) if found else "-"


def run_one(test_id: str, pytest_args: list[str], limit: float, part=None, gpu=None) -> tuple[str, float, str]:
    """(outcome, seconds, log) of one test in its own process group, SIGINT at
    the limit; ``part`` = (seed, examples) runs one part of a split test;
    ``gpu`` (an index) makes that GPU the process' only visible one."""
    t0 = time.monotonic()
    args = [a for a in pytest_args if not (a.endswith(".py") or a.startswith("tests/"))]
    args = _strip_k(args)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if part is not None:
        args = _strip_profile(args) + ["--kvcompress-profile", "thorough-part", f"--hypothesis-seed={part[0]}"]
        env["KVCOMPRESS_PART_EXAMPLES"] = str(part[1])
    proc = subprocess.Popen([sys.executable, "-m", "pytest", test_id, "-q", "-p", "no:cacheprovider",
                             "--hypothesis-show-statistics", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    try:
        log, _ = proc.communicate(timeout=max(limit, 1))
        cut = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)           # pytest stops and still prints what ran
        try:
            log, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        cut = True
    seconds = time.monotonic() - t0
    if cut:
        outcome = "cut at the deadline"
    elif proc.returncode == 0:
        outcome = "skipped" if re.search(r"\b1 skipped\b", log) and " passed" not in log else "passed"
    else:
        outcome = "FAILED"
    return outcome, seconds, log


def _strip_profile(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--kvcompress-profile":
            skip = True
        elif not a.startswith("--kvcompress-profile="):
            out.append(a)
    return out


def _strip_k(args: list[str]) -> list[str]:
    """Selection options (-k EXPR) only select at collection; a test id is exact."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "-k":
            skip = True
            continue
        if a.startswith("-k") and len(a) > 2:
            continue
        out.append(a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deadline", type=float, default=540, help="seconds from start; tests still running get SIGINT")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", type=int, default=1, help="processes per test matched by --split-match")
    p.add_argument("--split-match", action="append", default=[],
                   help="split the tests whose id contains this (repeatable: any of them; default: all)")
    p.add_argument("--examples", type=int, default=1000, help="examples of a split test in all (thorough: 1000)")
    p.add_argument("--gpus", type=int, default=0,
                   help="spread the processes over this many GPUs (CUDA_VISIBLE_DEVICES), the least busy first; "
                        "0 leaves the environment's")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest paths and options")
    a = p.parse_args(argv)
    pytest_args = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
    start = time.monotonic()
    tests = sorted(collect(pytest_args), key=priority)
    # (row name, test id, part): a split test is several rows, one per seed
    jobs = []
    for t in tests:
        if a.split > 1 and (not a.split_match or any(m in t for m in a.split_match)):
            per = -(-a.examples // a.split)
            jobs += [(f"{t} [part {i + 1}/{a.split}, seed {i}]", t, (i, per)) for i in range(a.split)]
        else:
            jobs.append((t, t, None))
    ids = [j[0] for j in jobs]
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, tuple[str, float, str]] = {}
    lock = threading.Lock()
    busy = [0] * a.gpus                              # running processes per GPU
    on_gpu: dict[str, int] = {}

    def job(spec):
        test_id, real_id, part = spec
        left = a.deadline - (time.monotonic() - start)
        gpu = None
        if a.gpus:
            with lock:
                gpu = min(range(a.gpus), key=busy.__getitem__)
                busy[gpu] += 1
        if left < 5:
            res = ("not started (deadline)", 0.0, "")
        else:
            res = run_one(real_id, pytest_args, left, part, gpu)
        with lock:
            if gpu is not None:
                busy[gpu] -= 1
                on_gpu[test_id] = gpu
            results[test_id] = res
            print(f"[{time.monotonic() - start:6.0f} s] {res[0]:22s} {res[1]:6.0f} s  {examples(res[2]):>18s}  "
                  f"{test_id}", flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(job, jobs))
    gcol, gsep = (" GPU |", " --- |") if a.gpus else ("", "")
    rows = ["| test | outcome | seconds | examples passing / failing / invalid |" + gcol,
            "| --- | --- | --- | --- |" + gsep]
    rows += [f"| {t} | {results[t][0]} | {results[t][1]:.0f} | {examples(results[t][2])} |"
             + (f" {on_gpu.get(t, '-')} |" if a.gpus else "") for t in ids]
    counts: dict[str, int] = {}
    for o, _, _ in results.values():
        counts[o] = counts.get(o, 0) + 1
    total = time.monotonic() - start
    spread = f" over {a.gpus} GPUs" if a.gpus else ""
    head = (f"{len(tests)} tests in {len(ids)} processes, {a.jobs} at a time{spread}, {total:.0f} s: "
            + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + "\n\npytest " + " ".join(pytest_args))
    (a.out / "summary.md").write_text(head + "\n\n" + "\n".join(rows) + "\n")
    with open(a.out / "tests.log", "w") as f:
        for t in ids:
            f.write(f"\n===== {t}: {results[t][0]}, {results[t][1]:.0f} s\n{results[t][2]}")
    print(head)
    return 0 if all(r[0] in ("passed", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
