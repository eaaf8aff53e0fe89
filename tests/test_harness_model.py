"""Checks of the harness's own models (kvcompress/testing): the analytic
exact gradients against finite differences of the loop reference, and the
conditioning rules. They verify the suite, not an implementation, so they
live here rather than in the shipped properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kvcompress.testing import windows
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import round_to
from kvcompress.testing.gradients import exact_and_bounds
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import UNIT_ROUNDOFF, x_rounding_bound


@pytest.mark.parametrize("kind", KINDS)
@property_settings()
@given(data=st.data())
def test_exact_gradients_match_finite_differences(kind, data):
    """Central differences of the loop reference, h = 1e-6 relative, on a few
    coordinates of every input. Their error is ~h^2 |f'''| + u_64 |f| / h,
    about 1e-10 of the magnitude; a wrong formula is off by O(1) of it, so
    1e-6 of the magnitude separates the two by four orders either way."""
    rec = RECORDS[kind]
    case = data.draw(cases(kind=kind, dtype="float64", magnitudes=False, max_batch=1, max_heads=2, max_dim=3,
                           max_block=3, max_windows=2, max_seqs=2, layouts=("contiguous",)), label="case")
    assume(case.B * case.W > 0)
    inputs = make_inputs(case, rec)
    if kind == "mlp" and case.activation == "relu":
        win = windows.gather_windows(inputs.x64, pe=inputs.pe64, seqlens=case.seqlens, **case.window_kwargs())
        pre = np.einsum("bhwk,hkf->bhwf", win.reshape(*win.shape[:3], -1),
                        inputs.params64["w1"][windows.group_of_head(case.G, case.H)])
        if inputs.params64["b1"] is not None:
            pre = pre + inputs.params64["b1"][windows.group_of_head(case.G, case.H)][None, :, None, :]
        assume(np.abs(pre).min() > 1e-3)   # a kink within h of a unit makes differences meaningless
    rng = np.random.default_rng(case.seed + 11)
    g = rng.standard_normal((case.B, case.H, case.W, rec.d_out(case)))
    gb = exact_and_bounds(case, inputs, g)
    tensors = {"x": inputs.x64, **{k: v for k, v in inputs.params64.items() if v is not None}}
    if inputs.pe64 is not None:
        tensors["pe"] = inputs.pe64

    def f():
        return float((rec.call_reference(case, inputs) * g).sum())

    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        mag = float(np.abs(gb.exact[name]).max(initial=0.0)) + 1.0
        for i in rng.choice(flat.size, size=min(6, flat.size), replace=False):
            v = flat[i]
            h = 1e-6 * max(1.0, abs(v))
            flat[i] = v + h
            fp = f()
            flat[i] = v - h
            fm = f()
            flat[i] = v
            fd = (fp - fm) / (2 * h)
            exact = gb.exact[name].reshape(-1)[i]
            assert abs(fd - exact) <= 1e-6 * mag, f"d/d{name}[{i}]: finite difference {fd} != exact {exact}\n  {case!r}"




def test_gradient_beyond_the_dtype_is_not_well_conditioned():
    """A case whose exact gradient overflows the dtype has no representable
    answer: the thorough profile on the GPU (run 10) drew this float16
    attention_pool case, whose weight gradient of about -76000 lies beyond
    float16's 65504, and every float16 result is -inf. The model marks it
    ill-conditioned (the gradient's magnitude is checked against the
    dtype's overflow, as the forward's is), so the property skips it."""
    from kvcompress.testing.cases import Case
    from kvcompress.testing.tolerance import LARGEST
    case = Case(kind="attention_pool", dtype="float16", B=1, H=2, G=2, T=9, D=3, block_size=3, stride=3,
                padding="valid", seqlens=(9,), cu_dtype="int32", use_pe=True, D_out=1, F=1, bias=False,
                bias2=False, activation="relu", layout="contiguous", params_contiguous=False, seed=4294959104,
                x_exp=6, w_exp=-6)
    rec = RECORDS["attention_pool"]
    inputs = make_inputs(case, rec)
    g = round_to(np.random.default_rng(case.seed + 7).standard_normal((case.B, case.H, case.W, rec.d_out(case))),
                 "float16")
    gb = exact_and_bounds(case, inputs, g)
    assert np.abs(gb.exact["weight"]).max() > LARGEST["float16"]
    assert not gb.well_conditioned
    small = Case(**{**case.__dict__, "x_exp": 0, "w_exp": 0})       # the same case at unit scale is fine
    assert exact_and_bounds(small, make_inputs(small, rec), g).well_conditioned


@property_settings()
@given(data=st.data())
def test_x_rounding_bound_covers_rounding_into_subnormals(data):
    """The affine property's allowance for rounding x3 into the dtype
    (x_rounding_bound) covers what that rounding does to the output, from
    huge tokens down to ones deep in the dtype's subnormals, where the
    rounding error is absolute: the linear part applied to the exact
    perturbation fl(x) - x never exceeds it (both sides in float64; the
    factor 1 + 1e-12 covers their own rounding)."""
    kind = data.draw(st.sampled_from([k for k, r in RECORDS.items() if r.affine_in_x]), label="kind")
    dtype = data.draw(st.sampled_from(("float32", "float16", "bfloat16")), label="dtype")
    case = data.draw(cases(kind=kind, dtype=dtype, max_batch=2, max_heads=2, max_dim=4), label="case")
    x_exp = data.draw(st.integers(-150 if dtype != "float16" else -30, 6), label="x_exp")
    inputs = make_inputs(case, RECORDS[kind])
    x_exact = np.random.default_rng(case.seed + 5).standard_normal(inputs.x64.shape) * 2.0 ** x_exp
    delta = round_to(x_exact, dtype) - x_exact                     # exact (Sterbenz, or x rounded to 0)
    params = [None if n == "bias" else v for n, v in inputs.params64.items()]
    moved = getattr(windows, kind)(windows.gather_windows(delta, seqlens=case.seqlens, **case.window_kwargs()),
                                   *params)
    allowed = x_rounding_bound(case, inputs, x_exact)
    assert np.all(np.abs(moved) <= allowed * (1 + 1e-12)), f"{np.max(np.abs(moved) / allowed):.3g}\n  {case!r}"


def test_x_rounding_bound_is_needed_below_the_normal_range():
    """Why x_rounding_bound has its absolute term: float16 tokens near 2**-20
    round to multiples of 2**-24, errors far beyond u_o times themselves."""
    x = np.random.default_rng(0).standard_normal(1000) * 2.0 ** -20
    err = np.abs(round_to(x, "float16") - x)
    assert np.any(err > UNIT_ROUNDOFF["float16"] * np.abs(x) * 100)
    assert np.all(err <= UNIT_ROUNDOFF["float16"] * np.abs(x) + 2.0 ** -25)
