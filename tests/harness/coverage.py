"""Which features the drawn cases exercised, per implementation and dtype.

The ``ci`` profile promises that every kind x dtype x backend saw both
paddings, pe on and off, groups > 1, non-contiguous layouts, and packed
batches; ``conftest.py`` prints this table and, in that profile, fails the
run when a promised feature was never drawn.
"""

from __future__ import annotations

from collections import defaultdict

REQUIRED = ("padding=valid", "padding=left", "pe=on", "pe=off", "groups>1", "layout=bthd", "layout=sliced",
            "packed", "windows>0")

_seen: dict[tuple[str, str], set[str]] = defaultdict(set)
_examples: dict[tuple[str, str], int] = defaultdict(int)


def features(case) -> list[str]:
    out = [f"padding={case.padding}", f"pe={'on' if case.use_pe else 'off'}", f"layout={case.layout}"]
    if case.G > 1:
        out.append("groups>1")
    if case.seqlens is not None:
        out.append("packed")
    if case.W > 0 and case.B > 0:
        out.append("windows>0")
    return out


def record(impl_id: str, dtype: str, case) -> None:
    key = (impl_id, dtype)
    _examples[key] += 1
    _seen[key].update(features(case))


def missing() -> dict[tuple[str, str], list[str]]:
    return {k: [f for f in REQUIRED if f not in v] for k, v in _seen.items() if any(f not in v for f in REQUIRED)}


def table() -> list[str]:
    lines = []
    for key in sorted(_seen):
        miss = [f for f in REQUIRED if f not in _seen[key]]
        lines.append(f"{key[0]:<28} {key[1]:<9} {_examples[key]:>5} examples  "
                     + ("all features" if not miss else "MISSING " + ", ".join(miss)))
    return lines
