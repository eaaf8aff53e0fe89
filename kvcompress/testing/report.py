"""Per-(property, implementation, dtype) measurements, for the verify
command's matrix and the mutation self-test.

Properties call ``observe(...)`` once per example; the numbers land in a
JSON file when ``KVCOMPRESS_REPORT=path`` is set (the pytest plugin,
kvcompress/testing/plugin.py, writes it at the end of the session; under
pytest-xdist the controller writes the workers' merged stats, ``merge``). For each key we keep:
examples run, examples before the first failure, the worst error as a
fraction of its bound (the implementation's precision class), the worst as a
fraction of the ``strict`` class's bound (so the matrix can say which class
it met, SPEC 3c), the worst RMS quality ratio (kvcompress/testing/quality.py),
and the time spent in the implementation and in the reference.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager

_stats: dict[str, dict] = defaultdict(lambda: {"examples": 0, "first_failure": None, "worst_ratio": 0.0,
                                               "worst_strict_ratio": 0.0, "worst_rms_ratio": None,
                                               "impl_seconds": 0.0, "reference_seconds": 0.0, "failed": False})


_checked = [0]


def begin_test() -> None:
    """Start counting the examples one property test checks (the plugin calls it)."""
    _checked[0] = 0


def checked() -> None:
    """One example was checked: its assertions ran on a non-trivial case."""
    _checked[0] += 1


def checked_in_test() -> int:
    return _checked[0]


def key(prop: str, impl_id: str, dtype: str) -> str:
    return f"{prop}|{impl_id}|{dtype}"


def _worst(a, b):
    return a if b is None or b != b else b if a is None else max(a, b)


def observe(k: str, *, ratio: float | None = None, strict_ratio: float | None = None,
            rms_ratio: float | None = None, impl_seconds: float = 0.0, reference_seconds: float = 0.0,
            failed: bool = False) -> None:
    """One checked example of property key ``k``: its worst error over the
    bound (``ratio``; ``strict_ratio`` the same over the strict class's
    bound, default ``ratio``), its RMS quality ratio (None: the check does
    not apply), times, and whether it failed."""
    s = _stats[k]
    s["examples"] += 1
    checked()
    if ratio is not None and ratio == ratio:
        s["worst_ratio"] = max(s["worst_ratio"], ratio)
    strict_ratio = ratio if strict_ratio is None else strict_ratio
    if strict_ratio is not None and strict_ratio == strict_ratio:
        s["worst_strict_ratio"] = max(s.get("worst_strict_ratio", 0.0), strict_ratio)
    s["worst_rms_ratio"] = _worst(s.get("worst_rms_ratio"), rms_ratio)
    s["impl_seconds"] += impl_seconds
    s["reference_seconds"] += reference_seconds
    if failed and not s["failed"]:
        s["failed"] = True
        s["first_failure"] = s["examples"]


@contextmanager
def timed(out: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[name] = out.get(name, 0.0) + time.perf_counter() - t0


def stats() -> dict[str, dict]:
    return dict(_stats)


def merge(other: dict[str, dict]) -> None:
    """Add another process's ``stats()`` to this one's (pytest-xdist: the
    controller merges each worker's, kvcompress/testing/_xdist.py). Counts
    and times add up, the worst ratio is the larger, and a key's examples
    read as if this process's ran first, then ``other``'s: its first failure
    is this process's, else ``other``'s shifted by this process's examples."""
    for k, o in other.items():
        s = _stats[k]
        if not s["failed"] and o["failed"]:
            s["failed"] = True
            s["first_failure"] = s["examples"] + o["first_failure"]
        s["examples"] += o["examples"]
        s["worst_ratio"] = max(s["worst_ratio"], o["worst_ratio"])
        s["worst_strict_ratio"] = max(s.get("worst_strict_ratio", 0.0), o.get("worst_strict_ratio", 0.0))
        s["worst_rms_ratio"] = _worst(s.get("worst_rms_ratio"), o.get("worst_rms_ratio"))
        s["impl_seconds"] += o["impl_seconds"]
        s["reference_seconds"] += o["reference_seconds"]


def write(path: str | None = None) -> None:
    path = path or os.environ.get("KVCOMPRESS_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(stats(), f, indent=1, sort_keys=True)
