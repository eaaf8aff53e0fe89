"""pytest plugin for the mutation self-test: which property failed first, at
which example, with which error, per implementation under test.

Load it with ``-p tests.mutants._trace`` and set ``KVCOMPRESS_MUTANT_TRACE``
to a path: at the end of the session it writes JSON
``{"exitstatus": int, "items": {nodeid: {"impl", "examples", "first_failure", "error"}},
"seconds": {impl: float}, "stopped": {impl: [nodeid, ...]}, "cpu_seconds": float}``.
``impl`` is the id of the implementation the item verifies (None for a test
without one), ``examples`` counts the examples a Hypothesis property ran
(rejected ones, ``assume`` failures, excluded), ``first_failure`` is the
1-based index of the first example that raised, ``error`` its exception type
and first line; a test that failed outside its examples (setup, teardown, a
non-Hypothesis test) also has ``failed_in``. Items appear in the order they
ran. ``seconds`` sums each implementation's test durations,
``cpu_seconds`` is the session's CPU time (start-up and collection included).

It wraps each property's ``.hypothesis.inner_test`` (the hook Hypothesis
documents for plugins that wrap the test body), so it works for every
property file, whether or not the property reports to
``kvcompress/testing/report.py``.

``KVCOMPRESS_MUTANT_SHRINK=0`` turns Hypothesis's shrinking off in the
session's kvcompress profile (its other settings unchanged): the self-test
reads the first failing example (its index and error, above), which
shrinking does not change, and shrinking a killed mutant's failure cost
most of its run (about 2 s of 2.5 s of CPU per mutant).

``KVCOMPRESS_MUTANT_STOP=impl`` is ``-x`` per implementation: once a test of
an implementation failed, its later tests are skipped in setup (listed under
``stopped``) and the other implementations go on. One session then verifies
several mutants, each exactly as far as ``-x`` would take it alone: the same
tests in the same order up to its first failure (the properties are seeded
per test id with the implementation replaced by its kind, so a mutant draws
the same examples whatever else runs in the session).
"""

from __future__ import annotations

import functools
import json
import os
import time

import pytest
from hypothesis.errors import UnsatisfiedAssumption

_items: dict[str, dict] = {}
_current: list[str | None] = [None]
_impl_of: dict[str, str | None] = {}
_failed: set[str] = set()
_stopped: dict[str, list[str]] = {}
_seconds: dict[str, float] = {}


def _record(nodeid: str) -> dict:
    return _items.setdefault(nodeid, {"impl": _impl_of.get(nodeid), "examples": 0, "first_failure": None,
                                      "error": None})


def _wrap(inner):
    if getattr(inner, "_kvcompress_traced", False):
        return inner

    @functools.wraps(inner)
    def traced(*args, **kwargs):
        rec = _record(_current[0])
        try:
            out = inner(*args, **kwargs)
        except UnsatisfiedAssumption:
            raise
        except Exception as e:
            rec["examples"] += 1
            if rec["first_failure"] is None:
                rec["first_failure"] = rec["examples"]
                first_line = (str(e).strip().splitlines() or [""])[0]
                rec["error"] = f"{type(e).__name__}: {first_line}"[:300]
            raise
        rec["examples"] += 1
        return out

    traced._kvcompress_traced = True
    return traced


def pytest_configure(config):
    if os.environ.get("KVCOMPRESS_MUTANT_SHRINK") == "0":
        from hypothesis import Phase, settings

        from kvcompress.testing import plugin

        plugin._register_profiles()
        name = f"kvcompress-{plugin.current_profile()}"
        s = settings.get_profile(name)
        settings.register_profile(name, settings(s, phases=[p for p in s.phases if p != Phase.shrink]))


def _impl_id(item) -> str | None:
    impl = getattr(getattr(item, "callspec", None), "params", {}).get("impl")
    return getattr(impl, "id", None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    impl = _impl_of[item.nodeid] = _impl_id(item)
    if impl is not None and impl in _failed and os.environ.get("KVCOMPRESS_MUTANT_STOP") == "impl":
        _stopped.setdefault(impl, []).append(item.nodeid)
        pytest.skip(f"{impl} already failed a test (KVCOMPRESS_MUTANT_STOP=impl: -x per implementation)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    h = getattr(getattr(item, "obj", None), "hypothesis", None)
    if h is not None:
        h.inner_test = _wrap(h.inner_test)
    _current[0] = item.nodeid
    try:
        yield
    finally:
        _current[0] = None


def pytest_runtest_logreport(report):
    impl = _impl_of.get(report.nodeid)
    if impl is not None:
        _seconds[impl] = _seconds.get(impl, 0.0) + report.duration
    if report.failed:
        rec = _record(report.nodeid)
        rec.setdefault("failed_in", report.when)
        if impl is not None:
            _failed.add(impl)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("KVCOMPRESS_MUTANT_TRACE")
    if path:
        with open(path, "w") as f:
            json.dump({"exitstatus": int(exitstatus), "items": _items, "seconds": _seconds, "stopped": _stopped,
                       "cpu_seconds": time.process_time()}, f, indent=1)
