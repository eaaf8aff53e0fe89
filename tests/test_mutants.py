"""The mutation self-test: the property suite must reject every mutant in
``tests/mutants/`` and accept the built-in backends and the mutants' bug-free
controls.

Each implementation is verified exactly as a contributor would verify a
kernel, in a subprocess::

    python -m pytest kvcompress/testing/properties/test_conformance.py \\
        kvcompress/testing/properties/test_properties_extra.py \\
        kvcompress/testing/properties/test_invariants.py kvcompress/testing/properties/test_gradients.py \\
        kvcompress/testing/properties/test_production.py \\
        --impl KIND=tests.mutants.KIND:NAME -p no:cacheprovider -q -x -p tests.mutants._trace

with the deterministic ``ci`` Hypothesis profile. A mutant is killed when
its first failing property failed on an AssertionError of its own: exit
codes 2-4 (interrupted, internal error, usage error), a timeout, or a mutant
that only crashes are not kills, because they prove nothing about the
properties' power.

To save a pytest start per mutant, the mutants of one kind share a session:
several ``--impl`` values, no ``-x``, and ``KVCOMPRESS_MUTANT_STOP=impl``
(tests/mutants/_trace.py), which is ``-x`` per implementation: each mutant
runs the same properties in the same order up to its first failure as it
would alone, and the trace says which. A session that reaches no verdict
(exit 2-4, a timeout, a failure that names no implementation, a mutant that
ran nothing) counts for none of its mutants: each is then run alone.
Mutant sessions do not shrink failures (``KVCOMPRESS_MUTANT_SHRINK=0``):
the verdict and the kill report read the first failing example, which
shrinking does not change, and shrinking cost most of a killed mutant's run.
Backward mutants (``BACKWARD_CLASSES``: the forward is the control's bit for
bit, ``test_backward_mutants_forward_exact``) run the gradient properties
first: every forward property passes them as it passes the control, so
running those first would cost a full pass per mutant for the same verdict.

The kill table (kind, mutant, bug class, killing property, examples to the
first counterexample) is printed by ``test_kill_report`` (run with ``-s``),
attached to it with ``record_property("mutant_report", ...)`` (junit XML), and
written as JSON to ``$KVCOMPRESS_MUTANT_REPORT`` when that is set.
Environment: ``KVCOMPRESS_MUTANT_WORKERS`` (default 2) parallel subprocesses.

A mutant registered with ``survives=`` (a bug no property can reach yet,
tests/mutants/__init__.py) must survive: its test fails if a property kills
it (drop ``survives=`` then) and is reported as an expected failure
otherwise, never as a pass.

With ``--impl`` the session verifies a contributor's callable, not the
suite, so this module skips itself.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.records import RECORDS
from tests.mutants import BACKWARD_CLASSES, BUG_CLASSES, KINDS, TILE, Mutant, all_mutants, controls

ROOT = Path(__file__).resolve().parent.parent
# run order: the first failing property is the killer, so the cheap, strong
# comparisons with the reference come first
PROPERTY_FILES = tuple(f"kvcompress/testing/properties/{f}.py" for f in (
    "test_conformance", "test_properties_extra", "test_invariants", "test_gradients", "test_production"))
GRADIENT_FILE = "kvcompress/testing/properties/test_gradients.py"
TIMEOUT_S = 500            # one implementation; a shared session gets BATCH_TIMEOUT_S more per extra mutant
BATCH_TIMEOUT_S = 120
MUTANTS = all_mutants()
BY_TARGET = {m.target: m for m in MUTANTS}


def suite_files(backward: bool = False) -> list[str]:
    """The property files that exist (the gradient file came later), in run
    order; with ``backward`` the gradient file first."""
    files = [f for f in PROPERTY_FILES if (ROOT / f).exists()]
    if backward and GRADIENT_FILE in files:
        files.remove(GRADIENT_FILE)
        files.insert(0, GRADIENT_FILE)
    return files


def is_backward(target: str) -> bool:
    m = BY_TARGET.get(target)
    return m is not None and m.bug_class in BACKWARD_CLASSES


def impl_id(target: str) -> str:
    """The plugin's id of ``KIND=module:callable``: ``KIND-module:callable``."""
    return target.replace("=", "-", 1)


@dataclass
class Run:
    """One subprocess (or one implementation's share of it, ``of``): its
    --impl values, exit code (None: timed out), wall time (an
    implementation's share: its tests' durations), output tail, trace
    (tests/mutants/_trace.py) and report (kvcompress/testing/report.py)."""

    impls: tuple[str, ...]
    returncode: int | None
    seconds: float
    output: str
    trace: dict
    report: dict

    def failures(self) -> list[tuple[str, dict]]:
        """(nodeid, trace record) of every test that failed, in run order."""
        return [(k, v) for k, v in self.trace.get("items", {}).items()
                if v.get("first_failure") is not None or v.get("failed_in")]

    @property
    def killed(self) -> bool:
        """Exit 1 with the first failing property failing on an AssertionError."""
        return self.returncode == 1 and self.killer()[2].startswith("AssertionError")

    def killer(self) -> tuple[str, int | None, str]:
        """(property id, examples to its first counterexample, error) of the
        first failure; ("", None, "") if none."""
        for nodeid, v in self.failures():
            return nodeid.split("::", 1)[-1], v.get("first_failure"), v.get("error") or ""
        return "", None, ""

    def reported_first_failure(self, prop_id: str) -> int | None:
        """The same count from kvcompress/testing/report.py, for a property that
        reports to it (None otherwise): ``prop|impl id|dtype`` keys."""
        func, _, params = prop_id.partition("[")
        for key, v in self.report.items():
            prop, impl_id, dtype = key.split("|")
            if func == f"test_{prop}" and params.startswith(f"{impl_id}-{dtype}"):
                return v.get("first_failure")
        return None

    def reached_verdict(self) -> bool:
        """A shared session judged each of its implementations: it exited 0 or
        1, every implementation ran a test, and every failure names one."""
        items = self.trace.get("items", {})
        ran = {v.get("impl") for v in items.values()}
        return (self.returncode in (0, 1) and "exitstatus" in self.trace
                and all(impl_id(i) in ran for i in self.impls)
                and all(v.get("impl") is not None for _, v in self.failures()))

    def of(self, impl: str) -> Run:
        """What this session says of one of its implementations, as a run of
        its own with -x would: exit 1 if a test of it failed, else 0."""
        iid = impl_id(impl)
        items = {k: v for k, v in self.trace.get("items", {}).items() if v.get("impl") == iid}
        failed = any(v.get("first_failure") is not None or v.get("failed_in") for v in items.values())
        return Run((impl,), 1 if failed else 0, self.trace.get("seconds", {}).get(iid, 0.0), self.output,
                   {"items": items}, self.report)


def run_suite(impls: tuple[str, ...], tmp: Path, *, shrink: bool = True) -> Run:
    """Run the property files on ``impls`` in a subprocess (ci profile): one
    implementation with -x, several with -x per implementation; without
    ``shrink``, Hypothesis does not shrink failures (the trace reads the
    first failing example, which shrinking does not change)."""
    digest = hashlib.sha1("|".join(impls).encode()).hexdigest()[:10]
    tag = f"{impls[0].split(':')[-1]}-{impls[0].split('=')[0]}-{len(impls)}-{digest}"
    trace_path, report_path = tmp / f"{tag}.trace.json", tmp / f"{tag}.report.json"
    env = dict(os.environ, KVCOMPRESS_PROFILE="ci", KVCOMPRESS_MUTANT_TRACE=str(trace_path),
               KVCOMPRESS_REPORT=str(report_path), KVCOMPRESS_MUTANT_STOP="impl",
               KVCOMPRESS_MUTANT_SHRINK="1" if shrink else "0")
    env.setdefault("OMP_NUM_THREADS", "1")   # the workers share the cores; tensors here are tiny
    files = suite_files(backward=all(is_backward(i) for i in impls))
    cmd = [sys.executable, "-m", "pytest", *files, *(f"--impl={i}" for i in impls),
           "-p", "no:cacheprovider", "-q", *(["-x"] if len(impls) == 1 else []), "-p", "tests.mutants._trace"]
    timeout = TIMEOUT_S + BATCH_TIMEOUT_S * (len(impls) - 1)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = None, f"timed out after {timeout} s\n{partial}"
    seconds = time.perf_counter() - t0

    def load(p):
        return json.loads(p.read_text()) if p.exists() else {}

    return Run(tuple(impls), rc, seconds, out[-6000:], load(trace_path), load(report_path))


def batches(targets: list[str]) -> list[tuple[str, ...]]:
    """The mutants' --impl values grouped into shared sessions: one per kind
    and direction (forward bugs, backward bugs), in registry order."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for t in targets:
        groups.setdefault((t.split("=", 1)[0], is_backward(t)), []).append(t)
    return [tuple(g) for g in groups.values()]


def expected_cost(job: tuple[str, ...]) -> float:
    """A session's cost in full passes of the suite over one implementation,
    roughly, for ordering the sessions only: an accepted implementation, a
    tile-boundary mutant (killed at production shapes, last) or a known
    survivor runs everything; another mutant dies within a few examples."""
    def one(target):
        m = BY_TARGET.get(target)
        return 1.0 if m is None or m.bug_class == TILE or m.survives else 0.1
    return sum(one(t) for t in job)


def _jobs_of(item) -> list[tuple[str, ...]]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "mutant" in params:
        return [(params["mutant"].target,)]
    if "kind" in params and item.name.startswith("test_correct_implementations_accepted"):
        return [ACCEPTED[params["kind"]]]
    if item.name.startswith("test_kill_report"):
        return [(m.target,) for m in MUTANTS]
    return []


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[tuple[str, ...], Run]:
    """Every run the selected tests of this module need, ``KVCOMPRESS_MUTANT_WORKERS``
    (default 2) subprocesses at a time: the accepted implementations (one
    session per kind), the mutants (shared sessions, ``batches``); a mutant's
    entry is its share of its session, or its own run where the session
    reached no verdict."""
    if request.config.getoption("--impl"):
        pytest.skip("--impl verifies a contributor's callable; the mutation self-test verifies the suite")
    jobs = []
    for item in request.session.items:
        if item.module is request.module:
            jobs += [j for j in _jobs_of(item) if j not in jobs]
    accepted = [j for j in jobs if j in ACCEPTED.values()]
    shared = batches([j[0] for j in jobs if j not in accepted])
    tmp = tmp_path_factory.mktemp("mutants")
    workers = int(os.environ.get("KVCOMPRESS_MUTANT_WORKERS", "2"))
    t0 = time.perf_counter()
    # the slowest first (longest processing time first keeps the workers evenly loaded)
    order = sorted(accepted + shared, key=expected_cost, reverse=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = dict(zip(order, pool.map(lambda j: run_suite(j, tmp, shrink=j in accepted), order)))
        alone = [(t,) for b in shared if len(b) > 1 and not done[b].reached_verdict() for t in b]
        done.update(zip(alone, pool.map(lambda j: run_suite(j, tmp, shrink=False), alone)))
    for b in shared:
        for t in b:
            if (t,) not in done:
                done[(t,)] = done[b].of(t)
    request.config._kvcompress_mutant_seconds = time.perf_counter() - t0
    request.config._kvcompress_mutant_sessions = [
        dict(first=j[0], impls=len(j), exit=done[j].returncode, seconds=round(done[j].seconds, 1),
             cpu_seconds=round(done[j].trace.get("cpu_seconds", 0.0), 1)) for j in order + alone]
    return done


# per kind, one run of the mutants' bug-free control. (The public function,
# every built-in path through the dispatcher, is not run here again: on the
# CPU it is the torch backend, which the main session verifies with every
# property in the same profile, and tests/test_plugin.py (mean_pool) and
# scripts/check_wheel.sh (linear, from the wheel) verify it through --impl
# as a contributor would.)
ACCEPTED = {k: (c,) for k, c in zip(KINDS, controls())}


@pytest.mark.parametrize("kind", KINDS)
def test_correct_implementations_accepted(runs, kind):
    """The bug-free base of the mutants passes every property: a kill below
    is then caused by the mutant's one bug."""
    r = runs[ACCEPTED[kind]]
    assert r.returncode == 0, f"--impl {' --impl '.join(r.impls)} was rejected (exit {r.returncode}):\n{r.output}"
    for impl in r.impls:
        target = impl.split("=", 1)[1]
        ran = [k for k in r.trace.get("items", {}) if "::test_matches_reference[" in k and target in k]
        assert len(ran) == 4, f"--impl {impl}: expected test_matches_reference in 4 dtypes, ran {ran}\n{r.output}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=[f"{m.kind}.{m.name}" for m in MUTANTS])
def test_mutant_rejected(runs, mutant: Mutant, record_property):
    """The suite fails on the mutant, through a property's assertion; the
    trace's count agrees with kvcompress/testing/report.py where both have one.
    A known survivor (``survives=``) must survive, and is an expected failure."""
    r = runs[(mutant.target,)]
    prop, examples, error = r.killer()
    record_property("killed_by", prop)
    record_property("examples_to_first_counterexample", examples)
    assert r.returncode not in (2, 3, 4, None), \
        f"{mutant.target}: the suite did not run to a verdict (exit {r.returncode}):\n{r.output}"
    if mutant.survives:
        assert r.returncode == 0, (f"{mutant.target} is registered as a known survivor ({mutant.survives}) but "
                                   f"{prop or 'the run'} failed ({error}): if that is a kill, drop survives= and "
                                   f"give it its row in docs/mutants.md")
        pytest.xfail(f"known survivor: {mutant.summary} ({mutant.survives})")
    assert r.returncode != 0, (f"{mutant.target} SURVIVED every property: {mutant.summary} "
                               f"(bug class: {mutant.bug_class})")
    assert r.killed, (f"{mutant.target}: exit {r.returncode}, but its first failing test did not fail on an "
                      f"assertion (first failure: {prop or 'none'} {error}):\n{r.output}")
    reported = r.reported_first_failure(prop)
    assert reported in (None, examples), \
        f"{mutant.target}: the trace counts {examples} examples to the failure of {prop}, the report {reported}"


BACKWARD = [m for m in MUTANTS if m.bug_class in BACKWARD_CLASSES]


def _backward_cases(kind: str):
    """Small cases that reach every backward bug (overlapping windows, left
    pads with pe, two heads per group, several windows, split), in float64
    and bfloat16, and one with D = 72 (a second feature tile)."""
    rec = RECORDS[kind]
    base = dict(kind=kind, B=1, H=4, G=2, T=14, D=4, block_size=4, stride=2, padding="left", seqlens=(5, 9),
                D_out=4, F=3, use_pe=rec.kind.pe, bias=True, bias2=True, activation="gelu",
                split=kind == "gated_pool", seed=3)
    for dtype in ("float64", "bfloat16"):
        yield Case(**base, dtype=dtype)
    yield Case(**{**base, "dtype": "float64", "B": 2, "T": 9, "seqlens": None, "D": 72, "D_out": 3})


def _forward_and_grads(fn, rec, case, inputs):
    """fn's output without autograd, its output with every input requiring
    grad, and the gradients of sum(y * 1) (None where none flows)."""
    with torch.no_grad():
        y0 = rec.call(fn, case, inputs)
    leaves = [inputs.x, *rec.args(inputs), inputs.pe]
    leaves = [None if t is None else t.detach().requires_grad_() for t in leaves]
    kw = rec.kwargs(case, leaves[-1], inputs.cu_seqlens)
    y = fn(leaves[0], *leaves[1:-1], **kw)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], torch.ones_like(y), allow_unused=True)
    return y0, y.detach(), grads


@pytest.mark.parametrize("mutant", BACKWARD, ids=[f"{m.kind}.{m.name}" for m in BACKWARD])
def test_backward_mutants_forward_exact(mutant: Mutant):
    """A backward mutant's output is its control's bit for bit, with and
    without autograd (so every forward property sees the control), and its
    gradient differs from the control's on a case that reaches the bug."""
    control = importlib.import_module(f"tests.mutants.{mutant.kind}").control
    rec, differs = RECORDS[mutant.kind], []
    for case in _backward_cases(mutant.kind):
        inputs = make_inputs(case, rec)
        (c0, c1, cg), (m0, m1, mg) = (_forward_and_grads(f, rec, case, inputs) for f in (control, mutant.fn))
        for c, m in ((c0, m0), (c1, m1)):
            assert c.dtype == m.dtype and c.stride() == m.stride() and torch.equal(c, m), \
                f"{mutant.target}: the forward differs from the control's\n  {case!r}"
        differs.append(any((a is None) != (b is None) or (a is not None and not torch.equal(a, b))
                           for a, b in zip(cg, mg)))
    assert any(differs), f"{mutant.target}: the gradient equals the control's on every case: the bug is not reached"


def test_shared_session_verdicts():
    """A shared session's trace splits into per-mutant verdicts as strict as
    a run of each alone: the first failure decides, an assertion kills, a
    crash does not; a failure naming no mutant, a mutant that ran nothing or
    an exit of 2-4 leaves the whole session without a verdict."""
    a, b, c = "linear=tests.mutants.linear:a", "linear=tests.mutants.linear:b", "linear=tests.mutants.linear:c"
    items = {
        "p.py::test_x[linear-tests.mutants.linear:a-float64]": dict(impl=impl_id(a), examples=3, first_failure=3,
                                                                     error="AssertionError: off"),
        "p.py::test_x[linear-tests.mutants.linear:b-float64]": dict(impl=impl_id(b), examples=2, first_failure=2,
                                                                     error="RuntimeError: crash"),
        "p.py::test_x[linear-tests.mutants.linear:c-float64]": dict(impl=impl_id(c), examples=40,
                                                                     first_failure=None, error=None),
        "p.py::test_y[linear-tests.mutants.linear:b-float64]": dict(impl=impl_id(b), examples=1, first_failure=1,
                                                                     error="AssertionError: later"),
    }
    run = Run((a, b, c), 1, 9.0, "", {"exitstatus": 1, "items": items}, {})
    assert run.reached_verdict()
    ra, rb, rc = run.of(a), run.of(b), run.of(c)
    assert ra.killed and ra.killer() == ("test_x[linear-tests.mutants.linear:a-float64]", 3, "AssertionError: off")
    assert rb.returncode == 1 and not rb.killed          # its first failure is a crash: no kill
    assert rc.returncode == 0 and not rc.killed          # a survivor
    stray = dict(items, **{"p.py::test_meta": dict(impl=None, examples=0, first_failure=None, error=None,
                                                   failed_in="call")})
    assert not Run((a, b, c), 1, 9.0, "", {"exitstatus": 1, "items": stray}, {}).reached_verdict()
    assert not Run((a, b, c, "linear=tests.mutants.linear:d"), 1, 9.0, "", {"exitstatus": 1, "items": items},
                   {}).reached_verdict()
    assert not Run((a, b, c), 3, 9.0, "", {"exitstatus": 3, "items": items}, {}).reached_verdict()
    assert not Run((a, b, c), None, 9.0, "", {}, {}).reached_verdict()


def test_every_bug_class_and_kind_has_a_mutant():
    assert len(MUTANTS) >= 20, f"only {len(MUTANTS)} mutants"
    missing = [c for c in BUG_CLASSES if c not in {m.bug_class for m in MUTANTS}]
    assert not missing, f"bug classes without a mutant: {missing}"
    assert {m.kind for m in MUTANTS} == set(KINDS)


def test_docs_list_every_mutant():
    """docs/mutants.md has a table row for every mutant: its kind, name and
    bug class (the counts in it are regenerated by ``test_kill_report -s``)."""
    doc = (ROOT / "docs" / "mutants.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in doc.splitlines() if line.startswith("| ")]
    have = {(r[0], r[1], r[2]) for r in rows if len(r) >= 3}
    missing = [f"{m.kind}.{m.name}" for m in MUTANTS if (m.kind, f"`{m.name}`", m.bug_class) not in have]
    assert not missing, f"docs/mutants.md lacks a row (kind | `name` | bug class) for: {missing}"


def kill_table(runs) -> dict:
    """The report: one row per mutant plus the kill rate (known survivors
    counted as not killed) and the median examples to the first
    counterexample."""
    rows = []
    for m in MUTANTS:
        r = runs.get((m.target,))
        if r is None:
            continue
        prop, examples, error = r.killer()
        # "test_x[KIND-tests.mutants.KIND:NAME-float64]" -> "test_x[float64]"
        short = prop.replace(f"[{m.kind}-tests.mutants.{m.kind}:{m.name}-", "[").replace(
            f"[{m.kind}-tests.mutants.{m.kind}:{m.name}]", "")
        rows.append(dict(kind=m.kind, mutant=m.name, bug_class=m.bug_class, summary=m.summary, killed=r.killed,
                         exit=r.returncode, killed_by=short, examples_to_first_counterexample=examples,
                         report_first_failure=r.reported_first_failure(prop), error=error,
                         survives=m.survives, seconds=round(r.seconds, 1)))
    killed = [row for row in rows if row["killed"]]
    firsts = [row["examples_to_first_counterexample"] for row in killed
              if row["examples_to_first_counterexample"] is not None]
    return dict(mutants=len(rows), killed=len(killed), kill_rate=len(killed) / len(rows) if rows else None,
                known_survivors=sum(1 for row in rows if row["survives"]),
                median_examples_to_first_counterexample=statistics.median(firsts) if firsts else None,
                rows=rows)


def format_table(table: dict) -> str:
    """The table as Markdown, the form docs/mutants.md uses."""
    lines = ["| kind | mutant | bug class | what it does | killed by | examples to 1st counterexample |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in table["rows"]:
        killer = f"`{row['killed_by']}`" if row["killed"] else f"SURVIVED (exit {row['exit']})"
        if row["survives"] and not row["killed"]:
            killer += f", known: {row['survives']}"
        lines.append(f"| {row['kind']} | `{row['mutant']}` | {row['bug_class']} | {row['summary']} | {killer} | "
                     f"{row['examples_to_first_counterexample']} |")
    lines.append(f"\nkill rate {table['killed']}/{table['mutants']} ({table['known_survivors']} known "
                 f"survivor(s)); median examples to the first counterexample "
                 f"{table['median_examples_to_first_counterexample']}")
    return "\n".join(lines)


def test_kill_report(runs, record_property, request):
    """Prints the kill table (``-s``), attaches it, and writes it to
    ``$KVCOMPRESS_MUTANT_REPORT`` if set; asserts it covers every mutant."""
    table = kill_table(runs)
    table["wall_seconds"] = round(getattr(request.config, "_kvcompress_mutant_seconds", 0.0), 1)
    table["sessions"] = getattr(request.config, "_kvcompress_mutant_sessions", [])
    table["session_cpu_seconds"] = round(sum(s["cpu_seconds"] for s in table["sessions"]), 1)
    record_property("mutant_report", json.dumps(table))
    path = os.environ.get("KVCOMPRESS_MUTANT_REPORT")
    if path:
        Path(path).write_text(json.dumps(table, indent=1))
    print("\n" + format_table(table))
    assert table["mutants"] == len(MUTANTS), "a mutant was not run"
    assert all(row["exit"] is not None for row in table["rows"]), "a mutant run timed out"
