"""kvcompress.modules.Compressor: the functional call with its own
parameters, its initialisation, every configuration forward and backward,
packed batches, argument validation, state_dict, dtype and device.

Every kind runs through every test that applies to it; what a kind takes
(its parameters, options, per-token inputs, whether it has pe) comes from
its record (kvcompress/kinds.py, kvcompress/testing/records.py)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import kvcompress.functional as kf
from kvcompress.modules import Compressor
from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.convert import DTYPES, to_numpy
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import UNIT_ROUNDOFF, compare, forward_bound

SMALL = dict(max_batch=2, max_heads=4, max_dim=5, max_block=4, max_windows=3, max_seqs=3)
# the initialisation the Compressor docstring promises, pinned here apart from
# the records that implement it: {param: (init, fan_in of a uniform one)}
DOCUMENTED_INIT = {
    "mean_pool": {},
    "weighted_pool": {"weight": ("mean", None)},
    "linear": {"weight": ("uniform", "L*D"), "bias": ("uniform", "L*D")},
    "mlp": {"w1": ("uniform", "L*D"), "b1": ("uniform", "L*D"), "w2": ("uniform", "F"), "b2": ("uniform", "F")},
    "attention_pool": {"weight": ("zeros", None)},
    "gated_pool": {"bias": ("zeros", None)},
}


def param_names(kind) -> list[str]:
    """The Compressor's parameters of ``kind`` with every optional one on, pe excluded."""
    return list(RECORDS[kind].kind.param_names)


def pe_names(kind, pos_emb: bool = True) -> list[str]:
    """["pe"] where the module has one: pos_emb asked and the kind takes pe."""
    return ["pe"] if pos_emb and RECORDS[kind].kind.pe else []


def more_inputs(kind, *shape, requires_grad=False, dtype=None) -> list[torch.Tensor]:
    """Random tensors for the kind's per-token inputs after x (gated_pool's z)."""
    return [torch.randn(*shape, dtype=dtype, requires_grad=requires_grad) for _ in RECORDS[kind].kind.inputs[1:]]


def case_inputs(case, inputs) -> list[torch.Tensor]:
    """The case's per-token inputs after x (gated_pool's z), as make_inputs placed them."""
    return [inputs.params[p.name] for p in RECORDS[case.kind].params if p.per_token]


def module_for(case, **kw) -> Compressor:
    """The Compressor whose configuration is the harness Case's."""
    rec = RECORDS[case.kind]
    extra = rec.extra_kwargs(case)                  # its options: mlp's activation, gated_pool's split
    if rec.has_dout:
        extra["dim_out"] = case.D_out
    if rec.has_bias:
        extra["bias"] = case.bias
    if rec.has_hidden:
        extra["hidden"] = case.F
    return Compressor(case.kind, heads=case.H, dim_head=case.D, block_size=case.block_size, stride=case.stride,
                      padding=case.padding, groups=case.G, pos_emb=case.use_pe, dtype=DTYPES[case.dtype],
                      **extra, **kw)


def call_functional(m: Compressor, x, *more, cu_seqlens=None, options=None):
    """kvcompress.functional.<kind> with the module's own parameters and the
    options the module was built with (``options``, default the kind's
    defaults), given by the test rather than read back from the module."""
    kind = RECORDS[m.kind].kind
    kw = dict(block_size=m.block_size, stride=m.stride, padding=m.padding, cu_seqlens=cu_seqlens,
              **{**kind.defaults, **(options or {})})
    if kind.pe:
        kw["pe"] = m.pe
    return getattr(kf, m.kind)(x, *more, *[getattr(m, n) for n in kind.param_names], **kw)


def randomize(m: Compressor, seed: int) -> None:
    """Random values in every parameter (pe included), so that no symmetric
    initialisation can hide a swapped argument."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))


# ---------------------------------------------------------------------------
# the module is the functional call


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_forward_equals_functional(kind, data):
    dtype = data.draw(st.sampled_from(("float32", "float64", "bfloat16")), label="dtype")
    case = data.draw(cases(kind=kind, dtype=dtype, magnitudes=False, **SMALL), label="case")
    m = module_for(case)
    randomize(m, case.seed)
    inputs = make_inputs(case, RECORDS[kind])      # any layout of x (and z), packed or batched
    more = case_inputs(case, inputs)
    got = m(inputs.x, *more, cu_seqlens=inputs.cu_seqlens)
    expected = call_functional(m, inputs.x, *more, cu_seqlens=inputs.cu_seqlens,
                               options=RECORDS[kind].extra_kwargs(case))
    note(repr(case))
    assert got.shape == (case.B, case.H, case.W, RECORDS[kind].d_out(case))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_takes_the_kinds_inputs(kind):
    """forward(x, *the kind's other inputs, cu_seqlens): a wrong number of
    input tensors is refused; cu_seqlens may follow them positionally."""
    torch.manual_seed(0)
    rec = RECORDS[kind].kind
    m = Compressor(kind, **GOOD)
    randomize(m, 4)
    x, more = torch.randn(1, 4, 11, 3), more_inputs(kind, 1, 4, 11, 3)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    expected = m(x, *more, cu_seqlens=cu)
    assert torch.equal(m(x, *more, cu), expected)
    assert expected.shape[2] == int(kf.compressed_cu_seqlens(cu, 4, 2, "valid")[-1])
    calls = [(x, *more, x, x)]                       # one tensor too many, besides a positional cu_seqlens
    if more:
        calls.append((x, *more[:-1]))                # one too few
    for args in calls:
        with pytest.raises(TypeError, match=re.escape(f"Compressor: {kind} takes the inputs {rec.inputs}, got "
                                                      f"{len(args)} tensors")):
            m(*args, cu_seqlens=cu)


# ---------------------------------------------------------------------------
# initialisation


@pytest.mark.parametrize("kind", ["weighted_pool", "attention_pool"])
@given(data=st.data())
def test_pools_start_as_mean_pool(kind, data):
    """weight = fl(1/L) resp. 0 at init. Both outputs approximate the exact
    value; for weighted_pool the exact value with fl(1/L) differs from the
    exact mean by at most u_o * (1/L) sum |X| = u_o * M_mean (|fl(1/L) - 1/L|
    <= u_o / L), for attention_pool (uniform softmax) not at all. So
    |module - mean_pool| <= bound(kind, its weight) + bound(mean_pool)
    [+ u_o * M_mean]."""
    dtype = data.draw(st.sampled_from(("float64", "float32", "float16", "bfloat16")), label="dtype")
    case = data.draw(cases(kind=kind, dtype=dtype, **SMALL), label="case").replace(use_pe=False)
    pos_emb = data.draw(st.booleans(), label="pos_emb")           # pe starts at 0: no effect
    m = module_for(case.replace(use_pe=pos_emb))
    mean_case = case.replace(kind="mean_pool")
    inputs = make_inputs(mean_case, RECORDS["mean_pool"])
    got = m(inputs.x, cu_seqlens=inputs.cu_seqlens)
    mean = kf.mean_pool(inputs.x, cu_seqlens=inputs.cu_seqlens, **case.window_kwargs())
    b_mean = forward_bound(mean_case, inputs)
    w64 = to_numpy(m.weight)
    if kind == "weighted_pool":
        assert np.all(np.abs(w64 - 1 / case.L) <= UNIT_ROUNDOFF[dtype] / case.L)
    else:
        assert not w64.any()
    b_kind = forward_bound(case, dataclasses.replace(inputs, params64={"weight": w64}))
    assume(b_mean.well_conditioned and b_kind.well_conditioned)
    bound = b_kind.bound + b_mean.bound + (UNIT_ROUNDOFF[dtype] * b_mean.magnitude if kind == "weighted_pool" else 0)
    ok, ratio, idx, err = compare(to_numpy(got), to_numpy(mean), bound)
    note(f"{case!r}: worst |module - mean_pool| / bound = {ratio:.3g}")
    assert ok, f"{kind} at init differs from mean_pool by {err:.3g} at {idx} ({ratio:.3g} x bound)\n  {case!r}"


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("padding", ["valid", "left"])
def test_gated_pool_starts_with_the_gate_scores_alone(padding, split):
    """bias = 0 at init: the module is gated_pool without a bias (z + 0 = z
    exactly, so bit for bit), pads (padding="left") included."""
    torch.manual_seed(0)
    m = Compressor("gated_pool", heads=4, dim_head=4, block_size=4, stride=2, padding=padding, groups=2, split=split)
    assert m.bias.shape == (2, 4, 2 if split else 4) and not m.bias.any()
    x, z = torch.randn(2, 4, 9, 4), 4 * torch.randn(2, 4, 9, 4)
    expected = kf.gated_pool(x, z, None, split=split, block_size=4, stride=2, padding=padding)
    assert torch.equal(m(x, z), expected)


def test_documented_initialisation():
    """The records say what the Compressor docstring promises: each kind's
    parameters in signature order, and how each starts (init, and the
    fan-in of a uniform one)."""
    got = {kind: {p.name: (p.init, p.fan_in if p.init == "uniform" else None) for p in RECORDS[kind].kind.params}
           for kind in KINDS}
    assert got == DOCUMENTED_INIT


@pytest.mark.parametrize("kind", KINDS)
def test_init_and_reset_parameters(kind):
    torch.manual_seed(0)
    rec = RECORDS[kind].kind
    H, D, L, S, G, F, O = 4, 6, 5, 2, 2, 20, 20   # every uniform parameter has >= 40 entries
    kw = dict(dim_out=O) if RECORDS[kind].has_dout else {}
    if RECORDS[kind].has_hidden:
        kw["hidden"] = F
    m = Compressor(kind, heads=H, dim_head=D, block_size=L, stride=S, groups=G, pos_emb=rec.pe, **kw)
    assert [n for n, _ in m.named_parameters()] == param_names(kind) + pe_names(kind)
    dims = {"G": G, "L": L, "S": S, "D": D, "F": F}
    dims["D_out"] = O if RECORDS[kind].has_dout else rec.d_out(dims, rec.defaults)

    def check():
        if rec.pe:
            assert m.pe.shape == (H, L, D) and not m.pe.any(), "pe starts at zero"
        for param in rec.params:
            p = getattr(m, param.name)
            assert p.shape == rec.shape(param, dims), param.name
            if param.init == "mean":        # a weighted pool that starts as the mean
                assert torch.equal(p, torch.full(p.shape, 1 / L)), param.name
            elif param.init == "zeros":
                assert not p.any(), param.name
            else:
                assert param.init == "uniform", param.name
                bound = 1 / math.sqrt(rec.dim(param.fan_in, dims))
                # U(-bound, bound): inside, and spread over it (for >= 40 draws, missing
                # either outer half has probability < 2 * 0.75**40 = 2e-5; the seed is fixed)
                assert p.numel() >= 40, param.name
                assert p.abs().max() <= bound, param.name
                assert p.max() > 0.5 * bound and p.min() < -0.5 * bound, param.name

    check()
    randomize(m, 1)
    m.reset_parameters()
    check()


def test_default_sizes():
    m = Compressor("mlp", heads=2, dim_head=3, block_size=4, stride=4)
    assert m.w1.shape == (1, 12, 12) and m.w2.shape == (1, 12, 3)   # F = L * D, D_out = D
    assert m.b1.shape == (1, 12) and m.b2.shape == (1, 3)
    m = Compressor("linear", heads=2, dim_head=3, block_size=4, stride=2, bias=False)
    assert m.weight.shape == (1, 4, 3, 3) and m.bias is None and m.pe is None
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    m = Compressor("gated_pool", heads=2, dim_head=3, block_size=4, stride=2)
    assert m.bias.shape == (1, 4, 3) and m.pe is None and m.dim_out == 3 and m.options == {"split": False}


# ---------------------------------------------------------------------------
# every configuration, forward and backward

# pe only where the kind takes it (gated_pool's position bias takes its place)
TRAIN_CONFIGS = [(kind, pos_emb) for kind in KINDS
                 for pos_emb in ((False, True) if RECORDS[kind].kind.pe else (False,))]


@pytest.mark.parametrize("groups", [1, 2], ids=["G1", "G2"])
@pytest.mark.parametrize("padding", ["valid", "left"])
@pytest.mark.parametrize("kind, pos_emb", TRAIN_CONFIGS, ids=[f"{k}-{'pe' if p else 'nope'}" for k, p in TRAIN_CONFIGS])
def test_every_configuration_trains(kind, pos_emb, padding, groups):
    torch.manual_seed(0)
    B, H, T, D, L, S = 2, 4, 9, 3, 3, 2
    kw = dict(dim_out=5) if RECORDS[kind].has_dout else {}
    m = Compressor(kind, heads=H, dim_head=D, block_size=L, stride=S, padding=padding, groups=groups,
                   pos_emb=pos_emb, **kw)
    x = torch.randn(B, H, T, D, requires_grad=True)
    more = more_inputs(kind, B, H, T, D, requires_grad=True)
    y = m(x, *more)
    assert y.shape == (B, H, kf.num_windows(T, L, S, padding), 5 if kw else D)
    (y * torch.randn_like(y)).sum().backward()
    for name, t in zip(RECORDS[kind].kind.inputs, (x, *more)):
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.isfinite(t.grad).all(), name
    names = [n for n, _ in m.named_parameters()]
    assert names == param_names(kind) + (["pe"] if pos_emb else [])
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert p.grad.shape == p.shape and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("padding", ["valid", "left"])
def test_gated_pool_split(padding):
    """split through Compressor: C = L / S = 3 chunks, dim_out = D / C = 2,
    bias (G, L, D / C); the output is the loop reference's (window position
    j reading feature chunk j // S) within the tolerance model, and every
    input and the bias get a gradient."""
    rec = RECORDS["gated_pool"]
    case = Case(kind="gated_pool", dtype="float64", B=2, H=4, G=2, T=11, D=6, block_size=6, stride=2,
                padding=padding, bias=True, split=True, seed=5)
    m = module_for(case)
    assert m.dim_out == 2 == rec.d_out(case) and m.options == {"split": True}
    assert m.bias.shape == (2, 6, 2) and [n for n, _ in m.named_parameters()] == ["bias"]
    inputs = make_inputs(case, rec)
    with torch.no_grad():
        m.bias.copy_(inputs.params["bias"])
    x, z = (t.detach().clone().requires_grad_() for t in (inputs.x, inputs.params["z"]))
    y = m(x, z)
    assert y.shape == (2, 4, case.W, 2)
    bound = forward_bound(case, inputs)
    assert bound.well_conditioned
    ok, ratio, idx, err = compare(to_numpy(y.detach()), rec.call_reference(case, inputs), bound.bound)
    assert ok, f"split gated_pool differs from the reference by {err:.3g} at {idx} ({ratio:.3g} x bound)\n  {case!r}"
    assert torch.equal(y, call_functional(m, x, z, options={"split": True}))
    # without split D_out = D
    assert Compressor("gated_pool", heads=4, dim_head=6, block_size=6, stride=2).dim_out == 6
    (y * torch.randn_like(y)).sum().backward()
    for name, t in (("x", x), ("z", z), ("bias", m.bias)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------
# packed batches


@pytest.mark.parametrize("padding", ["valid", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_cu_seqlens_passthrough(kind, padding):
    torch.manual_seed(0)
    m = Compressor(kind, heads=2, dim_head=3, block_size=4, stride=2, padding=padding, groups=2,
                   pos_emb=RECORDS[kind].kind.pe)
    randomize(m, 2)
    cu = torch.tensor([0, 5, 5, 7, 16], dtype=torch.int32)
    x = torch.randn(1, 2, 16, 3)
    more = more_inputs(kind, 1, 2, 16, 3)
    y = m(x, *more, cu_seqlens=cu)
    offsets = kf.compressed_cu_seqlens(cu, 4, 2, padding)
    assert y.shape == (1, 2, int(offsets[-1]), 3)
    assert torch.equal(y, call_functional(m, x, *more, cu_seqlens=cu))
    # the offsets were used: unpacked, the same tokens give other windows
    assert m(x, *more).shape[2] != y.shape[2]


# ---------------------------------------------------------------------------
# validation


GOOD = dict(heads=4, dim_head=3, block_size=4, stride=2)
CTOR_ERRORS = [
    ("kind", dict(kind="max_pool"), ValueError, "kind must be one of"),
    ("heads", dict(heads=0), ValueError, "heads must be an int >= 1, got 0"),
    ("heads float", dict(heads=4.0), TypeError, "heads must be an int >= 1, got float 4.0"),
    ("heads bool", dict(heads=True), TypeError, "heads must be an int >= 1, got bool True"),
    ("block_size float", dict(block_size=4.0), TypeError, "block_size must be an int >= 1, got float 4.0"),
    ("stride str", dict(stride="2"), TypeError, "stride must be an int with 1 <= stride <= block_size=4"),
    ("groups None", dict(groups=None), TypeError, "groups must be an int >= 1, got NoneType None"),
    ("dim_out float", dict(kind="linear", dim_out=3.0), TypeError, "dim_out must be an int >= 1"),
    ("hidden float", dict(kind="mlp", hidden=8.0), TypeError, "hidden must be an int >= 1"),
    ("kind not a str", dict(kind=None), TypeError, "kind must be a str"),
    ("padding not a str", dict(padding=0), TypeError, "padding must be a str"),
    ("activation not a str", dict(kind="mlp", activation=None), TypeError, "activation must be a str"),
    ("backend not a str", dict(backend=None), TypeError, "backend must be a str"),
    ("dim_head", dict(dim_head=-1), ValueError, "dim_head must be an int >= 1"),
    ("block_size", dict(block_size=0), ValueError, "block_size must be an int >= 1"),
    ("stride 0", dict(stride=0), ValueError, "stride must be an int with 1 <= stride <= block_size=4"),
    ("stride > L", dict(stride=5), ValueError, "stride must be an int with 1 <= stride <= block_size=4, got 5"),
    ("padding", dict(padding="same"), ValueError, "padding must be one of"),
    ("groups 0", dict(groups=0), ValueError, "groups must be an int >= 1"),
    ("groups divide", dict(groups=3), ValueError, "groups must divide heads=4, got groups=3"),
    ("dim_out pool", dict(kind="attention_pool", dim_out=5), ValueError,
     "dim_out applies to linear and mlp; attention_pool outputs dim_head=3"),
    ("dim_out 0", dict(kind="linear", dim_out=0), ValueError, "dim_out must be an int >= 1"),
    ("hidden non-mlp", dict(kind="linear", hidden=8), ValueError, "hidden applies to mlp only"),
    ("hidden 0", dict(kind="mlp", hidden=0), ValueError, "hidden must be an int >= 1"),
    ("activation non-mlp", dict(kind="weighted_pool", activation="gelu"), ValueError,
     "activation applies to mlp only"),
    ("activation", dict(kind="mlp", activation="tanh"), ValueError, "activation must be one of"),
    ("bias", dict(kind="linear", bias=1), TypeError, "bias must be a bool"),
    ("pos_emb", dict(pos_emb="yes"), TypeError, "pos_emb must be a bool"),
    ("backend", dict(backend="cuda-magic"), ValueError, "backend must be 'auto' or one of"),
    ("dtype", dict(dtype=torch.int32), TypeError, "dtype must be None or one of"),
    # gated_pool: no pe (its bias takes its place), its option split and what split needs
    ("pos_emb gated_pool", dict(kind="gated_pool", pos_emb=True), ValueError,
     "gated_pool takes no position embedding, got pos_emb=True"),
    ("split not a bool", dict(kind="gated_pool", split=1), TypeError, "split must be a bool, got int"),
    ("split stride", dict(kind="gated_pool", split=True, stride=3), ValueError,
     r"split needs stride to divide block_size \(C = L / S chunks\), got block_size=4, stride=3"),
    ("split chunks", dict(kind="gated_pool", split=True), ValueError,
     "split needs C = block_size / stride = 2 to divide the head dim D=3"),
    ("split non-gated", dict(kind="linear", split=True), TypeError, "linear takes no option ['split']"),
    ("option unknown", dict(kind="gated_pool", ratio=4), TypeError, "gated_pool takes no option ['ratio']"),
    ("dim_out gated_pool", dict(kind="gated_pool", dim_out=5), ValueError,
     "dim_out applies to linear and mlp; gated_pool outputs dim_head=3, got dim_out=5"),
    ("dim_out gated_pool split", dict(kind="gated_pool", dim_head=4, split=True, dim_out=4), ValueError,
     "gated_pool outputs dim_head=4 / C = 2, got dim_out=4"),
    ("hidden gated_pool", dict(kind="gated_pool", hidden=8), ValueError, "hidden applies to mlp only"),
    ("activation gated_pool", dict(kind="gated_pool", activation="silu"), ValueError,
     "activation applies to mlp only"),
]


@pytest.mark.parametrize("what, change, exc, match", CTOR_ERRORS, ids=[c[0] for c in CTOR_ERRORS])
def test_constructor_validation(what, change, exc, match):
    kw = {"kind": "linear", **GOOD, **change}
    kind = kw.pop("kind")
    with pytest.raises(exc, match=re.escape(match) if "(" not in match else match) as info:
        Compressor(kind, **kw)
    assert str(info.value).startswith("Compressor: ")


def test_numpy_integers_are_integers():
    m = Compressor("linear", heads=np.int64(4), dim_head=np.int32(3), block_size=np.int64(4), stride=np.int8(2),
                   groups=np.int64(2), dim_out=np.int64(5))
    assert (m.heads, m.dim_head, m.block_size, m.stride, m.groups, m.dim_out) == (4, 3, 4, 2, 2, 5)
    assert all(type(v) is int for v in (m.heads, m.block_size, m.stride, m.groups, m.dim_out))
    assert m(torch.randn(1, 4, 8, 3)).shape == (1, 4, 3, 5)


# the kinds whose D_out is fixed and that take neither hidden nor activation:
# those arguments at their defaults (dim_out = what the kind outputs) are accepted
FIXED_KINDS = [k for k in KINDS if not (RECORDS[k].has_dout or RECORDS[k].has_hidden
                                        or "activation" in RECORDS[k].kind.option_names)]


def test_defaults_of_unused_arguments_are_accepted():
    assert {"mean_pool", "weighted_pool", "attention_pool", "gated_pool"} <= set(FIXED_KINDS)
    for kind in FIXED_KINDS:
        m = Compressor(kind, dim_out=3, hidden=None, activation="relu", bias=False, pos_emb=False, groups=2,
                       **RECORDS[kind].kind.defaults, **GOOD)
        assert m.dim_out == 3 and not m.has_bias, kind
        assert all(getattr(m, p.name) is None for p in RECORDS[kind].kind.params if p.optional), kind


@pytest.mark.parametrize("x, exc, match", [
    (torch.zeros(1, 4, 8), ValueError, r"x must have shape \(B, H=4, T, D=3\), got \(1, 4, 8\)"),
    (torch.zeros(1, 2, 8, 3), ValueError, r"x must have shape \(B, H=4, T, D=3\), got \(1, 2, 8, 3\)"),
    (torch.zeros(1, 4, 8, 5), ValueError, r"D=3\), got \(1, 4, 8, 5\)"),
    (np.zeros((1, 4, 8, 3)), TypeError, "x must be a torch.Tensor"),
    (torch.zeros(1, 4, 8, 3, dtype=torch.float64), TypeError,
     "x must have the parameters' dtype torch.float32, got torch.float64"),
    (torch.zeros(1, 4, 8, 3, device="meta"), ValueError, "x must be on the parameters' device cpu, got meta"),
])
def test_forward_validation(x, exc, match):
    m = Compressor("linear", **GOOD)
    with pytest.raises(exc, match=match):
        m(x)


def test_extra_repr():
    m = Compressor("mlp", heads=4, dim_head=3, block_size=4, stride=2, groups=2, hidden=8, activation="silu",
                   pos_emb=True)
    assert repr(m) == ("Compressor('mlp', heads=4, dim_head=3, block_size=4, stride=2, padding='valid', groups=2, "
                       "dim_out=3, hidden=8, activation='silu', bias=True, pos_emb=True, backend='auto')")
    assert "groups" not in repr(Compressor("mean_pool", **GOOD))
    m = Compressor("gated_pool", heads=4, dim_head=4, block_size=4, stride=2, padding="left", split=True, bias=False)
    assert repr(m) == ("Compressor('gated_pool', heads=4, dim_head=4, block_size=4, stride=2, padding='left', "
                       "groups=1, split=True, bias=False, backend='auto')")


# ---------------------------------------------------------------------------
# state_dict, dtype, device


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    torch.manual_seed(0)
    rec = RECORDS[kind]
    a = Compressor(kind, groups=2, pos_emb=rec.kind.pe, **GOOD)
    randomize(a, 3)
    sd = a.state_dict()
    assert list(sd) == param_names(kind) + pe_names(kind)
    torch.manual_seed(1)
    b = Compressor(kind, groups=2, pos_emb=rec.kind.pe, **GOOD)
    b.load_state_dict(sd, strict=True)
    x, more = torch.randn(2, 4, 11, 3), more_inputs(kind, 2, 4, 11, 3)
    assert torch.equal(a(x, *more), b(x, *more))
    if rec.has_bias:
        c = Compressor(kind, groups=2, pos_emb=rec.kind.pe, bias=False, **GOOD)
        with pytest.raises(RuntimeError, match="Unexpected key"):
            c.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_device(kind):
    pe = RECORDS[kind].kind.pe
    m = Compressor(kind, pos_emb=pe, dtype=torch.float64, device="cpu", **GOOD)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    y = m(torch.randn(1, 4, 8, 3, dtype=torch.float64), *more_inputs(kind, 1, 4, 8, 3, dtype=torch.float64))
    assert y.dtype == torch.float64
    with pytest.raises(TypeError, match="x must have the parameters' dtype torch.float64, got torch.float32"):
        m(torch.randn(1, 4, 8, 3), *more_inputs(kind, 1, 4, 8, 3))
    meta = Compressor(kind, pos_emb=pe, device="meta", dtype=torch.bfloat16, **GOOD)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in meta.parameters())
    meta = meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert not pe or not meta.pe.any()
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    y = meta(torch.randn(1, 4, 8, 3, dtype=torch.bfloat16), *more_inputs(kind, 1, 4, 8, 3, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
