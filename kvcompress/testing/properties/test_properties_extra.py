"""Properties added because the mutation self-test (tests/test_mutants.py,
docs/mutants.md) found bugs the main draws cannot see.

- realistic regime: the main strategies draw value magnitudes over dozens
  of binades (2**-60 .. 2**60 in float64) and windows of at most 6 tokens.
  Two kinds of real bug live elsewhere:

  * nonlinearities are only nonlinear near |z| ~ 1: an MLP whose
    pre-activations are 2**40 or 2**-40 cannot tell exact GELU from its
    tanh approximation (mutant ``mlp.gelu_tanh`` survived every property);
  * rounding in a half-precision accumulator grows with the length of the
    sum and with a common sign of its terms: over 6 zero-mean tokens it
    stays below the output's own rounding (mutant
    ``mean_pool.half_accumulate`` survived every property).

  * the tolerance model bounds a sum by its worst case (about n u_o times
    the sum of |terms|); a half-precision accumulator only reaches that
    when the terms share a sign, so zero-mean weights hide it too.

  So this property draws NSA-sized windows (L up to 64), unit-scale values
  (magnitudes=False), tokens N(offset, 1) with a common offset and weights
  (N(weight_offset, 1) / sqrt(fan_in)), and compares with the reference
  under the unchanged tolerance model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

from kvcompress.testing import coverage, quality, report
from kvcompress.testing.cases import make_inputs, with_x
from kvcompress.testing.convert import DTYPES, round_to, to_numpy
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.records import RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import compare, forward_bound

# windows as long as NSA's (L = 32 or 64); few of them, small D and few
# heads so the loop reference stays fast at this length
REALISTIC = dict(max_block=64, max_dim=4, max_windows=2, max_batch=2, max_heads=4, max_seqs=2, magnitudes=False)
# token offsets in units of the tokens' standard deviation: 0 is the
# zero-mean case, 1 and 8 make the partial sums grow linearly with L
OFFSETS = (0.0, 1.0, 8.0)
# weight offsets in units of the weights' standard deviation
WEIGHT_OFFSETS = (0.0, 1.0)


def with_weight_offset(case, inputs, offset, device):
    """The same inputs with every parameter shifted by offset / sqrt(fan_in)
    (its standard deviation at unit scale), rounded to the case's dtype and
    kept in the case's parameter layout."""
    params64, params = {}, {}
    for spec in RECORDS[case.kind].params:
        a = inputs.params64[spec.name]
        if a is not None:
            a = round_to(a + offset / np.sqrt(spec.fan_in(case)), case.dtype)
        params64[spec.name] = a
        t = None if a is None else torch.from_numpy(a).to(DTYPES[case.dtype]).to(device)
        if t is not None and not case.params_contiguous and t.dim() >= 2:
            t = t.mT.contiguous().mT   # same values, column-major strides (as kvcompress/testing/cases.py)
        params[spec.name] = t
    return dataclasses.replace(inputs, params64=params64, params=params)


pytestmark = pytest.mark.kvcompress_property


@property_settings()
@given(data=st.data())
def test_matches_reference_in_realistic_regime(impl, dtype, data):
    rec = RECORDS[impl.kind]
    case = data.draw(cases(kind=impl.kind, dtype=dtype, **{**REALISTIC, **impl.limits}), label="case")
    offset = data.draw(st.sampled_from(OFFSETS), label="offset")
    weight_offset = data.draw(st.sampled_from(WEIGHT_OFFSETS), label="weight_offset")
    inputs = make_inputs(case, rec, impl.device)
    inputs = with_x(case, inputs, inputs.x64 + offset, impl.device)    # [B, H, T, D], rounded to dtype
    inputs = with_weight_offset(case, inputs, weight_offset, impl.device)
    b = forward_bound(case, inputs, impl.domain.precision)
    assume(b.well_conditioned)
    coverage.record(impl.id, dtype, case, impl.domain)   # the promised features count over both value properties
    k = report.key("matches_reference_in_realistic_regime", impl.id, dtype)
    try:
        got = rec.call(impl.fn, case, inputs)
    except Exception:
        report.observe(k, failed=True)
        raise
    expected = rec.call_reference(case, inputs)
    want_shape = (case.B, case.H, case.W, rec.d_out(case))
    if tuple(got.shape) != want_shape or got.dtype != DTYPES[dtype]:
        report.observe(k, failed=True)
    assert tuple(got.shape) == want_shape, f"{impl.id}: output shape {tuple(got.shape)}, expected {want_shape}\n" \
                                           f"  {case!r}"
    assert got.dtype == DTYPES[dtype], f"{impl.id}: output dtype {got.dtype}, expected {DTYPES[dtype]}\n  {case!r}"
    got64 = to_numpy(got)
    ok, ratio, idx, err = compare(got64, expected, b.bound)
    rms = quality.check(impl, case, inputs, got64, expected, b)
    report.observe(k, ratio=ratio, rms_ratio=rms, failed=not ok or (rms is not None and rms > 1))
    note(f"offsets {offset}, {weight_offset}; worst error / bound = {ratio:.3g}; RMS ratio {rms}")
    assert ok, (f"{impl.id} differs from the reference in {dtype} (tokens N({offset}, 1), weights "
                f"N({weight_offset}, 1) / sqrt(fan_in)): |error| = {err:.3g} at "
                f"(b, h, w, c) = {idx}, {ratio:.3g} times its bound {b.bound[idx]:.3g} (got {got64[idx]!r}, "
                f"expected {expected[idx]!r})\n  {case!r}")
    assert rms is None or rms <= 1, quality.failure(
        impl, case, rms, f" (tokens N({offset}, 1), weights N({weight_offset}, 1) / sqrt(fan_in))")
    assert np.isfinite(expected).all()
