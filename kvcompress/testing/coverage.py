"""Which features the drawn cases exercised, per implementation and dtype.

The ``ci`` profile promises that every kind x dtype x backend saw both
paddings, pe on and off, groups > 1, non-contiguous layouts, and packed
batches (those of them inside the implementation's declared domain); the
pytest plugin prints this table and, in that profile, fails the run when a
promised feature was never drawn.
"""

from __future__ import annotations

from collections import defaultdict

from kvcompress import kinds as _kinds

from .domain import FULL, PADDINGS, Domain

REQUIRED = ("padding=valid", "padding=left", "pe=on", "pe=off", "groups>1", "layout=bthd", "layout=sliced",
            "packed", "windows>0")

_seen: dict[tuple[str, str], set[str]] = defaultdict(set)
_examples: dict[tuple[str, str], int] = defaultdict(int)
_required: dict[tuple[str, str], tuple[str, ...]] = {}


def required(domain: Domain, kind: str | None = None) -> tuple[str, ...]:
    """The promised features that lie inside ``domain`` (and ``kind``: pe
    only where the kind takes pe; each bool option on and off)."""
    rec = None if kind is None else _kinds.KINDS_BY_NAME.get(kind)
    out = [f"padding={p}" for p in PADDINGS if p in domain.paddings]
    out += ["pe=on", "pe=off"] if domain.pe and (rec is None or rec.pe) else ["pe=off"]
    if rec is not None:
        out += [f"{o.name}={v}" for o in rec.options if o.choices is None for v in ("on", "off")]
    if domain.groups == "any":
        out.append("groups>1")
    out += [f"layout={v}" for v in ("bthd", "sliced") if v in domain.layouts]
    if "packed" in domain.inputs:
        out.append("packed")
    out.append("windows>0")
    return tuple(f for f in REQUIRED if f in out) + tuple(f for f in out if f not in REQUIRED)


def features(case) -> list[str]:
    out = [f"padding={case.padding}", f"pe={'on' if case.use_pe else 'off'}", f"layout={case.layout}"]
    if case.G > 1:
        out.append("groups>1")
    if case.seqlens is not None:
        out.append("packed")
    if case.W > 0 and case.B > 0:
        out.append("windows>0")
    rec = _kinds.KINDS_BY_NAME.get(case.kind)
    if rec is not None:
        out += [f"{o.name}={'on' if getattr(case, o.name) else 'off'}" for o in rec.options if o.choices is None]
    return out


def record(impl_id: str, dtype: str, case, domain: Domain = FULL) -> None:
    key = (impl_id, dtype)
    _examples[key] += 1
    _seen[key].update(features(case))
    _required[key] = required(domain, case.kind)


def export() -> list[list]:
    """This process's records as plain lists, [impl_id, dtype, examples,
    features seen, features required], for another process's ``merge``
    (pytest-xdist: kvcompress/testing/_xdist.py)."""
    return [[k[0], k[1], _examples[k], sorted(_seen[k]), list(_required.get(k, REQUIRED))] for k in sorted(_seen)]


def merge(exported: list[list]) -> None:
    """Add another process's ``export()`` to this one's records: examples add
    up, the features seen are the union."""
    for impl_id, dtype, examples, seen, req in exported:
        key = (impl_id, dtype)
        _examples[key] += examples
        _seen[key].update(seen)
        _required[key] = tuple(req)


def clear() -> None:
    """Forget this process's records (a pytest-xdist worker, once it has
    handed them to the controller)."""
    _seen.clear()
    _examples.clear()
    _required.clear()


def missing() -> dict[tuple[str, str], list[str]]:
    out = {}
    for k, v in _seen.items():
        miss = [f for f in _required.get(k, REQUIRED) if f not in v]
        if miss:
            out[k] = miss
    return out


def table() -> list[str]:
    lines = []
    for key in sorted(_seen):
        miss = [f for f in _required.get(key, REQUIRED) if f not in _seen[key]]
        lines.append(f"{key[0]:<28} {key[1]:<9} {_examples[key]:>5} examples  "
                     + ("all features" if not miss else "MISSING " + ", ".join(miss)))
    return lines
