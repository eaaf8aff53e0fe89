"""Properties that do not trust the reference: each compares an
implementation with itself, so a bug the reference shares cannot hide.

- batch and head independence: changing one batch row or one head changes
  no other output (bit for bit);
- locality: a NaN token makes non-finite exactly the outputs of the windows
  that contain it, in its batch row and head; an inf token reaches no other
  window; any change of one token leaves every other window bit for bit;
- affinity in x (mean_pool, weighted_pool, linear): y(a x1 + (1-a) x2) =
  a y(x1) + (1-a) y(x2) within the tolerance model;
- padding="left" equals padding="valid" on x explicitly left-padded with
  L - S zero tokens per sequence;
- a packed batch equals its sequences compressed one by one (bit for bit
  where the backend declares itself batch-invariant).
"""

from __future__ import annotations

import kvcompress_reference as reference
import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

from kvcompress.testing import report
from kvcompress.testing.cases import make_inputs, with_x
from kvcompress.testing.convert import to_numpy
from kvcompress.testing.impls import for_kinds, requires
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.records import RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import forward_bound, x_rounding_bound

pytestmark = pytest.mark.kvcompress_property


def _run(impl, case, inputs):
    return to_numpy(RECORDS[impl.kind].call(impl.fn, case, inputs))


def _draw(data, impl, dtype, **kw):
    case = data.draw(cases(kind=impl.kind, dtype=dtype, **{**impl.limits, **kw}), label="case")
    inputs = make_inputs(case, RECORDS[impl.kind], impl.device)
    assume(forward_bound(case, inputs, impl.domain.precision).well_conditioned)
    return case, inputs


def _windows_containing(case, t):
    """Output window indices (packed order) whose window holds token t."""
    seqs = [case.T] if case.seqlens is None else list(case.seqlens)
    out, w, start = set(), 0, 0
    for n in seqs:
        for i in range(reference.num_windows(n, case.L, case.S, case.padding)):
            first = start + reference.window_start(i, case.L, case.S, case.padding)
            if max(first, start) <= t < first + case.L:   # positions before start are pad tokens
                out.add(w)
            w += 1
        start += n
    return out


@property_settings()
@given(data=st.data())
def test_batch_and_head_independence(impl, dtype, data):
    case, inputs = _draw(data, impl, dtype)
    assume(case.B * case.T > 0)
    report.checked()
    base = _run(impl, case, inputs)
    b = data.draw(st.integers(0, case.B - 1), label="batch_row")
    h = data.draw(st.integers(0, case.H - 1), label="head")
    rng = np.random.default_rng(case.seed + 1)
    for axis, i in ((0, b), (1, h)):
        x = inputs.x64.copy()
        idx = [slice(None)] * 4
        idx[axis] = i
        x[tuple(idx)] = rng.standard_normal(x[tuple(idx)].shape) * 2.0 ** case.x_exp
        got = _run(impl, case, with_x(case, inputs, x, impl.device))
        others = np.flatnonzero(np.arange(base.shape[axis]) != i)
        np.testing.assert_array_equal(np.take(got, others, axis), np.take(base, others, axis),
                                      err_msg=f"{impl.id}: changing {'batch row' if axis == 0 else 'head'} {i} "
                                              f"changed other outputs\n  {case!r}")


@pytest.mark.parametrize("poison", ["nan", "inf", "finite"])
@property_settings()
@given(data=st.data())
def test_locality(impl, dtype, poison, data):
    case, inputs = _draw(data, impl, dtype)
    assume(case.B * case.T > 0)
    report.checked()
    b = data.draw(st.integers(0, case.B - 1), label="batch_row")
    h = data.draw(st.integers(0, case.H - 1), label="head")
    t = data.draw(st.integers(0, case.T - 1), label="token")
    base = _run(impl, case, inputs)
    x = inputs.x64.copy()
    x[b, h, t, :] = {"nan": np.nan, "inf": np.inf, "finite": 2.0 ** case.x_exp * 3.0}[poison]
    got = _run(impl, case, with_x(case, inputs, x, impl.device))
    hit = np.zeros(got.shape[:3], bool)                     # [B, H, W]
    for w in _windows_containing(case, t):
        hit[b, h, w] = True
    note(f"token {t} of (batch {b}, head {h}) is in windows {sorted(_windows_containing(case, t))}")
    np.testing.assert_array_equal(got[~hit], base[~hit], err_msg=f"{impl.id}: changing token {t} of "
                                  f"(batch {b}, head {h}) changed a window that does not contain it\n  {case!r}")
    bad = ~np.isfinite(got).all(axis=-1)                    # [B, H, W]
    if poison == "nan":
        assert (bad == hit).all(), (f"{impl.id}: a NaN at token {t} of (batch {b}, head {h}) must make exactly "
                                    f"its windows {np.argwhere(hit).tolist()} non-finite, got "
                                    f"{np.argwhere(bad).tolist()}\n  {case!r}")
    else:
        assert not (bad & ~hit).any(), f"{impl.id}: {poison} token {t} leaked out of its windows\n  {case!r}"


@for_kinds(*(k for k, r in RECORDS.items() if r.affine_in_x))
@property_settings()
@given(data=st.data())
def test_affine_in_x(impl, dtype, data):
    case, inputs = _draw(data, impl, dtype)
    a = data.draw(st.sampled_from([0.5, 0.25, -1.0, 3.0]), label="a")
    rng = np.random.default_rng(case.seed + 2)
    x2 = with_x(case, inputs, rng.standard_normal(inputs.x64.shape) * 2.0 ** case.x_exp, impl.device)
    x3_exact = a * inputs.x64 + (1 - a) * x2.x64
    x3 = with_x(case, inputs, x3_exact, impl.device)
    bounds = [forward_bound(case, i, impl.domain.precision) for i in (inputs, x2, x3)]
    assume(all(b.well_conditioned for b in bounds))
    report.checked()
    y1, y2, y3 = (_run(impl, case, i) for i in (inputs, x2, x3))
    # y3 rounds its own input: add the rounding of x3 carried through the
    # linear map (relative in the normal range, absolute in the subnormals)
    # to the three outputs' own bounds
    tol = bounds[2].bound + abs(a) * bounds[0].bound + abs(1 - a) * bounds[1].bound \
        + x_rounding_bound(case, inputs, x3_exact)
    err = np.abs(y3 - (a * y1 + (1 - a) * y2))
    assert (err <= tol).all(), f"{impl.id}: not affine in x, worst error/bound {np.max(err / tol):.3g}\n  {case!r}"


def _left_padded(case, inputs, device):
    """The valid-padding case and inputs equal to ``case`` with left padding."""
    P = case.L - case.S
    seqs = [case.T] if case.seqlens is None else list(case.seqlens)
    parts, start = [], 0
    for n in seqs:
        parts.append(np.zeros(inputs.x64.shape[:2] + (P, case.D)))
        parts.append(inputs.x64[:, :, start:start + n])
        start += n
    x = np.concatenate(parts, axis=2) if parts else inputs.x64
    new = case.replace(padding="valid", T=x.shape[2],
                       seqlens=None if case.seqlens is None else tuple(n + P for n in seqs))
    return new, with_x(new, inputs, x, device)


# a kind whose pads are not zero tokens (gated_pool: a pad has weight 0, a
# zero token does not) has nothing to compare here
@for_kinds(*(k for k, r in RECORDS.items() if r.zero_pads))
@requires(lambda d: set(d.paddings) == {"valid", "left"}, "both paddings")
@property_settings()
@given(data=st.data())
def test_left_padding_is_valid_on_padded_input(impl, dtype, data):
    case, inputs = _draw(data, impl, dtype, paddings=("left",))
    valid_case, valid_inputs = _left_padded(case, inputs, impl.device)
    b_left, b_valid = (forward_bound(case, inputs, impl.domain.precision),
                      forward_bound(valid_case, valid_inputs, impl.domain.precision))
    assume(b_left.well_conditioned and b_valid.well_conditioned)
    report.checked()
    y_left, y_valid = _run(impl, case, inputs), _run(impl, valid_case, valid_inputs)
    assert y_left.shape == y_valid.shape, f"{impl.id}: {y_left.shape} != {y_valid.shape}\n  {case!r}"
    tol = b_left.bound + b_valid.bound        # both within their bound of the same exact value
    err = np.abs(y_left - y_valid)
    assert (err <= tol).all(), f"{impl.id}: left padding != valid on padded input\n  {case!r}"


@requires(lambda d: set(d.inputs) == {"batched", "packed"}, "packed and batched inputs")
@property_settings()
@given(data=st.data())
def test_packed_equals_one_by_one(impl, dtype, data):
    case, inputs = _draw(data, impl, dtype, packed=True)
    b_packed = forward_bound(case, inputs, impl.domain.precision)
    assume(b_packed.well_conditioned)
    report.checked()
    y_packed = _run(impl, case, inputs)
    parts, bounds, start = [], [], 0
    for n in case.seqlens:
        one = case.replace(seqlens=None, T=n)
        one_inputs = with_x(one, inputs, inputs.x64[:, :, start:start + n], impl.device,
                            tokens=lambda v, a=start, b=start + n: v[:, :, a:b])
        parts.append(_run(impl, one, one_inputs))
        bounds.append(forward_bound(one, one_inputs, impl.domain.precision).bound)
        start += n
    y_one = np.concatenate(parts, axis=2) if parts else y_packed[:, :, :0]
    assert y_one.shape == y_packed.shape, f"{impl.id}: {y_packed.shape} != {y_one.shape}\n  {case!r}"
    if impl.batch_invariant:   # the backend's promise: a window's bits do not depend on the rest of the call
        np.testing.assert_array_equal(y_packed, y_one, err_msg=f"{impl.id} declares batch_invariant, but a "
                                      f"packed batch differs from its sequences one by one\n  {case!r}")
    tol = b_packed.bound + (np.concatenate(bounds, axis=2) if bounds else 0.0)
    err = np.abs(y_packed - y_one)
    assert (err <= tol).all(), f"{impl.id}: packed batch != sequences one by one\n  {case!r}"


@requires(lambda d: len(d.layouts) > 1, "a strided layout")
@property_settings()
@given(data=st.data())
def test_layout_does_not_change_the_result(impl, dtype, data):
    """A (B, T, H, D) tensor passed as x.transpose(1, 2), or a sliced view,
    gives bit for bit what its contiguous copy gives (SPEC section 2)."""
    case, inputs = _draw(data, impl, dtype, layouts=("bthd", "sliced"))
    report.checked()
    got = _run(impl, case, inputs)
    flat = case.replace(layout="contiguous")
    want = _run(impl, flat, with_x(flat, inputs, inputs.x64, impl.device))
    np.testing.assert_array_equal(got, want, err_msg=f"{impl.id}: layout {case.layout} changed the result\n  {case!r}")
