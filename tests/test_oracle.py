"""The memory-lean oracle (kvcompress/testing/oracle.py) against the two
other readings of SPEC: the loop reference at small shapes, the gathered
windows of windows.py at medium ones; and its tolerance Bound against
tolerance.forward_bound's, which must be the same model. Also the
production-shape strategy it serves (kvcompress/testing/production.py):
inside the domain and the budget, and at the tile boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from kvcompress.testing import Domain, oracle, tolerance, windows
from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.production import BUDGETS, production_cases, regimes
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases

DTYPES = ("float64", "float32", "float16", "bfloat16")
# float64 arithmetic in another order: relative to the magnitude, a few
# hundred ulps at most for sums of a few thousand terms
REL = 1e-12


def assert_same_bound(b, b0, case):
    assert b.well_conditioned == b0.well_conditioned, case
    np.testing.assert_allclose(b.magnitude, b0.magnitude, rtol=REL, atol=0, err_msg=repr(case))
    np.testing.assert_allclose(b.bound, b0.bound, rtol=REL, atol=0, err_msg=repr(case))


def window_oracle(case, inputs):
    """windows.py's answer and bound (tolerance.forward_bound's small path)."""
    rec = RECORDS[case.kind]
    y = rec.vectorized(case, inputs.x64, rec.args(inputs, torch_side=False), inputs.pe64, case.seqlens)
    return y, tolerance.forward_bound(case, inputs)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30)
@given(data=st.data())
def test_oracle_matches_loop_reference(kind, data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    case = data.draw(cases(kind=kind, dtype=dtype), label="case")
    rec = RECORDS[kind]
    inputs = make_inputs(case, rec)
    b0 = tolerance.forward_bound(case, inputs)
    y, b = oracle.evaluate(case, inputs)
    assert y.shape == (case.B, case.H, case.W, rec.d_out(case))
    assert_same_bound(b, b0, case)
    loop = rec.call_reference(case, inputs)
    if b0.well_conditioned:   # else logits too large for float64 orders to agree
        assert np.all(np.abs(y - loop) <= REL * b0.magnitude + 1e-300), repr(case)


# medium: two feature tiles, more than 256 windows, left pads, groups, pe, packed
MEDIUM = [
    dict(B=2, H=4, G=2, T=700, D=70, block_size=8, stride=2, padding="left", use_pe=True, D_out=66, F=9,
         bias=True, bias2=True, activation="gelu"),
    dict(B=1, H=2, G=1, T=900, D=65, block_size=12, stride=3, padding="valid", seqlens=(0, 5, 600, 11, 284),
         use_pe=True, D_out=3, F=17, bias=True, activation="silu"),
    dict(B=1, H=3, G=3, T=1030, D=20, block_size=5, stride=4, padding="left", seqlens=(1030,), D_out=80, F=4,
         bias2=True),
]


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("shape", range(len(MEDIUM)))
@pytest.mark.parametrize("kind", oracle.LEAN_KINDS)
def test_oracle_matches_gathered_windows_at_medium_shapes(kind, shape, dtype):
    case = Case(kind=kind, dtype=dtype, seed=shape, **MEDIUM[shape])
    assert case.W > 256 or case.D > 64
    inputs = make_inputs(case, RECORDS[kind])
    y0, b0 = window_oracle(case, inputs)
    y, b = oracle.evaluate(case, inputs)
    assert b0.well_conditioned
    np.testing.assert_array_less(np.abs(y - y0), REL * b0.magnitude + 1e-300)
    assert_same_bound(b, b0, case)
    assert_same_bound(oracle.forward_bound(case, inputs), b0, case)


def test_forward_bound_takes_the_lean_path_above_its_size(monkeypatch):
    case = Case(kind="attention_pool", dtype="float32", B=1, H=2, T=300, D=9, block_size=6, stride=2, use_pe=True,
                seed=3)
    inputs = make_inputs(case, RECORDS[case.kind])
    small = tolerance.forward_bound(case, inputs)
    monkeypatch.setattr(tolerance, "LEAN_ABOVE", 0)
    monkeypatch.setattr(windows, "gather_windows", None)   # the lean path never gathers
    assert_same_bound(tolerance.forward_bound(case, inputs), small, case)


def test_oracle_window_positions_are_strided_views():
    """Nothing is gathered: every window position of a valid-padding
    sequence is a view of x."""
    x = np.arange(2 * 3 * 40 * 5, dtype=np.float64).reshape(2, 3, 40, 5)
    pos = oracle._positions(x, 4, 30, 6, block_size=8, stride=4, padding="valid")
    for j in range(8):
        assert np.shares_memory(pos(j), x)
        np.testing.assert_array_equal(pos(j), x[:, :, [4 + i * 4 + j for i in range(6)]])


# -- the production strategy (kvcompress/testing/production.py), which the oracle serves --------------

DOMAINS = [
    Domain(),
    Domain(paddings=("valid",), groups="per_head", pe=False, inputs=("batched",), empty=False, block_sizes=(2, 4),
           strides="equal", layouts=("contiguous",)),
    Domain(inputs=("packed",), groups="shared", head_dim_multiple=48, block_sizes=(64, 128), strides="divides",
           bias=False, bias2=False, activations=("silu",), max_heads=2, max_tokens=6000),
    Domain(max_dim=40, max_batch=1, max_hidden=8, d_out_equals_d=True, paddings=("left",)),
]


@pytest.mark.parametrize("domain", range(len(DOMAINS)))
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25)
@given(data=st.data())
def test_production_cases_stay_inside_the_domain_and_budget(kind, domain, data):
    d = DOMAINS[domain]
    case = data.draw(production_cases(kind=kind, dtype="float32", domain=d), label="case")
    assert d.allows(case), case
    assert case.D_out == case.D or not (d.d_out_equals_d and RECORDS[kind].has_dout)
    assert d.max_hidden is None or case.F <= d.max_hidden
    bud = BUDGETS["cpu"]
    assert case.T <= bud.max_tokens and case.B * case.H * case.T * case.D <= bud.elements, case
    assert case.W > 0 or d.empty


@pytest.mark.parametrize("kind", KINDS)
def test_the_smallest_production_case_crosses_every_tile_boundary(kind):
    """Hypothesis tries the smallest draw first: with it alone, every tile
    boundary is crossed (a bug there is found at the first example)."""
    case = find(production_cases(kind=kind, dtype="float32"), lambda c: True)
    assert regimes(case) == ["D>64", "windows>256", "tokens>4096"], case
