"""Which features the drawn cases exercised, per implementation and dtype.

The ``ci`` profile promises that every kind x dtype x backend saw both
paddings, pe on and off, groups > 1, 1 < G < H where the kind has grouped
parameters (the grouping where head h's set h // (H // G) differs from
h % G), non-contiguous layouts, packed batches, outputs with windows and
empty ones (those of them inside the implementation's declared domain); the
pytest plugin prints this table and, in that profile, fails the run when a
promised feature was never drawn.
"""

from __future__ import annotations

from collections import defaultdict

from kvcompress import kinds as _kinds

from .domain import FULL, PADDINGS, Domain

REQUIRED = ("padding=valid", "padding=left", "pe=on", "pe=off", "groups>1", "1<groups<heads", "layout=bthd",
            "layout=sliced", "packed", "windows>0", "windows=0")

_seen: dict[tuple[str, str], set[str]] = defaultdict(set)
_examples: dict[tuple[str, str], int] = defaultdict(int)
_required: dict[tuple[str, str], tuple[str, ...]] = {}


def _group_switches(rec) -> list[str | None]:
    """For each parameter of ``rec`` with a G dim: None (always given), or
    the Case field and Domain field that turn an optional one on ("bias" for
    the first optional parameter, "bias2" for the second)."""
    flags = iter(("bias", "bias2"))
    out = []
    for p in rec.params:
        flag = next(flags) if p.optional else None
        if "G" in p.shape:
            out.append(flag)
    return out


def required(domain: Domain, kind: str | None = None) -> tuple[str, ...]:
    """The promised features that lie inside ``domain`` (and ``kind``: pe
    only where the kind takes pe; each bool option on and off; 1 < G < H
    where a grouped parameter can be given and H can reach 4)."""
    rec = None if kind is None else _kinds.KINDS_BY_NAME.get(kind)
    out = [f"padding={p}" for p in PADDINGS if p in domain.paddings]
    out += ["pe=on", "pe=off"] if domain.pe and (rec is None or rec.pe) else ["pe=off"]
    if rec is not None:
        out += [f"{o.name}={v}" for o in rec.options if o.choices is None for v in ("on", "off")]
    if domain.groups == "any":
        out.append("groups>1")
        if (rec is not None and any(f is None or getattr(domain, f) for f in _group_switches(rec))
                and (domain.max_heads is None or domain.max_heads >= 4)):
            out.append("1<groups<heads")
    out += [f"layout={v}" for v in ("bthd", "sliced") if v in domain.layouts]
    if "packed" in domain.inputs:
        out.append("packed")
    out.append("windows>0")
    if domain.empty:
        out.append("windows=0")
    return tuple(f for f in REQUIRED if f in out) + tuple(f for f in out if f not in REQUIRED)


def features(case) -> list[str]:
    out = [f"padding={case.padding}", f"pe={'on' if case.use_pe else 'off'}", f"layout={case.layout}"]
    rec = _kinds.KINDS_BY_NAME.get(case.kind)
    if case.G > 1:
        out.append("groups>1")
    if 1 < case.G < case.H and rec is not None and any(f is None or getattr(case, f) for f in _group_switches(rec)):
        out.append("1<groups<heads")
    if case.seqlens is not None:
        out.append("packed")
    out.append("windows>0" if case.W > 0 and case.B > 0 else "windows=0")
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
