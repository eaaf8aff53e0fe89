"""kvcompress-verify: the project's main job.

Runs the conformance properties (values against the loop reference,
invariants, gradients) for every registered backend, or for callables given
with ``--impl KIND=module:callable``, and prints one row per kind x
implementation x dtype: examples run, the worst error as a fraction of its
tolerance, pass/fail, and the time per example of the implementation next
to the reference's. Exits non-zero on any failure; ``--json PATH`` writes
the same report for CI.

It drives the property suite in ``tests/`` of a source checkout (the suite
needs the reference in ``reference/`` and the test extra:
``pip install -e ".[test]"``).

    kvcompress-verify                       # every built-in backend, ci profile
    kvcompress-verify --thorough            # the thorough Hypothesis profile
    kvcompress-verify --impl linear=my_pkg.kernels:linear --impl-dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROPERTY_FILES = ("tests/test_conformance.py", "tests/test_invariants.py", "tests/test_gradients.py")


def _checkout() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not all((root / f).is_file() for f in PROPERTY_FILES) or not (root / "reference").is_dir():
        raise SystemExit("kvcompress-verify: needs a source checkout of kvcompress (tests/ and reference/ beside "
                         f"the package); none found at {root}. Clone the repository and `pip install -e '.[test]'`.")
    return root


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU; torch {torch.__version__})"


class _Collector:
    """A pytest plugin: outcome of every test item by (impl id, dtype), and a
    progress bar on stderr."""

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.done = 0
        self.outcomes: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
        self.failures: list[str] = []
        self.t0 = time.perf_counter()

    def pytest_collection_modifyitems(self, session, config, items):
        self.total = len(items)

    def pytest_runtest_makereport(self, item, call):
        if call.when != "call" and not (call.when == "setup" and call.excinfo is not None):
            return
        params = getattr(getattr(item, "callspec", None), "params", {})
        impl = params.get("impl")
        if impl is None:
            return
        dtype = params.get("dtype", "*")   # "*": a property run once for all dtypes (gradcheck: float64)
        prop = item.originalname if hasattr(item, "originalname") else item.name
        if call.excinfo is None:
            outcome = "passed"
        elif call.excinfo.errisinstance(__import__("pytest").skip.Exception):
            outcome = "skipped"
        else:
            outcome = "failed"
            self.failures.append(item.nodeid)
        prev = self.outcomes[(impl.id, dtype)].get(prop)
        if prev != "failed":
            self.outcomes[(impl.id, dtype)][prop] = outcome

    def pytest_runtest_logfinish(self, nodeid, location):
        self.done += 1
        if self.stream.isatty() or os.environ.get("KVCOMPRESS_PROGRESS"):
            width = 30
            filled = width * self.done // max(self.total, 1)
            el = time.perf_counter() - self.t0
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                              f"{el:5.0f}s {nodeid.split('::')[-1][:60]:<60}")
            self.stream.flush()
        elif self.done % 25 == 0 or self.done == self.total:
            self.stream.write(f"  {self.done}/{self.total} property runs done "
                              f"({time.perf_counter() - self.t0:.0f} s)\n")
            self.stream.flush()


def _matrix(collector, stats):
    rows = []
    for (impl_id, dtype), props in sorted(collector.outcomes.items()):
        if dtype == "*":
            continue
        props = {**collector.outcomes.get((impl_id, "*"), {}), **props}
        kind, _, name = impl_id.partition("-")
        conf = stats.get(f"matches_reference|{impl_id}|{dtype}", {})
        grads = stats.get(f"gradients|{impl_id}|{dtype}", {})
        n = conf.get("examples", 0)
        t_impl = conf.get("impl_seconds", 0.0) / n if n else float("nan")
        t_ref = conf.get("reference_seconds", 0.0) / n if n else float("nan")
        rows.append({
            "kind": kind, "backend": name, "dtype": dtype, "examples": n,
            "worst_error_over_tolerance": conf.get("worst_ratio", float("nan")),
            "worst_gradient_error_over_tolerance": grads.get("worst_ratio", float("nan")) if grads else None,
            "first_failure_example": conf.get("first_failure"),
            "ms_per_example": 1e3 * t_impl, "reference_ms_per_example": 1e3 * t_ref,
            "properties": {("matches_reference" if p == "test_matches_reference" else p): v
                           for p, v in props.items()},
            "passed": all(v != "failed" for v in props.values()),
        })
    return rows


def _print(rows, machine, seconds, profile, out=sys.stdout):
    out.write(f"\nkvcompress-verify on {machine}, Hypothesis profile '{profile}', {seconds:.0f} s\n\n")
    head = (f"{'kind':<15}{'backend':<24}{'dtype':<10}{'examples':>9}{'err/tol':>9}{'grad err/tol':>13}"
            f"{'ms/ex':>8}{'ref ms/ex':>10}  result")
    out.write(head + "\n" + "-" * len(head) + "\n")
    for r in rows:
        g = r["worst_gradient_error_over_tolerance"]
        failed = [p for p, v in r["properties"].items() if v == "failed"]
        out.write(f"{r['kind']:<15}{r['backend'][:23]:<24}{r['dtype']:<10}{r['examples']:>9}"
                  f"{r['worst_error_over_tolerance']:>9.3f}{'-' if g is None else f'{g:.3f}':>13}"
                  f"{r['ms_per_example']:>8.2f}{r['reference_ms_per_example']:>10.2f}  "
                  + ("pass" if r["passed"] else "FAIL: " + ", ".join(failed)) + "\n")
    n_fail = sum(not r["passed"] for r in rows)
    out.write(f"\n{len(rows) - n_fail} of {len(rows)} kind x backend x dtype combinations pass"
              + ("" if not n_fail else f"; {n_fail} FAIL (rerun the failing test ids shown above with pytest "
                                        "for the shrunk counterexample)") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvcompress-verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", action="append", default=[], metavar="KIND=module:callable",
                    help="verify this callable instead of the built-in backends (repeatable)")
    ap.add_argument("--impl-device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--impl-dtypes", default=None, metavar="LIST", help="comma list (default: all four)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select a subset")
    ap.add_argument("--thorough", action="store_true", help="use the thorough Hypothesis profile (long)")
    ap.add_argument("--profile", default=None, help="Hypothesis profile name (dev, ci, thorough)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")
    ap.add_argument("--pytest-args", default="", help="extra arguments for pytest, one string")
    args = ap.parse_args(argv)

    try:
        import pytest
    except ImportError:
        raise SystemExit("kvcompress-verify needs the test extra: pip install -e '.[test]'") from None
    root = _checkout()
    profile = args.profile or ("thorough" if args.thorough else os.environ.get("KVCOMPRESS_PROFILE", "ci"))
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        os.environ["KVCOMPRESS_REPORT"] = report_path
        os.environ["KVCOMPRESS_PROFILE"] = profile
        pargs = [str(root / f) for f in PROPERTY_FILES]
        pargs += ["-q", "-p", "no:cacheprovider", "--no-header", "--tb=line", f"--rootdir={root}",
                  f"--hypothesis-profile={profile}"]
        for spec in args.impl:
            pargs += ["--impl", spec]
        if args.impl_device:
            pargs += ["--impl-device", args.impl_device]
        if args.impl_dtypes:
            pargs += ["--impl-dtypes", args.impl_dtypes]
        if args.keyword:
            pargs += ["-k", args.keyword]
        pargs += args.pytest_args.split()
        collector = _Collector(sys.stderr)
        t0 = time.perf_counter()
        sys.path.insert(0, str(root))
        code = pytest.main(pargs, plugins=[collector])
        seconds = time.perf_counter() - t0
        stats = json.loads(Path(report_path).read_text()) if os.path.exists(report_path) else {}
    if code in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.NO_TESTS_COLLECTED):
        sys.stderr.write(f"kvcompress-verify: pytest stopped with {code!r}\n")
        return int(code)
    rows = _matrix(collector, stats)
    machine = _machine()
    _print(rows, machine, seconds, profile)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine, "profile": profile, "seconds": seconds,
                                                    "pytest_exit_code": int(code), "rows": rows,
                                                    "failed_tests": collector.failures}, indent=1))
    ok = code == pytest.ExitCode.OK and all(r["passed"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
