"""Deliberately wrong implementations: the proof that the suite catches bugs.

Each mutant is a callable with the reference signature on torch tensors
(like ``kvcompress.functional.linear``), living in ``tests.mutants.<kind>``,
registered with ``@mutant(BUG_CLASS)`` and documented by its docstring: the
first line names the bug, the rest the real kernel mistake it stands for.
Every module also has ``control``: the same code with no bug, which the
suite must accept (``tests/test_mutants.py`` checks both).

``all_mutants()`` imports one module per kind and returns every registered
mutant; ``tests/test_mutants.py`` runs the property suite on each through
``--impl KIND=tests.mutants.KIND:NAME`` and requires it to fail.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from kvcompress.kinds import KINDS
from kvcompress.testing.domain import declare_domain  # the library's kinds: a kind without mutants fails test_mutants

# the bug classes of issue 3 item 5, each covered by at least one mutant
WINDOW = "window start or stride"
PADDING = "padding amount"
WINDOW_COUNT = "dropped or extra window"
PE = "pe mis-applied"
GROUPS = "group-to-head mapping"
FLATTEN = "flatten order"
BIAS_ACT = "bias or activation"
SOFTMAX = "softmax axis or shift"
HALF = "half-precision accumulation"
DTYPE = "output dtype"
MIXING = "batch or head mixing"
CONTIGUOUS = "contiguous memory assumed"
PACKED = "packed sequences bleed"
NAN = "NaN leaks across windows"
# issue 12 item 4: what only production shapes reach (a second feature tile,
# a later block of windows, long token offsets)
TILE = "tile boundary"
# issue 13 item 4: backward bugs, the forward exactly right and the gradient
# wrong (tests/mutants/_base.py's backward_only): only a gradient property sees them
GRAD_OVERLAP = "backward: overlapping windows"      # dx of a token held by several windows lost or doubled
GRAD_HALF = "backward: half-precision accumulation"  # a weight gradient summed over windows in x's dtype
GRAD_SPLIT_K = "backward: split-K partials"         # a weight gradient from the first partial only
GRAD_PE_PADS = "backward: pe on pads"               # dpe skips the pad positions
GRAD_TILE = "backward: tile boundary"               # dx of a second feature tile lost
GRAD_LAYOUT = "backward: weight layout"             # a weight read transposed in the backward only
GRAD_GROUPS = "backward: group reduction"           # a parameter gradient not summed over a group's heads
GRAD_CHUNK = "backward: split chunk"                # dz of one split chunk lost
BACKWARD_CLASSES = (GRAD_OVERLAP, GRAD_HALF, GRAD_SPLIT_K, GRAD_PE_PADS, GRAD_TILE, GRAD_LAYOUT, GRAD_GROUPS,
                    GRAD_CHUNK)
BUG_CLASSES = (WINDOW, PADDING, WINDOW_COUNT, PE, GROUPS, FLATTEN, BIAS_ACT, SOFTMAX, HALF, DTYPE, MIXING,
               CONTIGUOUS, PACKED, NAN, TILE, *BACKWARD_CLASSES)
# beyond the list
WEIGHT_LAYOUT = "weight layout"


@dataclass(frozen=True)
class Mutant:
    """kind (one of KINDS), name (the callable's name in tests.mutants.<kind>),
    bug_class (one of BUG_CLASSES or WEIGHT_LAYOUT), fn (the callable),
    survives (empty, or why no property can kill it yet: a known survivor,
    which tests/test_mutants.py requires to survive)."""

    kind: str
    name: str
    bug_class: str
    fn: Callable
    survives: str = ""

    @property
    def target(self) -> str:
        """The --impl value: ``KIND=tests.mutants.KIND:NAME``."""
        return f"{self.kind}=tests.mutants.{self.kind}:{self.name}"

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line: what the bug does."""
        return " ".join((self.fn.__doc__ or "").strip().split("\n\n")[0].split())


_REGISTRY: dict[str, Mutant] = {}


def strict(fn: Callable) -> Callable:
    """Declare ``fn`` of the ``strict`` precision class (SPEC 3c): the
    controls and mutants compute in float32 and round once
    (tests/mutants/_base.py), so the suite holds them to the strict bound
    and the RMS check, not to the io-intermediates default of a
    contributor's kernel."""
    return declare_domain(precision="strict")(fn)


def mutant(bug_class: str, *, survives: str = "") -> Callable[[Callable], Callable]:
    """Decorator: register the function as a mutant of its module's kind.

    bug_class: one of BUG_CLASSES or WEIGHT_LAYOUT. survives: for a bug that
    no property can reach yet, what the suite lacks (the self-test then
    requires it to survive and reports it as an expected failure, so a
    property that starts killing it is noticed). Raises ValueError for
    another class, a module outside tests.mutants.<kind>, a missing
    docstring or a name registered twice."""
    if bug_class not in (*BUG_CLASSES, WEIGHT_LAYOUT):
        raise ValueError(f"mutant: bug_class must be one of {BUG_CLASSES + (WEIGHT_LAYOUT,)}, got {bug_class!r}")

    def deco(fn: Callable) -> Callable:
        kind = fn.__module__.rsplit(".", 1)[-1]
        if kind not in KINDS:
            raise ValueError(f"mutant: {fn.__qualname__} must live in tests.mutants.<kind>, not {fn.__module__}")
        if not (fn.__doc__ or "").strip():
            raise ValueError(f"mutant: {kind}.{fn.__name__} needs a docstring naming its bug")
        key = f"{kind}:{fn.__name__}"
        if key in _REGISTRY:
            raise ValueError(f"mutant: {key} is registered twice")
        _REGISTRY[key] = Mutant(kind, fn.__name__, bug_class, fn, survives)
        return strict(fn)

    return deco


def all_mutants() -> list[Mutant]:
    """Every registered mutant, in kind order, then in source order."""
    for kind in KINDS:
        importlib.import_module(f"{__name__}.{kind}")
    return sorted(_REGISTRY.values(), key=lambda m: KINDS.index(m.kind))


def controls() -> list[str]:
    """The --impl values of the bug-free controls, one per kind."""
    return [f"{kind}=tests.mutants.{kind}:control" for kind in KINDS]
