"""The main property: every implementation equals the loop reference within
the tolerance model (kvcompress/testing/tolerance.py) of its precision class
(SPEC 3c, ``Domain.precision``), on every drawn case; a ``strict`` kernel in
float32/float16/bfloat16 also passes the RMS quality check
(kvcompress/testing/quality.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from kvcompress.testing import coverage, quality, report
from kvcompress.testing.assertions import check_output_form
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import to_numpy
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.records import RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import compare, forward_bound


def describe_failure(impl, case, inputs, got, expected, b, ratio, idx, err, rerun) -> str:
    x = inputs.x
    return (f"{impl.kind} implementation {impl.name!r} differs from the reference in {case.dtype}: |error| = "
            f"{err:.3g} at output index (b, h, w, c) = {idx}, {ratio:.3g} times its tolerance {b.bound[idx]:.3g} "
            f"(magnitude {b.magnitude[idx]:.3g}; got {got[idx]!r}, expected {expected[idx]!r}).\n"
            f"  x: shape {tuple(x.shape)}, strides {tuple(x.stride())} ({case.layout}), dtype {x.dtype}; "
            f"L={case.L} S={case.S} padding={case.padding!r} G={case.G} pe={case.use_pe} "
            f"cu_seqlens={None if inputs.cu64 is None else inputs.cu64.tolist()}\n"
            f"  {case!r}\n  rerun: {rerun}  (add the @reproduce_failure line below for this exact example)")


pytestmark = pytest.mark.kvcompress_property


@property_settings()
@given(data=st.data())
def test_matches_reference(impl, dtype, data, kvcompress_rerun):
    rec = RECORDS[impl.kind]
    case = data.draw(cases(kind=impl.kind, dtype=dtype, **impl.limits), label="case")
    inputs = make_inputs(case, rec, impl.device)
    precision = impl.domain.precision
    b = forward_bound(case, inputs, precision)
    assume(b.well_conditioned)
    coverage.record(impl.id, dtype, case, impl.domain)
    for f in coverage.features(case):
        event(f)
    t = {}
    with report.timed(t, "reference"):
        expected = rec.call_reference(case, inputs)
    k = report.key("matches_reference", impl.id, dtype)
    try:
        with report.timed(t, "impl"):
            got = rec.call(impl.fn, case, inputs)
    except Exception:
        report.observe(k, failed=True)
        raise
    check_output_form(impl, case, got, dtype, k)
    got64 = to_numpy(got)
    ok, ratio, idx, err = compare(got64, expected, b.bound)
    strict = ratio if precision == "strict" else compare(got64, expected, forward_bound(case, inputs).bound)[1]
    rms = quality.check(impl, case, inputs, got64, expected, b)
    report.observe(k, ratio=ratio, strict_ratio=strict, rms_ratio=rms, impl_seconds=t["impl"],
                   reference_seconds=t["reference"], failed=not ok or (rms is not None and rms > 1))
    note(f"worst error / bound = {ratio:.3g} ({precision}); / strict bound = {strict:.3g}; RMS ratio = {rms}")
    assert ok, describe_failure(impl, case, inputs, got64, expected, b, ratio, idx, err, kvcompress_rerun)
    assert rms is None or rms <= 1, quality.failure(impl, case, rms) + f"\n  rerun: {kvcompress_rerun}"
    assert np.isfinite(expected).all()
