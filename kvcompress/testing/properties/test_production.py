"""The production-shape tier: every implementation equals the float64 oracle
within the tolerance model at the sizes NSA runs at, forward and backward.

The other properties stop at D <= 10 and a few windows, where a kernel runs
one feature tile, one block of windows and small token offsets. Here every
example crosses, with high probability, the tile boundaries of a typical
kernel: D > 64 (a second 64-wide feature tile), more than 256 windows in a
sequence, tokens beyond 4096 in a sequence (kvcompress/testing/production.py
draws the cases; kvcompress/testing/oracle.py is the memory-lean float64
oracle and its tolerance magnitudes, the same model as
kvcompress/testing/tolerance.py).

The gradient property draws the same cases and puts its cotangent on two
windows of the long sequence (at its start, across the 256-window block
boundary, or at its end) and on two heads (the first and the last, so with
their own parameter groups where G > 1): the exact gradients are then those
of that slice alone (kvcompress/testing/slices.py), at any T, and every
gradient element outside the slice must be exactly 0. A dx kernel that loses
a feature tile past D = 64, or a window block, fails here and nowhere else.

One example costs about a second on a CPU, so the ci profile runs only a
few per implementation and dtype (the first one, Hypothesis's smallest draw,
crosses all three boundaries). Failures are not shrunk in the strict
profiles: each shrink step costs as much as an example, and the printed
Case rebuilds the inputs exactly.
"""

from __future__ import annotations

import kvcompress_reference as reference
import numpy as np
import pytest
import torch
from hypothesis import Phase, assume, event, given, note, settings
from hypothesis import strategies as st

from kvcompress.testing import oracle, quality, report
from kvcompress.testing.assertions import check_output_form
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import round_to, to_numpy
from kvcompress.testing.gradients import exact_and_bounds
from kvcompress.testing.impls import for_impls, requires
from kvcompress.testing.plugin import is_strict_profile, property_settings
from kvcompress.testing.production import FEATURE_TILE, LONG_OFFSET, WINDOW_BLOCK, production_cases, regimes
from kvcompress.testing.records import RECORDS
from kvcompress.testing.slices import window_slice
from kvcompress.testing.tolerance import compare

pytestmark = pytest.mark.kvcompress_property

# ci: 40 * 0.075 = 3 examples per implementation and dtype (up to about a
# second each on the CPU, mostly the float64 oracle); dev 2; thorough 75
SCALE, MINIMUM = 0.075, 2
# the gradients: a backward at production shapes on top of the forward;
# ci 40 * 0.05 = 2 examples per implementation and dtype, dev 2, thorough 50
GRAD_SCALE, GRAD_MINIMUM = 0.05, 2
PROBES = ("first", "block", "last")     # where the cotangent's two windows lie in the long sequence


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


def _settings(scale=SCALE, minimum=MINIMUM):
    s = property_settings(scale=scale, minimum=minimum)
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


def _probe(case, where: str) -> tuple[int, int, int]:
    """(sequence, first window, last window + 1) of the cotangent: two
    windows of the longest sequence, at its start, across the window block
    boundary (WINDOW_BLOCK - 1 and WINDOW_BLOCK, or the last two before it)
    or at its end."""
    seqs = [case.T] if case.seqlens is None else list(case.seqlens)
    seq = max(range(len(seqs)), key=lambda k: seqs[k])
    W = reference.num_windows(seqs[seq], case.L, case.S, case.padding)
    n = min(2, W)
    w0 = {"first": 0, "block": min(WINDOW_BLOCK - 1, W - n), "last": W - n}[where]
    return seq, w0, w0 + n


@for_impls(lambda impl: not impl.emulated, "production shapes are out of an emulator's reach")
@requires(lambda d: d.differentiable, "differentiable (gradients)")
@_settings(GRAD_SCALE, GRAD_MINIMUM)
@given(data=st.data())
def test_gradients_at_production_shapes(impl, dtype, data, kvcompress_rerun):
    rec = RECORDS[impl.kind]
    case = data.draw(production_cases(kind=impl.kind, dtype=dtype, device=impl.device, domain=impl.domain),
                     label="case")
    where = data.draw(st.sampled_from(PROBES), label="probe")
    seq, w0, w1 = _probe(case, where)
    assume(case.B > 0 and w1 > w0)          # a domain with empty inputs may draw a long sequence without windows
    row = data.draw(st.integers(0, case.B - 1), label="row")
    heads = (0, case.H - 1) if case.H > 1 else (0,)
    inputs = make_inputs(case, rec, impl.device)
    ws = window_slice(case, inputs.x, inputs.params, inputs.pe, first=w0, last=w1, seq=seq,
                      rows=slice(row, row + 1), heads=heads)
    d_out = rec.d_out(case)
    g64 = round_to(np.random.default_rng(case.seed + 7).standard_normal((1, len(heads), w1 - w0, d_out)), dtype)
    precision = impl.domain.precision
    gb = exact_and_bounds(ws.case, ws.inputs, g64, precision)
    assume(gb.well_conditioned)
    for r in regimes(case):
        event(r)
    leaves = {"x": inputs.x.detach().requires_grad_()}
    leaves.update({k: v.detach().requires_grad_() for k, v in inputs.params.items() if v is not None})
    if inputs.pe is not None:
        leaves["pe"] = inputs.pe.detach().requires_grad_()
    params = [leaves.get(p.name) for p in rec.params]
    y = impl.fn(leaves["x"], *params, **rec.kwargs(case, leaves.get("pe"), inputs.cu_seqlens))
    assert y.requires_grad, (f"{impl.id}: a non-empty output ({tuple(y.shape)}) does not require grad; a "
                             f"forward-only implementation declares Domain(differentiable=False)\n  {case!r}")
    hs, (ww0, ww1) = list(heads), ws.windows
    g = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
    g[row:row + 1, hs, ww0:ww1] = torch.from_numpy(g64).to(y.dtype).to(y.device)
    grads = torch.autograd.grad(y, list(leaves.values()), g, allow_unused=True)
    per_token = {"x"} | {p.name for p in rec.params if p.per_token}
    t0, t1 = ws.tokens
    k = report.key("production_gradients", impl.id, dtype)
    worst = 0.0
    for (name, leaf), got in zip(leaves.items(), grads):
        got = torch.zeros_like(leaf) if got is None else got
        assert got.dtype == leaf.dtype, f"{impl.id}: grad of {name} has dtype {got.dtype}"
        region = ((slice(row, row + 1), hs, slice(t0, t1)) if name in per_token
                  else (hs,) if name == "pe" else (list(ws.groups),))
        outside = got.detach().clone()
        outside[region] = 0
        stray = int(torch.count_nonzero(outside).item())
        got64, exact, bound = to_numpy(got[region]), gb.exact[name], gb.bound[name]
        err = np.where(np.isfinite(got64), np.abs(got64 - exact), np.inf)
        ratio = err / bound
        i = tuple(int(v) for v in np.unravel_index(np.argmax(ratio), ratio.shape))
        worst = max(worst, float(ratio[i]))
        note(f"d/d{name}: worst error/bound {ratio[i]:.3g} at {i}; {stray} nonzero elements outside the slice")
        if ratio[i] > 1 or stray:
            report.observe(k, ratio=worst, failed=True)
        at = (f"windows {w0}..{w1 - 1} of sequence {seq} ({where}), batch row {row}, heads {heads}, tokens "
              f"{t0}..{t1 - 1} of x; crosses {', '.join(regimes(case)) or 'no tile boundary'}")
        assert not stray, (f"{impl.id}: the gradient of {name} in {dtype} has {stray} nonzero elements outside the "
                           f"slice that the cotangent reaches ({at}); each of their contributions is 0 times a "
                           f"finite value\n  {case!r}\n  rerun: {kvcompress_rerun}")
        assert ratio[i] <= 1, (f"{impl.id}: gradient of {name} in {dtype} at production shapes: |error| "
                               f"{err[i]:.3g} at {i} (indices within the slice: {at}) is {ratio[i]:.3g} times its "
                               f"bound {bound[i]:.3g} (got {got64[i]!r}, exact {exact[i]!r})\n  {case!r}\n"
                               f"  rerun: {kvcompress_rerun}")
    report.observe(k, ratio=worst)
