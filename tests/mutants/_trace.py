"""pytest plugin for the mutation self-test: which property failed first, at
which example, with which error.

Load it with ``-p tests.mutants._trace`` and set ``KVCOMPRESS_MUTANT_TRACE``
to a path: at the end of the session it writes JSON
``{"exitstatus": int, "items": {nodeid: {"examples", "first_failure", "error"}}}``.
``examples`` counts the examples a Hypothesis property ran (rejected ones,
``assume`` failures, excluded), ``first_failure`` is the 1-based index of
the first example that raised, ``error`` its exception type and first line.

It wraps each property's ``.hypothesis.inner_test`` (the hook Hypothesis
documents for plugins that wrap the test body), so it works for every
property file, whether or not the property reports to
``kvcompress/testing/report.py``.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
from hypothesis.errors import UnsatisfiedAssumption

_items: dict[str, dict] = {}
_current: list[str | None] = [None]


def _wrap(inner):
    if getattr(inner, "_kvcompress_traced", False):
        return inner

    @functools.wraps(inner)
    def traced(*args, **kwargs):
        rec = _items.setdefault(_current[0], {"examples": 0, "first_failure": None, "error": None})
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
    if report.failed:
        rec = _items.setdefault(report.nodeid, {"examples": 0, "first_failure": None, "error": None})
        rec.setdefault("failed_in", report.when)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("KVCOMPRESS_MUTANT_TRACE")
    if path:
        with open(path, "w") as f:
            json.dump({"exitstatus": int(exitstatus), "items": _items}, f, indent=1)
