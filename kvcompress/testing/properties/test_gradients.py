"""Gradients with respect to x, every weight and pe.

- every differentiable implementation (its domain says so; the default):
  its gradients equal the exact float64 gradients within the backward
  tolerance model (kvcompress/testing/gradients.py) of its precision class
  (SPEC 3c, ``Domain.precision``), in every dtype it supports. A non-empty
  output that does not require grad fails: an implementation whose outputs
  are differentiable in some calls and not in others is broken, and a forward-only kernel says so in its domain
  (``Domain(differentiable=False)``), which the matrix then shows;
- torch.autograd.gradcheck and gradgradcheck in float64, where the
  implementation supports float64.

The exact gradients themselves are checked against finite differences of
the loop reference in this repository's tests/test_harness_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

from kvcompress.testing import report
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import round_to, to_numpy
from kvcompress.testing.gradients import exact_and_bounds
from kvcompress.testing.impls import for_impls, needs_dtype, requires
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.records import RECORDS
from kvcompress.testing.strategies import cases

pytestmark = pytest.mark.kvcompress_property
differentiable = requires(lambda d: d.differentiable, "differentiable (gradients)")

SMALL = dict(max_batch=2, max_heads=4, max_dim=5, max_block=4, max_windows=3, max_seqs=3)


def _leaves(rec, inputs):
    """Leaf copies (same strides) of x, the parameters and pe, requiring grad."""
    leaves = {"x": inputs.x.detach().requires_grad_()}
    for name, t in inputs.params.items():
        if t is not None:
            leaves[name] = t.detach().requires_grad_()
    if inputs.pe is not None:
        leaves["pe"] = inputs.pe.detach().requires_grad_()
    return leaves


def _call(rec, impl, case, inputs, leaves):
    params = [leaves.get(p.name) if inputs.params[p.name] is not None else None for p in rec.params]
    return impl.fn(leaves["x"], *params, **rec.kwargs(case, leaves.get("pe"), inputs.cu_seqlens))


@differentiable
@property_settings()
@given(data=st.data())
def test_gradients_match_exact(impl, dtype, data):
    rec = RECORDS[impl.kind]
    case = data.draw(cases(kind=impl.kind, dtype=dtype, **{**SMALL, **impl.limits}), label="case")
    inputs = make_inputs(case, rec, impl.device)
    rng = np.random.default_rng(case.seed + 7)
    g64 = round_to(rng.standard_normal((case.B, case.H, case.W, rec.d_out(case))), dtype)
    precision = impl.domain.precision
    gb = exact_and_bounds(case, inputs, g64, precision)
    assume(gb.well_conditioned)
    leaves = _leaves(rec, inputs)
    y = _call(rec, impl, case, inputs, leaves)
    if not y.requires_grad:
        # an empty output has nothing to differentiate: this example checks
        # nothing (and the plugin fails a property that never checks one)
        assert y.numel() == 0, (f"{impl.id}: a non-empty output ({tuple(y.shape)}) does not require grad. A "
                                "differentiable implementation returns outputs attached to autograd in every call; "
                                "a forward-only one declares Domain(differentiable=False).\n  " + repr(case))
        return
    g = torch.from_numpy(g64).to(y.dtype).to(y.device)
    grads = torch.autograd.grad(y, list(leaves.values()), g, allow_unused=True)
    k = report.key("gradients", impl.id, dtype)
    worst = worst_strict = 0.0
    strict_bounds = gb.bound if precision == "strict" else exact_and_bounds(case, inputs, g64).bound
    for (name, leaf), got in zip(leaves.items(), grads):
        got64 = np.zeros(leaf.shape) if got is None else to_numpy(got)
        assert got is None or got.dtype == leaf.dtype, f"{impl.id}: grad of {name} has dtype {got.dtype}"
        exact, bound = gb.exact[name], gb.bound[name]
        err = np.where(np.isfinite(got64), np.abs(got64 - exact), np.inf)
        ratio = err / bound
        if ratio.size:
            i = np.unravel_index(np.argmax(ratio), ratio.shape)
            worst = max(worst, float(ratio[i]))
            worst_strict = max(worst_strict, float(np.max(err / strict_bounds[name])))
            note(f"d/d{name}: worst error/bound {ratio[i]:.3g} at {i}")
            if ratio[i] > 1:
                report.observe(k, ratio=float(ratio[i]), failed=True)
            assert ratio[i] <= 1, (f"{impl.id}: gradient of {name} in {dtype}: |error| {err[i]:.3g} at {i} is "
                                   f"{ratio[i]:.3g} times its bound {bound[i]:.3g} (got {got64[i]!r}, exact "
                                   f"{exact[i]!r})\n  {case!r}")
    report.observe(k, ratio=worst, strict_ratio=worst_strict)


# gradcheck and gradgradcheck perturb every input element twice over: a
# few examples per profile budget (the analytic check above carries the load)
@needs_dtype("float64")
@differentiable
# relu's kink breaks gradcheck's finite differences, so relu mlp cases are
# dropped below: an mlp whose domain is relu only has nothing left to draw
@for_impls(lambda impl: impl.kind != "mlp" or set(impl.domain.activations) != {"relu"}, "a smooth activation")
@property_settings(scale=1 / 8, minimum=3)
@given(data=st.data())
def test_gradcheck(impl, data):
    rec = RECORDS[impl.kind]
    case = data.draw(cases(kind=impl.kind, dtype="float64", magnitudes=False, max_batch=1, max_heads=2, max_dim=3,
                           max_block=3, max_windows=2, max_seqs=2, domain=impl.domain), label="case")
    assume(case.B * case.T > 0)   # gradcheck cannot perturb empty inputs
    if kind_is_relu_mlp(case):
        assume(False)  # relu's kink breaks the finite differences gradcheck uses
    inputs = make_inputs(case, rec, impl.device)
    # gradcheck perturbs storage elements, so it needs non-overlapping inputs:
    # contiguous leaves here (other layouts are checked by the test above)
    leaves = {k: v.detach().contiguous().requires_grad_() for k, v in _leaves(rec, inputs).items()}
    names = list(leaves)

    def fn(*ts):
        return _call(rec, impl, case, inputs, dict(zip(names, ts)))

    report.checked()
    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


def kind_is_relu_mlp(case):
    return case.kind == "mlp" and case.activation == "relu"


