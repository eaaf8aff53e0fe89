"""The mutation self-test: the property suite must reject every mutant in
``tests/mutants/`` and accept the built-in backends and the mutants' bug-free
controls.

Each implementation is verified exactly as a contributor would verify a
kernel, in a subprocess::

    python -m pytest kvcompress/testing/properties/test_conformance.py \\
        kvcompress/testing/properties/test_properties_extra.py \\
        kvcompress/testing/properties/test_invariants.py kvcompress/testing/properties/test_gradients.py \\
        --impl KIND=tests.mutants.KIND:NAME -p no:cacheprovider -q -x -p tests.mutants._trace

with the deterministic ``ci`` Hypothesis profile. A mutant is killed when
pytest exits 1 (tests failed) *and* a property failed on an AssertionError
of its own: exit codes 2-4 (interrupted, internal error, usage error), a
timeout, or a mutant that only crashes are not kills, because they prove
nothing about the properties' power.

The kill table (kind, mutant, bug class, killing property, examples to the
first counterexample) is printed by ``test_kill_report`` (run with ``-s``),
attached to it with ``record_property("mutant_report", ...)`` (junit XML), and
written as JSON to ``$KVCOMPRESS_MUTANT_REPORT`` when that is set.
Environment: ``KVCOMPRESS_MUTANT_WORKERS`` (default 2) parallel subprocesses.

With ``--impl`` the session verifies a contributor's callable, not the
suite, so this module skips itself.
"""

from __future__ import annotations

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

from tests.mutants import BUG_CLASSES, KINDS, Mutant, all_mutants, controls

ROOT = Path(__file__).resolve().parent.parent
# run order: with -x the first failing property is the killer, so the cheap,
# strong comparisons with the reference come first
PROPERTY_FILES = tuple(f"kvcompress/testing/properties/{f}.py" for f in (
    "test_conformance", "test_properties_extra", "test_invariants", "test_gradients", "test_production"))
TIMEOUT_S = 500
MUTANTS = all_mutants()


def suite_files() -> list[str]:
    """The property files that exist (the gradient file came later)."""
    return [f for f in PROPERTY_FILES if (ROOT / f).exists()]


@dataclass
class Run:
    """One subprocess: its --impl values, exit code (None: timed out),
    wall time, output tail, trace (tests/mutants/_trace.py) and report
    (kvcompress/testing/report.py)."""

    impls: tuple[str, ...]
    returncode: int | None
    seconds: float
    output: str
    trace: dict
    report: dict

    def failures(self) -> list[tuple[str, dict]]:
        """(nodeid, trace record) of every property that failed."""
        return [(k, v) for k, v in self.trace.get("items", {}).items()
                if v.get("first_failure") is not None or v.get("failed_in")]

    @property
    def killed(self) -> bool:
        """Exit 1 with a property failing on an AssertionError."""
        return self.returncode == 1 and any((v.get("error") or "").startswith("AssertionError")
                                            for _, v in self.failures())

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


def run_suite(impls: tuple[str, ...], tmp: Path) -> Run:
    """Run the property files on ``impls`` in a subprocess (ci profile)."""
    tag = "_".join(i.split(":")[-1] + "-" + i.split("=")[0] for i in impls)[:120]
    trace_path, report_path = tmp / f"{tag}.trace.json", tmp / f"{tag}.report.json"
    env = dict(os.environ, KVCOMPRESS_PROFILE="ci", KVCOMPRESS_MUTANT_TRACE=str(trace_path),
               KVCOMPRESS_REPORT=str(report_path))
    env.setdefault("OMP_NUM_THREADS", "1")   # the workers share the cores; tensors here are tiny
    cmd = [sys.executable, "-m", "pytest", *suite_files(), *(f"--impl={i}" for i in impls),
           "-p", "no:cacheprovider", "-q", "-x", "-p", "tests.mutants._trace"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = None, f"timed out after {TIMEOUT_S} s\n{partial}"
    seconds = time.perf_counter() - t0

    def load(p):
        return json.loads(p.read_text()) if p.exists() else {}

    return Run(tuple(impls), rc, seconds, out[-6000:], load(trace_path), load(report_path))


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
    """Every subprocess the selected tests of this module need, run once,
    ``KVCOMPRESS_MUTANT_WORKERS`` (default 2) at a time."""
    if request.config.getoption("--impl"):
        pytest.skip("--impl verifies a contributor's callable; the mutation self-test verifies the suite")
    jobs = []
    for item in request.session.items:
        if item.module is request.module:
            jobs += [j for j in _jobs_of(item) if j not in jobs]
    tmp = tmp_path_factory.mktemp("mutants")
    workers = int(os.environ.get("KVCOMPRESS_MUTANT_WORKERS", "2"))
    t0 = time.perf_counter()
    # the slowest jobs (accepted implementations run every property) first
    jobs.sort(key=lambda j: ":control" not in j[0] and "kvcompress.functional" not in j[0])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = dict(zip(jobs, pool.map(lambda j: run_suite(j, tmp), jobs)))
    request.config._kvcompress_mutant_seconds = time.perf_counter() - t0
    return done


# per kind, one run with two --impl: the public function (every built-in
# path through the dispatcher) and the mutants' bug-free control
ACCEPTED = {k: (f"{k}=kvcompress.functional:{k}", c) for k, c in zip(KINDS, controls())}


@pytest.mark.parametrize("kind", KINDS)
def test_correct_implementations_accepted(runs, kind):
    """The built-in path and the bug-free base of the mutants pass every
    property: a kill below is then caused by the mutant's one bug."""
    r = runs[ACCEPTED[kind]]
    assert r.returncode == 0, f"--impl {' --impl '.join(r.impls)} was rejected (exit {r.returncode}):\n{r.output}"
    for impl in r.impls:
        target = impl.split("=", 1)[1]
        ran = [k for k in r.trace.get("items", {}) if "::test_matches_reference[" in k and target in k]
        assert len(ran) == 4, f"--impl {impl}: expected test_matches_reference in 4 dtypes, ran {ran}\n{r.output}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=[f"{m.kind}.{m.name}" for m in MUTANTS])
def test_mutant_rejected(runs, mutant: Mutant, record_property):
    """The suite fails on the mutant, through a property's assertion; the
    trace's count agrees with kvcompress/testing/report.py where both have one."""
    r = runs[(mutant.target,)]
    prop, examples, error = r.killer()
    record_property("killed_by", prop)
    record_property("examples_to_first_counterexample", examples)
    assert r.returncode not in (2, 3, 4, None), \
        f"{mutant.target}: the suite did not run to a verdict (exit {r.returncode}):\n{r.output}"
    assert r.returncode != 0, (f"{mutant.target} SURVIVED every property: {mutant.summary} "
                               f"(bug class: {mutant.bug_class})")
    assert r.killed, (f"{mutant.target}: exit {r.returncode}, but no property failed on an assertion "
                      f"(first failure: {prop or 'none'} {error}):\n{r.output}")
    reported = r.reported_first_failure(prop)
    assert reported in (None, examples), \
        f"{mutant.target}: the trace counts {examples} examples to the failure of {prop}, the report {reported}"


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
    """The report: one row per mutant plus the kill rate and the median
    examples to the first counterexample."""
    rows = []
    for m in MUTANTS:
        r = runs.get((m.target,))
        if r is None:
            continue
        prop, examples, error = r.killer()
        # "test_x[KIND-tests.mutants.KIND:NAME-float64]" -> "test_x[float64]"
        short = prop.replace(f"[{m.kind}-tests.mutants.{m.kind}:{m.name}-", "[")
        rows.append(dict(kind=m.kind, mutant=m.name, bug_class=m.bug_class, summary=m.summary, killed=r.killed,
                         exit=r.returncode, killed_by=short, examples_to_first_counterexample=examples,
                         report_first_failure=r.reported_first_failure(prop), error=error,
                         seconds=round(r.seconds, 1)))
    killed = [row for row in rows if row["killed"]]
    firsts = [row["examples_to_first_counterexample"] for row in killed
              if row["examples_to_first_counterexample"] is not None]
    return dict(mutants=len(rows), killed=len(killed), kill_rate=len(killed) / len(rows) if rows else None,
                median_examples_to_first_counterexample=statistics.median(firsts) if firsts else None,
                rows=rows)


def format_table(table: dict) -> str:
    """The table as Markdown, the form docs/mutants.md uses."""
    lines = ["| kind | mutant | bug class | what it does | killed by | examples to 1st counterexample |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in table["rows"]:
        killer = f"`{row['killed_by']}`" if row["killed"] else f"SURVIVED (exit {row['exit']})"
        lines.append(f"| {row['kind']} | `{row['mutant']}` | {row['bug_class']} | {row['summary']} | {killer} | "
                     f"{row['examples_to_first_counterexample']} |")
    lines.append(f"\nkill rate {table['killed']}/{table['mutants']}; median examples to the first "
                 f"counterexample {table['median_examples_to_first_counterexample']}")
    return "\n".join(lines)


def test_kill_report(runs, record_property, request):
    """Prints the kill table (``-s``), attaches it, and writes it to
    ``$KVCOMPRESS_MUTANT_REPORT`` if set; asserts it covers every mutant."""
    table = kill_table(runs)
    table["wall_seconds"] = round(getattr(request.config, "_kvcompress_mutant_seconds", 0.0), 1)
    record_property("mutant_report", json.dumps(table))
    path = os.environ.get("KVCOMPRESS_MUTANT_REPORT")
    if path:
        Path(path).write_text(json.dumps(table, indent=1))
    print("\n" + format_table(table))
    assert table["mutants"] == len(MUTANTS), "a mutant was not run"
    assert all(row["exit"] is not None for row in table["rows"]), "a mutant run timed out"
