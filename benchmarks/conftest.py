"""pytest configuration of the benchmark suite (docs/benchmarks.md).

Options (all ``--kvbench-*``; pytest-benchmark's own ``--benchmark-*``
options work as usual, ``--benchmark-disable`` included):

- ``--kvbench-device auto|cpu|cuda``: where to run (auto: cuda if available).
- ``--kvbench-dtype NAME``: input dtype (default bfloat16 on cuda, float32 on cpu).
- ``--kvbench-sizes quick|default|record|full``: the shape set (benchmarks/configs.py).
- ``--kvbench-kinds LIST``: comma list of kinds (default: all).
- ``--kvbench-compile auto|on|off``: time the seed under torch.compile (auto:
  on, except with --benchmark-disable, where a compile would check nothing
  the eager run does not).
- ``--kvbench-compile-budget S``: seconds of compile warm-up allowed in total;
  compiled peers past it are skipped with that reason (0: no limit).
- ``--kvbench-deadline S``: seconds after which the remaining benchmarks are
  skipped with that reason, so a run always ends and writes its results (0: none).
  The decoding benchmarks (test_bench_decode.py) count their own S seconds
  from their first benchmark, so the compression benchmarks cannot use them up.
- ``--kvbench-threads N``: torch intra-op threads (default: $OMP_NUM_THREADS
  if set, else every CPU this process may use; the top-level conftest sets
  1 for the property suite).
- ``--kvbench-case-time S`` / ``--kvbench-round-time S``: timing per benchmark and per round.

On CUDA the pytest-benchmark timer becomes
``benchmarks.timing.cuda_synchronized_perf_counter`` unless another one
was given with ``--benchmark-timer``.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest
import torch

from kvcompress.testing.convert import DTYPES
from kvcompress.testing.records import KINDS

SYNC_TIMER = "benchmarks.timing.cuda_synchronized_perf_counter"


def pytest_addoption(parser):
    g = parser.getgroup("kvbench", "kvcompress benchmarks")
    g.addoption("--kvbench-device", default="auto", choices=("auto", "cpu", "cuda"),
                help="device to benchmark on (auto: cuda if available, else cpu)")
    g.addoption("--kvbench-dtype", default=None, choices=tuple(DTYPES),
                help="input dtype (default: bfloat16 on cuda, float32 on cpu)")
    g.addoption("--kvbench-sizes", default="default", choices=("quick", "default", "record", "full"),
                help="shape set: quick (one shape, for CI), default, full")
    g.addoption("--kvbench-kinds", default=None, metavar="LIST", help="comma list of kinds (default: all)")
    g.addoption("--kvbench-compile", default="auto", choices=("auto", "on", "off"),
                help="time the seed under torch.compile (auto: on unless --benchmark-disable)")
    g.addoption("--kvbench-compile-budget", type=float, default=0.0, metavar="S",
                help="total seconds of torch.compile warm-up; later compiled peers are skipped (0: no limit)")
    g.addoption("--kvbench-deadline", type=float, default=0.0, metavar="S",
                help="skip what remains after S seconds (0: no deadline)")
    g.addoption("--kvbench-threads", type=int, default=None, metavar="N",
                help="torch intra-op threads (default: $OMP_NUM_THREADS if set, else every CPU this process may use)")
    g.addoption("--kvbench-case-time", type=float, default=None, metavar="S",
                help="timed seconds per benchmark (default 0.3 on cuda, 0.4 on cpu)")
    g.addoption("--kvbench-round-time", type=float, default=None, metavar="S",
                help="seconds per round of back-to-back calls (default 0.05 on cuda, 0.01 on cpu)")


class KvBench:
    """The session's settings and shared state: argument sets of the current
    shape, the checker's cache, the ceilings, the compile budget, the deadline."""

    def __init__(self, config):
        from .checks import Checker

        opt = config.getoption
        device = opt("--kvbench-device")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--kvbench-device cuda: no CUDA device is available here")
        self.device = device
        self.dtype = opt("--kvbench-dtype") or ("bfloat16" if device == "cuda" else "float32")
        self.sizes = opt("--kvbench-sizes")
        kinds = opt("--kvbench-kinds")
        self.kinds = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else KINDS
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise pytest.UsageError(f"--kvbench-kinds takes a comma list of {KINDS}, got {kinds!r}")
        self.enabled = not (opt("benchmark_disable") and not opt("benchmark_enable"))
        mode = opt("--kvbench-compile")
        self.compile = mode == "on" or (mode == "auto" and self.enabled)
        self.compile_budget = opt("--kvbench-compile-budget")
        self.deadline = opt("--kvbench-deadline")
        gpu = device == "cuda"
        # CUDA rounds of 50 ms: a round of one call (every call over 2 ms had one with the former 2 ms rounds)
        # also times the host's head start before its first kernel, which steady-state calls hide; the likely
        # cause of GPU runs 60-61's gaps to do_bench (mlp's gemm forward 2.67 against 2.13 ms, the seed's eager
        # pipeline 4.20 against 2.95 ms, a one-kernel entrant within 6%); docs/benchmarks.md, "Timing"
        self.case_time = opt("--kvbench-case-time") or (0.3 if gpu else 0.4)
        self.round_time = opt("--kvbench-round-time") or (0.05 if gpu else 0.01)
        self.min_rounds = opt("benchmark_min_rounds")
        self.start = time.perf_counter()
        self._starts: dict[str, float] = {}
        self.compile_spent = 0.0
        self.checker = Checker()
        self._sets = (None, None)
        self._ceilings = None

    def sets(self, cfg):
        """The argument sets of cfg's shape (both directions share them)."""
        from .checks import head_tokens
        from .inputs import ArgumentSets

        key = (cfg.shape_key, cfg.device)
        if self._sets[0] != key:
            self._sets = (None, None)           # free the previous shape's sets first
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
            self._sets = (key, ArgumentSets(cfg.case, cfg.device, head_tokens=head_tokens(cfg.case),
                                            max_sets=16 if self.enabled else 1))
        return self._sets[1]

    def ceilings(self) -> dict | None:
        """Measured once, at the first timed benchmark (never when timing is off)."""
        from .timing import measure_ceilings

        if self._ceilings is None and self.enabled:
            self._ceilings = measure_ceilings(self.device, DTYPES[self.dtype])
        return self._ceilings

    def started(self, part: str) -> float:
        """When ``part`` of the suite (e.g. "decode") began: the time of the
        first call for it."""
        return self._starts.setdefault(part, time.perf_counter())

    def skip_reason(self, entrant, start: float | None = None) -> str | None:
        """Why ``entrant`` is not run now (the deadline counted from ``start``,
        default the session's start; the compile switch and budget), or None."""
        since = self.start if start is None else start
        if self.deadline and time.perf_counter() - since > self.deadline:
            return f"--kvbench-deadline of {self.deadline:.0f} s reached: not run"
        if entrant.compiled:
            if not self.compile:
                return ("torch.compile peers are off (--kvbench-compile=off, or auto with --benchmark-disable: "
                        "a compiled run would check nothing the eager one does not)")
            if self.compile_budget and self.compile_spent > self.compile_budget:
                return (f"the torch.compile budget (--kvbench-compile-budget {self.compile_budget:.0f} s) is spent "
                        f"({self.compile_spent:.0f} s): not compiled")
        return None

    def machine(self) -> dict:
        """The machine, for pytest-benchmark's machine_info (compared between
        saved runs: only what identifies the machine)."""
        info = {"device": self.device, "torch": torch.__version__, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads()}
        if self.device == "cuda":
            info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        return info

    def run_info(self) -> dict:
        """This run's settings and measurements, for the benchmark JSON."""
        return {"dtype": self.dtype, "sizes": self.sizes, "kinds": list(self.kinds), "compile": self.compile,
                "compile_seconds": self.compile_spent, "ceilings": self._ceilings, "case_time": self.case_time,
                "round_time": self.round_time, **self.machine()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads(config) -> int:
    n = config.getoption("--kvbench-threads")
    if n is not None:
        if n < 1:
            raise pytest.UsageError(f"--kvbench-threads must be >= 1, got {n}")
        return n
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_configure(config):
    # the top-level conftest runs the property suite on one thread (tiny ops);
    # benchmarks get the machine's threads back
    torch.set_num_threads(_threads(config))
    bench = KvBench(config)
    config._kvbench = bench
    # the quick set (CI) shortens the streaming benchmark's prefix too; it
    # reads the variable when its module is collected, after this hook
    if bench.sizes == "quick":
        os.environ.setdefault("KVCOMPRESS_BENCH_PREFIX", "512")
    # pytest-benchmark reads its timer in its own (trylast) pytest_configure, after this one
    if bench.device == "cuda" and config.getoption("benchmark_timer", None) == "time.perf_counter":
        config.option.benchmark_timer = SYNC_TIMER


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    from .configs import config_sets
    from .entrants import entrants_for

    bench = metafunc.config._kvbench
    items = [(cfg, e) for cfg in config_sets(bench.device, bench.dtype, bench.sizes, bench.kinds)
             for e in entrants_for(cfg)]
    metafunc.parametrize("bench_item", items, ids=[f"{cfg.id}-{e.name}" for cfg, e in items])


@pytest.fixture(scope="session")
def kvbench(pytestconfig) -> KvBench:
    """The session's KvBench."""
    return pytestconfig._kvbench


def pytest_benchmark_update_machine_info(config, machine_info):
    bench = getattr(config, "_kvbench", None)
    if bench is not None:
        machine_info["kvcompress"] = bench.machine()


def pytest_benchmark_generate_commit_info(config):
    """The checkout's commit, wherever pytest runs (kvcompress-bench runs it
    from its output directory)."""
    from pytest_benchmark.utils import get_commit_info

    cwd = os.getcwd()
    os.chdir(config.rootpath)
    try:
        return get_commit_info("kvcompress")
    finally:
        os.chdir(cwd)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    bench = getattr(config, "_kvbench", None)
    if bench is not None:
        output_json["kvcompress"] = bench.run_info()
