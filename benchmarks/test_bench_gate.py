"""The correctness gate (benchmarks/checks.py) itself: it checks only the
first and last windows of the timed call, and the gradients of a cotangent
on the first windows; these tests show that this loses nothing.

- test_gate_agrees_with_a_full_check: for every deliberately wrong
  implementation of tests/mutants/ and every bug-free control, in float32
  and bfloat16, on a small configuration of the NSA setting (bthd layout,
  left padding, pe, G as benchmarked), the gate's verdict (forward; and
  gradients) equals that of comparing the whole output (and every gradient
  of a cotangent on all windows) with the tolerance model. Mutants whose
  bug this configuration does not exercise (packed sequences, NaN, gelu,
  1 < G < H, ...) pass both; the test also requires that each kind has a
  mutant both reject, so the agreement is not vacuous.
- test_gate_rejects_a_slightly_wrong_element: one output element moved by
  1.5 times its bound, in the first or in the last windows, fails.
- test_gate_rejects_wrong_gradients: one parameter-gradient element moved by
  1.5 times its bound fails; a nonzero x gradient outside the checked
  tokens fails; both for the first windows' cotangent and the last's.
"""

from __future__ import annotations

import importlib
from collections import defaultdict

import numpy as np
import pytest
import torch

import kvcompress.functional as kf
from kvcompress.testing.cases import Inputs
from kvcompress.testing.convert import round_to, to_numpy
from kvcompress.testing.gradients import exact_and_bounds
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.tolerance import compare, forward_bound

from .checks import Checker, CheckFailed, head_tokens
from .configs import nsa_case
from .inputs import ArgumentSets

mutants = pytest.importorskip("tests.mutants", reason="tests/mutants is where the wrong implementations live")


def _small(kind, dtype):
    """The kind's first benchmark setting at D = 8 and 8 windows (head,
    middle, tail): T = 128 in NSA's (S = 16). Windows of fewer than 16
    positions (gated_pool's CSA, L = 8) get 4 windows, all of them the
    gate's head and tail: there a half-precision sum of 8 terms leaves
    single middle windows just past their bound, which no head-and-tail
    check can promise to see."""
    case = nsa_case(kind, dtype, 8, 128)
    case = case.replace(T=(8 if case.L >= 16 else 4) * case.S)
    return case, ArgumentSets(case, "cpu", head_tokens=head_tokens(case), max_sets=1)


def _leaves(sets):
    names = ["x"] + (["pe"] if sets.pe[0] is not None else []) + [k for k, v in sets.params[0].items()
                                                                   if v is not None]
    src = {"x": sets.x[0], "pe": sets.pe[0], **sets.params[0]}
    return names, {n: src[n].detach().requires_grad_() for n in names}


def _call(fn, case, sets, leaves):
    rec = RECORDS[case.kind]
    params = {k: leaves.get(k) for k in sets.params[0]}
    inp = Inputs(None, None, None, leaves["x"], params, leaves.get("pe"), None, None)
    return rec.call(fn, case, inp)


def _gate(fn, case, sets) -> tuple[bool, bool]:
    """(forward passes, gradients pass) through the gate."""
    names, leaves = _leaves(sets)
    y = _call(fn, case, sets, leaves)
    checker = Checker()
    try:
        checker.forward(case, sets, y, "impl")
        fwd = True
    except CheckFailed:
        fwd = False
    bwd = True
    parts = checker.grad_parts(case)
    for i, part in enumerate(parts):
        grads = torch.autograd.grad(y, [leaves[n] for n in names], checker.cotangent(case, sets, part),
                                    allow_unused=True, retain_graph=i + 1 < len(parts))
        got = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}
        try:
            checker.gradients(case, sets, got, "impl", part)
        except CheckFailed:
            bwd = False
    return fwd, bwd


def _full(fn, case, sets) -> tuple[bool, bool]:
    """(forward passes, gradients pass) comparing everything with the tolerance model."""
    rec = RECORDS[case.kind]
    names, leaves = _leaves(sets)
    y = _call(fn, case, sets, leaves)
    p64 = {k: None if v is None else to_numpy(v) for k, v in sets.params[0].items()}
    inputs = Inputs(to_numpy(sets.x[0]), p64, to_numpy(sets.pe[0]), None, None, None, None, None)
    expected = rec.vectorized(case, inputs.x64, [p64[p.name] for p in rec.params], inputs.pe64)
    fwd = y.dtype == sets.dtype and compare(to_numpy(y), expected, forward_bound(case, inputs).bound)[0]
    g64 = round_to(np.random.default_rng(5).standard_normal(tuple(y.shape)), case.dtype)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], torch.from_numpy(g64).to(y.dtype), allow_unused=True)
    gb = exact_and_bounds(case, inputs, g64)
    bwd = all(g is not None and np.all(np.abs(to_numpy(g) - gb.exact[n]) <= gb.bound[n])
              for n, g in zip(names, grads))
    return fwd, bwd


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gate_agrees_with_a_full_check(dtype):
    rejected = defaultdict(int)
    impls = [(m.kind, m.name, m.fn) for m in mutants.all_mutants()]
    impls += [(kind, "control", importlib.import_module(f"tests.mutants.{kind}").control) for kind in KINDS]
    for kind, name, fn in impls:
        case, sets = _small(kind, dtype)
        gate, full = _gate(fn, case, sets), _full(fn, case, sets)
        # the forward verdicts must agree; the gradient verdicts where the forward passes (a wrong forward is
        # never timed, whatever the gate's smaller gradient scope says: gated_pool's half_precision_pooling
        # fails its gradients only outside the gate's first windows, and its forward everywhere)
        assert gate[0] == full[0] and (not full[0] or gate[1] == full[1]), (
            f"{kind} {name} ({dtype}): the gate says (forward, gradients) = {gate}, the whole output says {full}")
        if name == "control":
            assert gate == (True, True), f"{kind}: the bug-free control fails the gate: {gate}"
        elif gate != (True, True):
            rejected[kind] += 1
    assert set(rejected) == set(KINDS), f"kinds without a mutant the gate rejects: {set(KINDS) - set(rejected)}"


def _linear_case():
    case = nsa_case("linear", "float32", 16, 256)
    return case, ArgumentSets(case, "cpu", head_tokens=head_tokens(case), max_sets=1)


def test_gate_rejects_a_slightly_wrong_element():
    case, sets = _linear_case()
    p = sets.params[0]
    y = kf.linear(sets.x[0], p["weight"], p["bias"], block_size=case.L, stride=case.S, padding=case.padding,
                  pe=sets.pe[0], backend="torch")                                  # [B, H, W, D_out]
    checker = Checker()
    assert checker.forward(case, sets, y, "torch") <= 1.0
    _, expected, bound, _ = checker._head_forward(case, sets)
    wrong = y.double().numpy().copy()
    wrong[0, 1, 1, 3] = expected[0, 1, 1, 3] + 1.5 * bound.bound[0, 1, 1, 3]
    with pytest.raises(CheckFailed, match="first windows"):
        checker.forward(case, sets, wrong, "torch")
    wrong = y.double().numpy().copy()
    wrong[0, 0, -1, 0] += 1.0
    with pytest.raises(CheckFailed, match="last windows"):
        checker.forward(case, sets, wrong, "torch")
    with pytest.raises(CheckFailed, match="dtype"):
        checker.forward(case, sets, y.double(), "torch")


def test_gate_rejects_wrong_gradients():
    case, sets = _linear_case()
    names, leaves = _leaves(sets)
    y = _call(kf.linear, case, sets, leaves)
    checker = Checker()
    grads = dict(zip(names, torch.autograd.grad(y, [leaves[n] for n in names], checker.cotangent(case, sets))))
    assert checker.gradients(case, sets, grads, "torch") <= 1.0
    *_, gb = checker._grad(case, sets, "first")
    wrong = dict(grads, weight=grads["weight"].clone())
    wrong["weight"][0, 2, 1, 1] = float(gb.exact["weight"][0, 2, 1, 1] + 1.5 * gb.bound["weight"][0, 2, 1, 1])
    with pytest.raises(CheckFailed, match="gradient of weight is wrong"):
        checker.gradients(case, sets, wrong, "torch")
    wrong = dict(grads, x=grads["x"].clone())
    wrong["x"][0, 0, -1, 0] = 1e-30
    with pytest.raises(CheckFailed, match="nonzero outside"):
        checker.gradients(case, sets, wrong, "torch")
    # the last windows' check: right gradients pass, and the first tokens are now outside its slice
    assert checker.grad_parts(case) == ["first", "last"]
    g = checker.cotangent(case, sets, "last")
    assert torch.count_nonzero(g[:, :, :-2]).item() == 0 and torch.count_nonzero(g[:, :, -2:]).item()
    grads = dict(zip(names, torch.autograd.grad(_call(kf.linear, case, sets, leaves), [leaves[n] for n in names], g)))
    assert checker.gradients(case, sets, grads, "torch", "last") <= 1.0
    wrong = dict(grads, x=grads["x"].clone())
    wrong["x"][0, 0, 0, 0] = 1e-30
    with pytest.raises(CheckFailed, match="nonzero outside.*last windows"):
        checker.gradients(case, sets, wrong, "torch", "last")
    *_, gb = checker._grad(case, sets, "last")
    wrong = dict(grads, weight=grads["weight"].clone())
    wrong["weight"][0, 1, 0, 0] = float(gb.exact["weight"][0, 1, 0, 0] - 1.5 * gb.bound["weight"][0, 1, 0, 0])
    with pytest.raises(CheckFailed, match="gradient of weight is wrong on the last windows"):
        checker.gradients(case, sets, wrong, "torch", "last")


def test_gate_by_precision_class_and_peer_check():
    """The gate holds each entrant to its own class: an error between the
    strict and the io-intermediates bound fails "strict" and passes
    "io-intermediates"; a peer ("peer") is held to the RMS check, which
    passes noise of a few units of the dtype on every element and fails a
    window that is another window's values (an O(1) error), forward and
    gradients."""
    from benchmarks.checks import PEER_RMS_ULPS, _unit
    case, sets = _linear_case()
    p = sets.params[0]
    y = kf.linear(sets.x[0], p["weight"], p["bias"], block_size=case.L, stride=case.S, padding=case.padding,
                  pe=sets.pe[0], backend="torch")
    checker = Checker()
    _, expected, strict, _ = checker._head_forward(case, sets, "strict")
    _, _, io, _ = checker._head_forward(case, sets, "io-intermediates")
    i = np.unravel_index(np.argmax(io.bound - strict.bound), io.bound.shape)
    assert io.bound[i] > strict.bound[i]
    between = y.double().numpy().copy()
    between[:, :, : expected.shape[2]] = expected
    between[i] = expected[i] + (strict.bound[i] + io.bound[i]) / 2
    with pytest.raises(CheckFailed):
        checker.forward(case, sets, between, "x", "strict")
    assert checker.forward(case, sets, between, "x", "io-intermediates") <= 1.0
    rng = np.random.default_rng(0)
    noisy = y.double().numpy() * (1 + 2 * _unit(case.dtype) * rng.standard_normal(y.shape))
    assert checker.forward(case, sets, noisy, "peer", "peer") <= 1.0
    louder = y.double().numpy() * (1 + 4 * PEER_RMS_ULPS * _unit(case.dtype) * rng.standard_normal(y.shape))
    with pytest.raises(CheckFailed, match="RMS error"):
        checker.forward(case, sets, louder, "peer", "peer")
    shifted = y.double().numpy().copy()
    shifted[:, :, 1] = shifted[:, :, 2]
    with pytest.raises(CheckFailed, match="RMS error"):
        checker.forward(case, sets, shifted, "peer", "peer")
    names, leaves = _leaves(sets)
    yg = _call(kf.linear, case, sets, leaves)
    grads = dict(zip(names, torch.autograd.grad(yg, [leaves[n] for n in names], checker.cotangent(case, sets))))
    assert checker.gradients(case, sets, grads, "peer", precision="peer") <= 1.0
    wrong = dict(grads, weight=grads["weight"].flip(1))
    with pytest.raises(CheckFailed, match="gradient of weight is wrong.*RMS error"):
        checker.gradients(case, sets, wrong, "peer", precision="peer")


def test_gate_class_falls_back_to_the_rms_check_only_where_the_bound_says_nothing():
    """attention_pool at the record's D = 128 in bfloat16: the
    io-intermediates bounds of the checked windows are ill-conditioned with
    the benchmark's inputs (x and pe N(0, 1); H200 run 59 failed every
    Triton entrant on it), so the gate holds that class to the RMS check;
    the strict class, well conditioned there, is kept, and so is
    io-intermediates where its bounds are well conditioned (linear)."""
    checker = Checker()
    case = nsa_case("attention_pool", "bfloat16", 128, 256)
    sets = ArgumentSets(case, "cpu", head_tokens=head_tokens(case), max_sets=1)
    assert not checker._head_forward(case, sets, "io-intermediates")[2].well_conditioned
    assert checker._head_forward(case, sets, "strict")[2].well_conditioned
    assert checker.gate_class(case, sets, "io-intermediates", grad=False) == "peer"
    assert checker.gate_class(case, sets, "io-intermediates", grad=True) == "peer"
    assert checker.gate_class(case, sets, "io-intermediates", grad=False, last=True) == "peer"
    assert checker.gate_class(case, sets, "strict", grad=True) == "strict"
    lcase, lsets = _linear_case()
    assert checker.gate_class(lcase, lsets, "io-intermediates", grad=True) == "io-intermediates"
    # the fallback still fails an O(1) error: one window holding another's values
    y = kf.attention_pool(sets.x[0], sets.params[0]["weight"], block_size=case.L, stride=case.S,
                          padding=case.padding, pe=sets.pe[0], backend="torch").double().numpy()
    assert checker.forward(case, sets, y, "torch", "peer") <= 1.0
    y[:, :, 0] = y[:, :, 1]
    with pytest.raises(CheckFailed, match="RMS error"):
        checker.forward(case, sets, y, "torch", "peer")
