"""The production-shape tier: every implementation equals the float64 oracle
within the tolerance model at the sizes NSA runs at.

The other properties stop at D <= 10 and a few windows, where a kernel runs
one feature tile, one block of windows and small token offsets. Here every
example crosses, with high probability, the tile boundaries of a typical
kernel: D > 64 (a second 64-wide feature tile), more than 256 windows in a
sequence, tokens beyond 4096 in a sequence (kvcompress/testing/production.py
draws the cases; kvcompress/testing/oracle.py is the memory-lean float64
oracle and its tolerance magnitudes, the same model as
kvcompress/testing/tolerance.py).

One example costs about a second on a CPU, so the ci profile runs only a
few per implementation and dtype (the first one, Hypothesis's smallest draw,
crosses all three boundaries). Failures are not shrunk in the strict
profiles: each shrink step costs as much as an example, and the printed
Case rebuilds the inputs exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import Phase, assume, event, given, note, settings
from hypothesis import strategies as st

from kvcompress.testing import oracle, quality, report
from kvcompress.testing.assertions import check_output_form
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import to_numpy
from kvcompress.testing.impls import for_impls
from kvcompress.testing.plugin import is_strict_profile, property_settings
from kvcompress.testing.production import FEATURE_TILE, LONG_OFFSET, WINDOW_BLOCK, production_cases, regimes
from kvcompress.testing.records import RECORDS
from kvcompress.testing.tolerance import compare

pytestmark = pytest.mark.kvcompress_property

# ci: 40 * 0.075 = 3 examples per implementation and dtype (up to about a
# second each on the CPU, mostly the float64 oracle); dev 2; thorough 75
SCALE, MINIMUM = 0.075, 2


def locate(case, w: int) -> str:
    """Where packed output window ``w`` lies: its sequence, its index in the
    sequence and the tokens it covers there (SPEC section 2)."""
    seqs = [case.T] if case.seqlens is None else list(case.seqlens)
    for k, n in enumerate(seqs):
        W = oracle.sequences(n, block_size=case.L, stride=case.S, padding=case.padding)[0][2]
        if w < W:
            first = w * case.S - (case.L - case.S if case.padding == "left" else 0)
            return (f"window {w} of sequence {k} ({n} tokens; window block {w // WINDOW_BLOCK} in blocks of "
                    f"{WINDOW_BLOCK}), its tokens {first}..{first + case.L - 1} of that sequence"
                    + (f" (past {LONG_OFFSET})" if first + case.L > LONG_OFFSET else ""))
        w -= W
    return f"window {w} past the last sequence"


def describe_failure(impl, case, inputs, got, expected, b, ratio, idx, err, rerun) -> str:
    x = inputs.x
    bi, h, w, c = idx
    return (f"{impl.kind} implementation {impl.name!r} differs from the float64 oracle at production shapes in "
            f"{case.dtype}: |error| = {err:.3g} at output index (b, h, w, c) = {idx}, {ratio:.3g} times its "
            f"tolerance {b.bound[idx]:.3g} (magnitude {b.magnitude[idx]:.3g}; got {got[idx]!r}, expected "
            f"{expected[idx]!r}).\n"
            f"  where: {locate(case, w)}; output feature {c} (feature tile {c // FEATURE_TILE} in tiles of "
            f"{FEATURE_TILE}); "
            f"{int((np.abs(got - expected) > b.bound).sum())} of {got.size} elements out of tolerance\n"
            f"  x: shape {tuple(x.shape)}, strides {tuple(x.stride())} ({case.layout}), dtype {x.dtype}; "
            f"L={case.L} S={case.S} padding={case.padding!r} G={case.G} pe={case.use_pe} "
            f"seqlens={case.seqlens}; crosses {', '.join(regimes(case)) or 'no tile boundary'}\n"
            f"  {case!r}\n  rerun: {rerun}  (or rebuild the inputs with make_inputs(Case(...)) from the line above)")


def _settings():
    s = property_settings(scale=SCALE, minimum=MINIMUM)
    if is_strict_profile():
        return settings(s, phases=[p for p in s.phases if p != Phase.shrink])
    return s


# Emulated backends (Triton's interpreter on the CPU, ~100x slower per op)
# cannot run production shapes (hours per example): the property is not
# generated for them; run this tier on the device the kernel is compiled for.
@for_impls(lambda impl: not impl.emulated, "production shapes are out of an emulator's reach")
@_settings()
@given(data=st.data())
def test_matches_reference_at_production_shapes(impl, dtype, data, kvcompress_rerun):
    rec = RECORDS[impl.kind]
    case = data.draw(production_cases(kind=impl.kind, dtype=dtype, device=impl.device, domain=impl.domain),
                     label="case")
    t = {}
    inputs = make_inputs(case, rec, impl.device)
    with report.timed(t, "reference"):
        expected, b = oracle.evaluate(case, inputs, impl.domain.precision)
    assume(b.well_conditioned)
    for r in regimes(case):
        event(r)
    k = report.key("production", impl.id, dtype)
    try:
        with report.timed(t, "impl"):
            got = rec.call(impl.fn, case, inputs)
    except Exception:
        report.observe(k, failed=True)
        raise
    check_output_form(impl, case, got, dtype, k)
    got64 = to_numpy(got)
    ok, ratio, idx, err = compare(got64, expected, b.bound)
    rms = quality.check(impl, case, inputs, got64, expected, b)
    report.observe(k, ratio=ratio, rms_ratio=rms, impl_seconds=t["impl"], reference_seconds=t["reference"],
                   failed=not ok or (rms is not None and rms > 1))
    note(f"{case!r}\nworst error / bound = {ratio:.3g}; RMS ratio {rms}; crosses {regimes(case)}")
    assert ok, describe_failure(impl, case, inputs, got64, expected, b, ratio, idx, err, kvcompress_rerun)
    assert rms is None or rms <= 1, quality.failure(impl, case, rms, " at production shapes") + \
        f"\n  rerun: {kvcompress_rerun}"
    assert np.isfinite(expected).all()
