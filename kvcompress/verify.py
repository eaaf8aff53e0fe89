"""kvcompress-verify: the project's main job.

Runs the conformance properties (values against the loop reference,
invariants, gradients) for every registered backend (those emulated on this
device, such as Triton through its interpreter without a GPU, in a second
session with the smaller ci-emulated budget), or for callables given with
``--impl KIND=module:callable``, and prints one row per kind x
implementation x dtype: examples run, the worst error as a fraction of its
tolerance, pass/fail, and the time per example of the implementation next
to the reference's. Exits non-zero on any failure; ``--json PATH`` writes
the same report for CI.

It drives the property suite shipped in the package
(``kvcompress.testing.properties``, with the loop reference
``kvcompress_reference``): ``pip install "kvcompress[test]"`` is all it needs,
no clone, from any folder. The session is isolated from the folder's own
pytest configuration; the folder is on ``sys.path``, so ``--impl`` can name
a module in it.

    kvcompress-verify                       # every built-in backend, ci profile
    kvcompress-verify --thorough            # the thorough Hypothesis profile
    kvcompress-verify --impl linear=my_pkg.kernels:linear --impl-dtypes float32,bfloat16
    kvcompress-verify --impl weighted_pool=my_pkg:wp --domain weighted_pool=my_pkg:DOMAIN --xfails-file known.txt

``KVCOMPRESS_VERIFY_NATIVE_ONLY=1`` leaves out the emulated session (and says
so): this project's CI sets it, because its test command has just run the
same properties on the emulated backends with a larger budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROPERTIES = "kvcompress.testing.properties"


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
        self.emulated: set[str] = set()
        self.domains: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def merge(self, part: dict) -> None:
        """Add a session's outcomes (the JSON _run_session writes)."""
        for impl_id, dtype, props in part["outcomes"]:
            self.outcomes[(impl_id, dtype)].update(props)
        self.failures += part["failures"]
        self.emulated.update(part["emulated"])
        self.domains.update(part.get("domains", {}))

    def pytest_collection_modifyitems(self, session, config, items):
        self.total = len(items)

    def pytest_runtest_logreport(self, report):
        """Read the plugin's "kvcompress" tag of each property's report
        (kvcompress/testing/plugin.py): in this process, or on
        pytest-xdist's controller for reports from its workers."""
        if report.when != "call" and not (report.when == "setup" and not report.passed):
            return
        tag = next((v for k, v in report.user_properties if k == "kvcompress"), None)
        if tag is None:       # not an implementation's property
            return
        impl_id, dtype, prop = tag["impl"], tag["dtype"], tag["property"]
        if tag["emulated"]:
            self.emulated.add(impl_id)
        self.domains[impl_id] = tag["domain"]
        if hasattr(report, "wasxfail"):     # --xfails-file (or pytest.xfail()): a known failure
            outcome = "known failure" if report.skipped else "unexpectedly passed"
        elif report.skipped:
            outcome = "skipped"
        elif report.passed:
            outcome = "passed"
        else:
            outcome = "failed"
            self.failures.append(report.nodeid)
        prev = self.outcomes[(impl_id, dtype)].get(prop)
        if prev not in ("failed", "skipped"):
            self.outcomes[(impl_id, dtype)][prop] = outcome

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


# outcomes that let a row pass: a known failure (--xfails-file) keeps CI green
# and is shown; a skip never counts as a pass
PASSING = ("passed", "known failure", "unexpectedly passed", "not differentiable (declared forward only)")


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
        if impl_id in collector.emulated:
            name += " (interpreter)"
        domain = collector.domains.get(impl_id, "full")
        props = {("matches_reference" if p == "test_matches_reference" else p): v for p, v in props.items()}
        if not any(p.startswith("test_gradients") for p in props) and "forward only" in domain:
            props["gradients"] = "not differentiable (declared forward only)"
        strict = max(conf.get("worst_strict_ratio", float("inf")), grads.get("worst_strict_ratio", 0.0))
        rows.append({
            "kind": kind, "backend": name, "dtype": dtype, "domain": domain, "examples": n,
            # the tightest precision class (SPEC 3c) every checked example met, forward and gradients
            "precision_met": ("strict" if n and strict <= 1.0 else "io-intermediates"),
            "worst_error_over_strict_tolerance": conf.get("worst_strict_ratio", float("nan")),
            "worst_rms_ratio": conf.get("worst_rms_ratio"),
            "worst_error_over_tolerance": conf.get("worst_ratio", float("nan")),
            "worst_gradient_error_over_tolerance": grads.get("worst_ratio", float("nan")) if grads else None,
            "first_failure_example": conf.get("first_failure"),
            "ms_per_example": 1e3 * t_impl, "reference_ms_per_example": 1e3 * t_ref,
            "properties": props,
            "passed": all(v in PASSING for v in props.values()),
        })
    return rows


def _print(rows, machine, seconds, profile, out=sys.stdout):
    out.write(f"\nkvcompress-verify on {machine}, Hypothesis profile '{profile}', {seconds:.0f} s\n\n")
    head = (f"{'kind':<15}{'backend':<24}{'dtype':<10}{'examples':>9}{'err/tol':>9}{'grad err/tol':>13}"
            f"{'rms':>7}{'class':>8}{'ms/ex':>8}{'ref ms/ex':>10}  result")
    out.write(head + "\n" + "-" * len(head) + "\n")
    for r in rows:
        g, rms = r["worst_gradient_error_over_tolerance"], r["worst_rms_ratio"]
        props = r["properties"]
        failed = [p for p, v in props.items() if v not in PASSING]
        notes = [f"{v}: {p}" for p, v in props.items() if v in ("known failure", "unexpectedly passed")]
        if any(v.startswith("not differentiable") for v in props.values()):
            notes.append("forward only, gradients not checked")
        verdict = "pass" if r["passed"] else "FAIL: " + ", ".join(f"{p} ({props[p]})" if props[p] != "failed"
                                                                   else p for p in failed)
        out.write(f"{r['kind']:<15}{r['backend'][:23]:<24}{r['dtype']:<10}{r['examples']:>9}"
                  f"{r['worst_error_over_tolerance']:>9.3f}{'-' if g is None else f'{g:.3f}':>13}"
                  f"{'-' if rms is None else f'{rms:.3f}':>7}"
                  f"{(r['precision_met'] if r['passed'] else '-').replace('io-intermediates', 'io'):>8}"
                  f"{r['ms_per_example']:>8.2f}{r['reference_ms_per_example']:>10.2f}  "
                  + verdict + ("" if not notes else "  [" + "; ".join(notes) + "]") + "\n")
    out.write("\nerr/tol: worst error over the bound of the implementation's precision class (SPEC 3c); rms: the "
              "RMS quality check (float16/bfloat16, strict class; <= 1); class: the tightest class every example "
              "met (strict, or io = io-intermediates)\n")
    domains = sorted({(f"{r['kind']}-{r['backend']}", r["domain"]) for r in rows if r["domain"] != "full"})
    if domains:
        out.write("\ndeclared domains (properties ran only inside them):\n")
        for name, d in domains:
            out.write(f"  {name}: {d}\n")
    n_fail = sum(not r["passed"] for r in rows)
    out.write(f"\n{len(rows) - n_fail} of {len(rows)} kind x backend x dtype combinations pass"
              + ("" if not n_fail else f"; {n_fail} FAIL (rerun the failing test ids shown above with pytest "
                                        "for the shrunk counterexample)") + "\n")


def _run_session(args) -> int:
    """One pytest session in this process (``--_session exclude|only``);
    writes the collector's outcomes and the harness report to ``--_out``."""
    import pytest
    import torch

    from .testing._env import configure

    configure()   # before anything imports triton (the interpreter without a GPU)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)   # thousands of tiny ops: threads cost more than they save
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        ini = os.path.join(tmp, "pytest.ini")
        Path(ini).write_text("[pytest]\n")   # isolated from the current folder's pytest configuration
        pargs = ["--pyargs", PROPERTIES, "-c", ini, f"--rootdir={tmp}", "-q", "-p", "no:cacheprovider",
                 "--no-header", "--tb=line", f"--kvcompress-profile={args.profile}",
                 # this process imported kvcompress before pytest, so the plugin's asserts cannot be rewritten
                 "-W", "ignore::pytest.PytestAssertRewriteWarning",
                 f"--kvcompress-report={report_path}", "--emulated", args._session]
        for opt, values in (("--impl", args.impl), ("--domain", args.domain)):
            for v in values:
                pargs += [opt, v]
        for opt, val in (("--impl-device", args.impl_device), ("--impl-dtypes", args.impl_dtypes),
                         ("--xfails-file", args.xfails_file and os.path.abspath(args.xfails_file)),
                         ("-k", args.keyword)):
            if val:
                pargs += [opt, val]
        pargs += args.pytest_args.split()
        collector = _Collector(sys.stderr)
        code = pytest.main(pargs, plugins=[collector])
        stats = json.loads(Path(report_path).read_text()) if os.path.exists(report_path) else {}
    Path(args._out).write_text(json.dumps({
        "outcomes": [[k[0], k[1], v] for k, v in collector.outcomes.items()],
        "failures": collector.failures, "emulated": sorted(collector.emulated), "domains": collector.domains,
        "stats": stats}))
    return int(code)


def _has_emulated(device) -> bool:
    """Whether some registered backend is emulated on the device tests run on."""
    import torch

    from . import backends as kb

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return any(dev in b.emulated_devices and b.available() for k in kb.KINDS for b in kb.backends(k))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvcompress-verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", action="append", default=[], metavar="KIND=module:callable",
                    help="verify this callable instead of the built-in backends (repeatable)")
    ap.add_argument("--domain", action="append", default=[], metavar="KIND=module:attribute",
                    help="the kvcompress.testing.Domain of the --impl of KIND (else the one it declares)")
    ap.add_argument("--xfails-file", default=None, metavar="PATH",
                    help="known failures: one test id or glob per line (shown, not failed; a pass is reported)")
    ap.add_argument("--impl-device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--impl-dtypes", default=None, metavar="LIST", help="comma list (default: all four)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select a subset")
    ap.add_argument("--thorough", action="store_true", help="use the thorough Hypothesis profile (long)")
    ap.add_argument("--profile", default=None, help="Hypothesis profile name (dev, ci, thorough)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")
    ap.add_argument("--pytest-args", default="", help="extra arguments for pytest, one string")
    ap.add_argument("-n", "--workers", default=None, metavar="N",
                    help="run each session on N pytest-xdist workers (an int or 'auto'; the test extra has xdist)")
    ap.add_argument("--_session", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._session:
        return _run_session(args)

    try:
        import hypothesis  # noqa: F401
        import pytest
    except ImportError:
        raise SystemExit('kvcompress-verify needs the test extra: pip install "kvcompress[test]"') from None
    from .testing._env import configure

    configure()   # before anything imports triton (the interpreter without a GPU)
    profile = args.profile or ("thorough" if args.thorough else os.environ.get("KVCOMPRESS_PROFILE", "ci"))
    # Backends emulated on this device (Triton's interpreter without a GPU)
    # run in a second session with the ci-emulated budget (conftest.py).
    sessions = [("exclude", profile)]
    if not args.impl and _has_emulated(args.impl_device):
        if os.environ.get("KVCOMPRESS_VERIFY_NATIVE_ONLY", "") not in ("", "0"):
            sys.stderr.write("kvcompress-verify: emulated backends left out (KVCOMPRESS_VERIFY_NATIVE_ONLY is set)\n")
            print("emulated backends (Triton's interpreter) were left out: KVCOMPRESS_VERIFY_NATIVE_ONLY is set")
        else:
            sessions.append(("only", "ci-emulated" if profile == "ci" else profile))
    collector = _Collector(sys.stderr)
    code = pytest.ExitCode.OK
    t0 = time.perf_counter()
    stats = {}
    # each session in its own process: Hypothesis fixes a test's settings at
    # its first run, so one process cannot switch profiles between sessions
    with tempfile.TemporaryDirectory() as tmp:
        for i, (emulated, prof) in enumerate(sessions):
            out = os.path.join(tmp, f"session{i}.json")
            sys.stderr.write(f"kvcompress-verify: {'emulated backends' if emulated == 'only' else 'backends'}, "
                             f"Hypothesis profile {prof}\n")
            cmd = [sys.executable, "-m", "kvcompress.verify", "--_session", emulated, "--_out", out, "--profile", prof]
            for opt, values in (("--impl", args.impl), ("--domain", args.domain)):
                for v in values:
                    cmd += [opt, v]
            for opt, val in (("--impl-device", args.impl_device), ("--impl-dtypes", args.impl_dtypes),
                             ("--xfails-file", args.xfails_file), ("-k", args.keyword)):
                if val:
                    cmd += [opt, val]
            extra = args.pytest_args + ("" if args.workers is None else f" -n {args.workers}")
            if extra.strip():
                cmd.append(f"--pytest-args={extra.strip()}")   # one token: the value may start with "-"
            rc = subprocess.run(cmd).returncode
            if rc in (int(pytest.ExitCode.USAGE_ERROR), int(pytest.ExitCode.INTERNAL_ERROR)) or not os.path.exists(out):
                sys.stderr.write(f"kvcompress-verify: the pytest session stopped with exit code {rc}\n")
                return rc or 1
            part = json.loads(Path(out).read_text())
            collector.merge(part)
            stats.update(part["stats"])
            if rc not in (0, int(pytest.ExitCode.NO_TESTS_COLLECTED)) and code == pytest.ExitCode.OK:
                code = rc
    seconds = time.perf_counter() - t0
    if not collector.outcomes:
        sys.stderr.write("kvcompress-verify: no property ran (check -k and --impl)\n")
        return int(pytest.ExitCode.NO_TESTS_COLLECTED)
    rows = _matrix(collector, stats)
    machine = _machine()
    _print(rows, machine, seconds, " + ".join(p for _, p in sessions))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine, "profile": profile, "seconds": seconds,
                                                    "pytest_exit_code": int(code), "rows": rows,
                                                    "failed_tests": collector.failures}, indent=1))
    ok = code == pytest.ExitCode.OK and all(r["passed"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
