"""The streaming properties must reject every streaming mutant
(tests/mutants/streaming.py) and accept kvcompress.streaming as it is.

The streaming properties (tests/test_streaming.py) verify the built-in
backends, not an ``--impl``, so each mutant is applied by monkeypatching
``kvcompress.streaming``, and the properties run in this process: each
property's body (``.hypothesis.inner_test``) under a Hypothesis run of its
own, deterministic like the ci profile (40 examples, derandomized, seeded
from the property, the backend and the dtype, so a mutant and the control
draw the same examples), without shrinking. A mutant is killed when the
first property that fails, in the order below, fails on an AssertionError:
another exception (the step refusing its own state, a crash) is no kill.
``test_streaming_properties_accept_the_module`` runs the same properties on
the same examples without a mutant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption

import kvcompress.streaming as ks
from tests import test_streaming as streaming_properties
from tests.mutants.streaming import STREAMING_CLASSES, STREAMING_MUTANTS

# the properties, in run order (tests/test_streaming.py's), and how each is
# called for one backend: streamed vs full pass, vs the reference's
# streaming, reset, save/load; for kinds whose pads are not zero tokens also
# the -inf pads property and the (not Hypothesis) pad test
DTYPE = "float32"
PROPERTIES = (
    ("test_stream_equals_full_pass", lambda impl: dict(stream_impl=impl, full_impl=impl, dtype=DTYPE)),
    ("test_stream_matches_reference_streaming", lambda impl: dict(builtin=impl, dtype=DTYPE)),
    ("test_reset", lambda impl: dict(builtin=impl)),
    ("test_state_round_trip", lambda impl: dict(builtin=impl)),
    ("test_left_pads_of_weight_zero_stream_as_the_full_pass", lambda impl: dict(builtin=impl)),
    ("test_state_pads_follow_the_kind", None),
)
PADDED = ("test_left_pads_of_weight_zero_stream_as_the_full_pass", "test_state_pads_follow_the_kind")
EXAMPLES = 40      # the ci profile's


def _impl(kind: str):
    """The kind's first built-in backend that streams here (the torch one on a CPU)."""
    return next(i for i in streaming_properties.IMPLS if i.kind == kind)


def properties(kind: str) -> list[str]:
    """The properties a streaming mutant of ``kind`` faces, in run order."""
    zero_pads = streaming_properties._zero_pads(kind)
    return [name for name, _ in PROPERTIES if not (zero_pads and name in PADDED)]


@dataclass
class Outcome:
    """One property's run: examples run, the 1-based index of the first
    that raised (None: passed) and its error ("Type: first line")."""

    examples: int
    first_failure: int | None
    error: str


def _counted(out: Outcome, call) -> None:
    """Run one example, ``call()``, counting it in ``out``; re-raises."""
    try:
        call()
    except UnsatisfiedAssumption:
        raise
    except Exception as e:
        out.examples += 1
        if out.first_failure is None:
            out.first_failure = out.examples
            out.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
        raise
    out.examples += 1


def run_property(name: str, kind: str) -> Outcome:
    """Run one streaming property on the kind's backend. A failing example
    is reported in the Outcome, not raised; a run that cannot start
    (a health check) raises."""
    impl = _impl(kind)
    fn = getattr(streaming_properties, name)
    call = dict(PROPERTIES)[name]
    out = Outcome(0, None, "")
    if call is None:                  # a plain test: one example
        try:
            _counted(out, fn)
        except Exception:
            pass
        return out
    inner, args = fn.hypothesis.inner_test, call(impl)
    key = f"{name}|{impl.id}|{DTYPE}"

    @seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, report_multiple_bugs=False,
              phases=(Phase.explicit, Phase.reuse, Phase.generate),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data):
        _counted(out, lambda: inner(**args, data=data))

    try:
        run()
    except Exception:
        if out.first_failure is None:   # not an example's failure: Hypothesis refused to run
            raise
    return out


KINDS = sorted({m.kind for m in STREAMING_MUTANTS})


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_properties_accept_the_module(kind):
    """Without a mutant, every property passes on the examples the mutants face."""
    for name in properties(kind):
        o = run_property(name, kind)
        assert o.first_failure is None, f"{name} on {_impl(kind).id}: {o.error}"
        assert o.examples > 0, f"{name} on {_impl(kind).id} checked no example"
        print(f"\n{name} on {_impl(kind).id}: {o.examples} examples passed")


@pytest.mark.parametrize("mutant", STREAMING_MUTANTS, ids=[m.name for m in STREAMING_MUTANTS])
def test_streaming_mutant_killed(mutant, monkeypatch, record_property):
    """The first property that fails on the mutant fails on an assertion."""
    for attr, value in mutant.patches(ks).items():
        assert hasattr(ks, attr), f"{mutant.name}: kvcompress.streaming has no {attr!r} to replace"
        monkeypatch.setattr(ks, attr, value)
    for name in properties(mutant.kind):
        o = run_property(name, mutant.kind)
        if o.first_failure is not None:
            record_property("killed_by", name)
            record_property("examples_to_first_counterexample", o.first_failure)
            print(f"\n{mutant.name}: killed by {name} at example {o.first_failure} ({o.error[:120]})")
            assert o.error.startswith("AssertionError"), \
                f"{mutant.name}: {name} failed, but not on an assertion (no kill): {o.error}"
            return
    pytest.fail(f"{mutant.name} SURVIVED every streaming property: {mutant.summary} (bug class: {mutant.bug_class})")


def test_every_streaming_class_has_a_mutant():
    assert {m.bug_class for m in STREAMING_MUTANTS} == set(STREAMING_CLASSES)
    assert len({m.name for m in STREAMING_MUTANTS}) == len(STREAMING_MUTANTS)


def test_docs_list_every_streaming_mutant():
    """docs/mutants.md has a row (`name` | kind | bug class) for every streaming mutant."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "mutants.md").read_text()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in doc.splitlines()
            if line.startswith("| `")}
    missing = [m.name for m in STREAMING_MUTANTS if (f"`{m.name}`", m.kind, m.bug_class) not in rows]
    assert not missing, f"docs/mutants.md lacks a row (`name` | kind | bug class) for: {missing}"
