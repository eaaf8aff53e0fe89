"""kvcompress.modules.Compressor: the functional call with its own
parameters, its initialisation, every configuration forward and backward,
packed batches, argument validation, state_dict, dtype and device."""

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
from kvcompress.testing.cases import make_inputs
from kvcompress.testing.convert import DTYPES, to_numpy
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases
from kvcompress.testing.tolerance import UNIT_ROUNDOFF, compare, forward_bound

PARAM_NAMES = {
    "mean_pool": [],
    "weighted_pool": ["weight"],
    "linear": ["weight", "bias"],
    "mlp": ["w1", "b1", "w2", "b2"],
    "attention_pool": ["weight"],
}
SMALL = dict(max_batch=2, max_heads=4, max_dim=5, max_block=4, max_windows=3, max_seqs=3)


def module_for(case, **kw) -> Compressor:
    """The Compressor whose configuration is the harness Case's."""
    extra = {}
    if case.kind in ("linear", "mlp"):
        extra.update(dim_out=case.D_out, bias=case.bias)
    if case.kind == "mlp":
        extra.update(hidden=case.F, activation=case.activation)
    return Compressor(case.kind, heads=case.H, dim_head=case.D, block_size=case.block_size, stride=case.stride,
                      padding=case.padding, groups=case.G, pos_emb=case.use_pe, dtype=DTYPES[case.dtype],
                      **extra, **kw)


def call_functional(m: Compressor, x, cu_seqlens=None):
    """kvcompress.functional.<kind> with the module's own parameters."""
    kw = dict(block_size=m.block_size, stride=m.stride, padding=m.padding, pe=m.pe, cu_seqlens=cu_seqlens)
    if m.kind == "mean_pool":
        return kf.mean_pool(x, **kw)
    if m.kind == "mlp":
        return kf.mlp(x, m.w1, m.b1, m.w2, m.b2, activation=m.activation, **kw)
    return getattr(kf, m.kind)(x, *[getattr(m, n) for n in PARAM_NAMES[m.kind]], **kw)


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
    inputs = make_inputs(case, RECORDS[kind])      # any layout of x, packed or batched
    got = m(inputs.x, cu_seqlens=inputs.cu_seqlens)
    expected = call_functional(m, inputs.x, inputs.cu_seqlens)
    note(repr(case))
    assert got.shape == (case.B, case.H, case.W, RECORDS[kind].d_out(case))
    assert torch.equal(got, expected)


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


@pytest.mark.parametrize("kind", KINDS)
def test_init_and_reset_parameters(kind):
    torch.manual_seed(0)
    H, D, L, G, F, O = 4, 6, 5, 2, 20, 20   # every parameter has >= 40 entries
    kw = dict(dim_out=O) if kind in ("linear", "mlp") else {}
    if kind == "mlp":
        kw["hidden"] = F
    m = Compressor(kind, heads=H, dim_head=D, block_size=L, stride=2, groups=G, pos_emb=True, **kw)
    assert [n for n, _ in m.named_parameters()] == PARAM_NAMES[kind] + ["pe"]

    def check():
        assert m.pe.shape == (H, L, D) and not m.pe.any(), "pe starts at zero"
        if kind == "weighted_pool":
            assert torch.equal(m.weight, torch.full((G, L), 1 / L))
        elif kind == "attention_pool":
            assert m.weight.shape == (G, D, D) and not m.weight.any()
        elif kind in ("linear", "mlp"):
            fan = {"weight": L * D, "bias": L * D, "w1": L * D, "b1": L * D, "w2": F, "b2": F}
            for name in PARAM_NAMES[kind]:
                p, bound = getattr(m, name), 1 / math.sqrt(fan[name])
                # U(-bound, bound): inside, and spread over it (for >= 40 draws, missing
                # either outer half has probability < 2 * 0.75**40 = 2e-5; the seed is fixed)
                assert p.abs().max() <= bound, name
                assert p.max() > 0.5 * bound and p.min() < -0.5 * bound, name

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


# ---------------------------------------------------------------------------
# every configuration, forward and backward


@pytest.mark.parametrize("pos_emb", [False, True], ids=["nope", "pe"])
@pytest.mark.parametrize("groups", [1, 2], ids=["G1", "G2"])
@pytest.mark.parametrize("padding", ["valid", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_configuration_trains(kind, padding, groups, pos_emb):
    torch.manual_seed(0)
    B, H, T, D, L, S = 2, 4, 9, 3, 3, 2
    kw = dict(dim_out=5) if kind in ("linear", "mlp") else {}
    m = Compressor(kind, heads=H, dim_head=D, block_size=L, stride=S, padding=padding, groups=groups,
                   pos_emb=pos_emb, **kw)
    x = torch.randn(B, H, T, D, requires_grad=True)
    y = m(x)
    assert y.shape == (B, H, kf.num_windows(T, L, S, padding), 5 if kw else D)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    names = [n for n, _ in m.named_parameters()]
    assert names == PARAM_NAMES[kind] + (["pe"] if pos_emb else [])
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert p.grad.shape == p.shape and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------
# packed batches


@pytest.mark.parametrize("padding", ["valid", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_cu_seqlens_passthrough(kind, padding):
    torch.manual_seed(0)
    m = Compressor(kind, heads=2, dim_head=3, block_size=4, stride=2, padding=padding, groups=2, pos_emb=True)
    randomize(m, 2)
    cu = torch.tensor([0, 5, 5, 7, 16], dtype=torch.int32)
    x = torch.randn(1, 2, 16, 3)
    y = m(x, cu_seqlens=cu)
    offsets = kf.compressed_cu_seqlens(cu, 4, 2, padding)
    assert y.shape == (1, 2, int(offsets[-1]), 3)
    assert torch.equal(y, call_functional(m, x, cu))
    # the offsets were used: unpacked, the same tokens give other windows
    assert m(x).shape[2] != y.shape[2]


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


def test_defaults_of_unused_arguments_are_accepted():
    for kind in ("mean_pool", "weighted_pool", "attention_pool"):
        m = Compressor(kind, dim_out=3, hidden=None, activation="relu", bias=False, groups=2, **GOOD)
        assert m.dim_out == 3 and not m.has_bias


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


# ---------------------------------------------------------------------------
# state_dict, dtype, device


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    torch.manual_seed(0)
    a = Compressor(kind, groups=2, pos_emb=True, **GOOD)
    randomize(a, 3)
    sd = a.state_dict()
    assert list(sd) == PARAM_NAMES[kind] + ["pe"]
    torch.manual_seed(1)
    b = Compressor(kind, groups=2, pos_emb=True, **GOOD)
    b.load_state_dict(sd, strict=True)
    x = torch.randn(2, 4, 11, 3)
    assert torch.equal(a(x), b(x))
    if kind in ("linear", "mlp"):
        c = Compressor(kind, groups=2, pos_emb=True, bias=False, **GOOD)
        with pytest.raises(RuntimeError, match="Unexpected key"):
            c.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_device(kind):
    m = Compressor(kind, pos_emb=True, dtype=torch.float64, device="cpu", **GOOD)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    y = m(torch.randn(1, 4, 8, 3, dtype=torch.float64))
    assert y.dtype == torch.float64
    with pytest.raises(TypeError, match="x must have the parameters' dtype torch.float64, got torch.float32"):
        m(torch.randn(1, 4, 8, 3))
    meta = Compressor(kind, pos_emb=True, device="meta", dtype=torch.bfloat16, **GOOD)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in meta.parameters())
    meta = meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert not meta.pe.any()
    assert meta(torch.randn(1, 4, 8, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
