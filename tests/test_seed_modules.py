"""The drop-in modules equal the seed's compress networks
(native-sparse-attention-pytorch 0.2.3): same state_dict (names, shapes,
initialisation), same outputs and gradients, same quirks.

Tolerance: the seed and ours compute the same exact value y, each with
rounding error. Ours goes through kvcompress.functional, which the
conformance suite holds to kvcompress/testing/tolerance.py's bound for the
equivalent functional Case; the seed computes the same sums of the same
products in the same dtype (float32 or float64 accumulation, float32
stored intermediates), so the a-priori bound, which holds for any
summation order, covers it too. Hence |ours - seed| <= |ours - y| +
|y - seed| <= 2 * bound. Gradients use kvcompress/testing/gradients.py's bounds
for the same Case the same way (float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st
from native_sparse_attention_pytorch import compress_networks as seed_nets

import kvcompress.functional as kf
from kvcompress import modules
from kvcompress.testing.cases import Case, Inputs
from kvcompress.testing.convert import DTYPES, round_to, to_numpy
from kvcompress.testing.gradients import exact_and_bounds
from kvcompress.testing.tolerance import U64, compare, forward_bound


@dataclass(frozen=True)
class Spec:
    """One seed network: our class, the seed's, and which functional kind
    ours calls."""

    ours: type
    seed: type
    kind: str


SPECS = {
    "conv": Spec(modules.ConvLinearCompress, seed_nets.ConvLinearCompress, "linear"),
    "attention_pool": Spec(modules.AttentionPool, seed_nets.AttentionPool, "attention_pool"),
    "grouped_mlp": Spec(modules.GroupedMLP, seed_nets.GroupedMLP, "mlp"),
    "single_projection": Spec(modules.SingleProjection, seed_nets.SingleProjection, "linear"),  # heads == 1
    "single_projection_grouped": Spec(modules.SingleProjection, seed_nets.SingleProjection, "linear"),
}

# constructor arguments (the seed's positional signature) for the state_dict tests
CONFIGS = [
    ("conv", (1, 1, 1)), ("conv", (2, 3, 4)), ("conv", (3, 5, 2)),
    ("attention_pool", (1, 1)), ("attention_pool", (4, 3)), ("attention_pool", (7, 1)),
    ("grouped_mlp", (3, 4, 2)), ("grouped_mlp", (5, 2, 1, 0.5)), ("grouped_mlp", (2, 3, 3, 2.5)),
    ("single_projection", (3, 4)), ("single_projection", (1, 1, 1)), ("single_projection", (5, 2, 1)),
    ("single_projection_grouped", (3, 4, 2)), ("single_projection_grouped", (2, 1, 3)),
]
CONFIG_IDS = [f"{n}{args}" for n, args in CONFIGS]


def build(name: str, args: tuple, torch_seed: int = 0):
    """(ours, seed) built from the same random stream."""
    spec = SPECS[name]
    torch.manual_seed(torch_seed)
    ours = spec.ours(*args)
    torch.manual_seed(torch_seed)
    seed = spec.seed(*args)
    return ours, seed


def _fan_in(pname: str, shape: tuple) -> int:
    if pname.endswith("bias"):
        return 1
    if pname == "conv.weight":               # (h*d, d, L)
        return shape[1] * shape[2]
    return shape[1]                          # nn.Linear (out, in); EinMix (h, in, out)


def randomize(module, rng: np.random.Generator, dtype: str, w_exp: int) -> None:
    """Every parameter := N(0, 1) * 2**w_exp / sqrt(fan_in), rounded to dtype."""
    with torch.no_grad():
        for pname, p in module.named_parameters():
            v = rng.standard_normal(tuple(p.shape)) * 2.0 ** w_exp / np.sqrt(_fan_in(pname, tuple(p.shape)))
            p.copy_(torch.from_numpy(round_to(v, dtype)))


def functional_equivalent(name: str, seed, kv_shape: tuple, dtype: str) -> tuple[Case, dict]:
    """The functional Case the seed network computes on kv of ``kv_shape``
    and its parameters in the functional layout (float64), read from the
    seed's source independently of kvcompress.modules."""
    b, h, w, n, d = kv_shape
    sd = {k: to_numpy(v) for k, v in seed.state_dict().items()}
    common = dict(kind=SPECS[name].kind, dtype=dtype, B=b, H=h, T=w * n, D=d, padding="valid")
    if name == "conv":
        L = seed.conv.kernel_size[0]
        # Conv1d weight[g*d + o, i, j] multiplies token j, feature i of group g into feature o
        weight = sd["conv.weight"].reshape(h, d, d, L).transpose(0, 3, 2, 1)
        return (Case(G=h, block_size=L, stride=L, D_out=d, bias=True, **common),
                {"weight": weight, "bias": sd["conv.bias"].reshape(h, d)})
    if name == "attention_pool":
        # logits = kv @ W.T: the functional weight is W.T, one group
        return Case(G=1, block_size=n, stride=n, **common), {"weight": sd["to_attn_logits.weight"].T[None]}
    if name == "grouped_mlp":
        F = sd["net.0.weight"].shape[2]
        return (Case(G=h, block_size=n, stride=n, D_out=d, F=F, bias=True, bias2=True, activation="relu",
                     **common),
                {"w1": sd["net.0.weight"], "b1": sd["net.0.bias"].reshape(h, F), "w2": sd["net.2.weight"],
                 "b2": sd["net.2.bias"].reshape(h, d)})
    if name == "single_projection":
        # nn.Linear(n*d, d): W[o, j*d + i] multiplies token j, feature i into feature o
        weight = sd["compress.1.weight"].reshape(d, n, d).transpose(1, 2, 0)[None]
        return Case(G=1, block_size=n, stride=n, D_out=d, **common), {"weight": weight, "bias": None}
    # grouped: the same (d, d) matrix at every window position
    weight = np.broadcast_to(sd["compress.weight"][:, None], (h, n, d, d))
    return Case(G=h, block_size=n, stride=n, D_out=d, **common), {"weight": weight, "bias": None}


def inputs_of(kv64: np.ndarray, params64: dict) -> Inputs:
    """The harness's Inputs for the bounds: only the float64 values matter."""
    b, h, w, n, d = kv64.shape
    return Inputs(x64=kv64.reshape(b, h, w * n, d), params64=params64, pe64=None, x=None, params=None, pe=None,
                  cu_seqlens=None, cu64=None)


@st.composite
def configs(draw, name: str, dtype: str, min_w: int = 0):
    """Constructor arguments, window shape (b from 0, w from min_w, n != L
    where the seed accepts it, d odd and even), parameter init and magnitudes."""
    d = draw(st.integers(1, 6), label="d")
    L = draw(st.integers(1, 4), label="compress_window_size")
    b = draw(st.integers(0, 2), label="b")
    w = draw(st.integers(min_w, 3), label="w")
    if name in ("conv", "attention_pool", "single_projection_grouped"):
        n = draw(st.integers(1, 5), label="n")       # the quirk: any window length
    else:
        n = L
    if name == "conv":
        heads = h = draw(st.integers(1, 3), label="heads")
        args = (heads, d, L)
    elif name == "attention_pool":
        h = draw(st.integers(1, 3), label="h")
        args = (d, L)
    elif name == "grouped_mlp":
        heads = h = draw(st.integers(1, 3), label="heads")
        ef = draw(st.sampled_from((1.0, 0.5, 1.5, 2.0, 0.75)), label="expand_factor")
        assume(int(n * d * ef) >= 1)
        args = (d, L, heads, ef)
    elif name == "single_projection":
        h = draw(st.integers(1, 3), label="h")       # one projection for any h
        args = (d, L) if draw(st.booleans(), label="heads_default") else (d, L, 1)
    else:
        heads = h = draw(st.integers(2, 3), label="heads")
        args = (d, L, heads)
    init = draw(st.sampled_from(("random", "seed")), label="init")
    x_exp = draw(st.integers(-4, 4), label="x_exp")
    if name == "attention_pool":
        # the logits' scale decides conditioning (as in the harness strategies)
        w_exp = draw(st.integers(-6, 3), label="logit_exp") - x_exp
    else:
        w_exp = draw(st.integers(-4, 4), label="w_exp")
    seed = draw(st.integers(0, 2 ** 32 - 1), label="seed")
    return dict(args=args, shape=(b, h, w, n, d), init=init, x_exp=x_exp, w_exp=w_exp, seed=seed)


def setup(name: str, cfg: dict, dtype: str):
    """(ours, seed, kv, kv64): the seed's parameters (its own init or random)
    loaded into ours with strict=True, kv exactly representable in dtype."""
    rng = np.random.default_rng(cfg["seed"])
    ours, seed = build(name, cfg["args"], torch_seed=cfg["seed"] % 2 ** 31)
    tdt = DTYPES[dtype]
    ours.to(tdt)
    seed.to(tdt)
    if cfg["init"] == "random":
        randomize(seed, rng, dtype, cfg["w_exp"])
    ours.load_state_dict(seed.state_dict(), strict=True)
    kv64 = round_to(rng.standard_normal(cfg["shape"]) * 2.0 ** cfg["x_exp"], dtype)
    return ours, seed, torch.from_numpy(kv64).to(tdt), kv64


def _seed_accepts(name: str, cfg: dict) -> bool:
    b, h, w, n, d = cfg["shape"]
    return not (name == "conv" and w * n < cfg["args"][2])   # Conv1d needs >= kernel_size tokens


def kv_shape(name: str, args: tuple, *, b: int = 2, w: int = 3, n: int | None = None) -> tuple:
    """A (b, h, w, n, d) shape the seed accepts for these constructor args
    (n defaults to compress_window_size; h = heads, or 2 where any h works)."""
    if name == "conv":
        h, d, L = args
    elif name in ("grouped_mlp", "single_projection_grouped"):
        d, L, h = args[:3]
    else:                                       # attention_pool, single_projection: any h
        d, L, h = args[0], args[1], 2
    return (b, h, w, L if n is None else n, d)


# ---------------------------------------------------------------------------
# state_dict: names, shapes, initialisation, loading both ways


@pytest.mark.parametrize("name, args", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_and_init_match_seed(name, args):
    ours, seed = build(name, args, torch_seed=1234)
    a, b = ours.state_dict(), seed.state_dict()
    assert list(a) == list(b), f"{name}{args}: keys {list(a)} != seed's {list(b)}"
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{name}{args}: {k}"
        # the same initialisation drawn from the same random stream
        assert torch.equal(a[k], b[k]), f"{name}{args}: {k} initialised differently from the seed"
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in seed.named_parameters()]


@pytest.mark.parametrize("name, args", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_loads_both_ways(name, args):
    ours, seed = build(name, args)
    rng = np.random.default_rng(5)
    randomize(seed, rng, "float32", 0)
    ours.load_state_dict(seed.state_dict(), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), seed.state_dict().values()))
    randomize(ours, rng, "float32", 1)
    seed.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), seed.state_dict().values()))


# ---------------------------------------------------------------------------
# forward and backward against the seed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(SPECS))
@given(data=st.data())
def test_forward_matches_seed(name, dtype, data):
    cfg = data.draw(configs(name, dtype), label="config")
    ours, seed, kv, kv64 = setup(name, cfg, dtype)
    note(f"{name}{cfg['args']} on kv {cfg['shape']}")
    if not _seed_accepts(name, cfg):
        # documented divergence: the seed's conv raises, ours is empty
        with pytest.raises(RuntimeError):
            seed(kv)
        got = ours(kv)
        b, h, w, n, d = cfg["shape"]
        assert got.shape == (b, h, 0, d) and got.dtype == kv.dtype
        return
    case, params64 = functional_equivalent(name, seed, cfg["shape"], dtype)
    bound = forward_bound(case, inputs_of(kv64, params64))
    assume(bound.well_conditioned)
    expected = seed(kv)
    got = ours(kv)
    assert got.shape == expected.shape == (case.B, case.H, case.W, case.D), (got.shape, expected.shape, case)
    assert got.dtype == expected.dtype
    ok, ratio, idx, err = compare(to_numpy(got), to_numpy(expected), 2 * bound.bound)
    note(f"worst |ours - seed| / (2 bound) = {ratio:.3g}")
    assert ok, f"{name}{cfg['args']} {dtype}: |ours - seed| = {err:.3g} at {idx}, {ratio:.3g} x 2*bound\n  {case!r}"


def _seed_param_bounds(name: str, gb, kv64: np.ndarray, g64: np.ndarray) -> dict:
    """The gradient bound of each seed parameter, from the functional
    parameters' bounds through the (exact) relabelling of the views; the
    grouped projection's weight is a sum over the n positions, derived below."""
    b, h, w, n, d = kv64.shape
    B = gb.bound
    if name == "conv":
        return {"conv.weight": B["weight"].transpose(0, 3, 2, 1).reshape(h * d, d, -1),
                "conv.bias": B["bias"].reshape(h * d)}
    if name == "attention_pool":
        return {"to_attn_logits.weight": B["weight"][0].T}
    if name == "grouped_mlp":
        return {"net.0.weight": B["w1"], "net.0.bias": B["b1"].reshape(1, h, 1, -1), "net.2.weight": B["w2"],
                "net.2.bias": B["b2"].reshape(1, h, 1, d)}
    if name == "single_projection":
        return {"compress.1.weight": B["weight"][0].transpose(2, 0, 1).reshape(d, n * d)}
    # grouped: gW[h] = sum_j gweight[h, j]. Ours sums the n per-position
    # gradients (each within its bound) with n - 1 more roundings; the seed
    # sums all b*w*n products x * g in one chain. With mag = sum |x| |g|
    # (>= every |term| sum involved), both are within
    # sum_j bound_j + (b*w*n + n + 2) * u_64 * mag.
    mag = np.einsum("bhwji,bhwo->hio", np.abs(kv64), np.abs(g64))
    return {"compress.weight": B["weight"].sum(axis=1) + (b * w * n + n + 2) * U64 * mag}


@pytest.mark.parametrize("name", list(SPECS))
@given(data=st.data())
def test_gradients_match_seed(name, data):
    dtype = "float64"
    # w >= 1: the conv's seed raises on w = 0 (empty gradients: test_empty_batch_or_windows)
    cfg = data.draw(configs(name, dtype, min_w=1), label="config")
    assume(_seed_accepts(name, cfg))
    ours, seed, kv, kv64 = setup(name, cfg, dtype)
    note(f"{name}{cfg['args']} on kv {cfg['shape']}")
    case, params64 = functional_equivalent(name, seed, cfg["shape"], dtype)
    rng = np.random.default_rng(cfg["seed"] + 1)
    g64 = rng.standard_normal((case.B, case.H, case.W, case.D))
    gb = exact_and_bounds(case, inputs_of(kv64, params64), g64)
    assume(gb.well_conditioned)
    g = torch.from_numpy(g64)
    grads = {}
    for who, mod in (("ours", ours), ("seed", seed)):
        leaf = kv.clone().requires_grad_()
        y = mod(leaf)
        params = dict(mod.named_parameters())
        gs = torch.autograd.grad(y, [leaf, *params.values()], g, allow_unused=True)
        grads[who] = dict(zip(["kv", *params], gs))
    bounds = {"kv": gb.bound["x"].reshape(kv64.shape), **_seed_param_bounds(name, gb, kv64, g64)}
    assert set(grads["ours"]) == set(bounds)
    for pname, bound in bounds.items():
        got, ref = grads["ours"][pname], grads["seed"][pname]
        assert got is not None, f"{name}: no gradient reaches {pname}"
        assert got.shape == ref.shape and got.dtype == ref.dtype
        ok, ratio, idx, err = compare(to_numpy(got), to_numpy(ref), 2 * bound)
        note(f"d/d{pname}: worst |ours - seed| / (2 bound) = {ratio:.3g}")
        assert ok, f"{name}{cfg['args']}: d/d{pname} |ours - seed| = {err:.3g} at {idx}, {ratio:.3g} x 2*bound\n" \
                   f"  {case!r}"


# ---------------------------------------------------------------------------
# the quirks, pinned. Integer-valued inputs keep every product and sum exact
# in float64, so these compare exactly.


def _ints(shape, seed=0, lo=-3, hi=4):
    return torch.from_numpy(np.random.default_rng(seed).integers(lo, hi, size=shape).astype(np.float64))


def _set_int_params(*mods, seed=1):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in mods[0].parameters():
            p.copy_(torch.from_numpy(rng.integers(-2, 3, size=tuple(p.shape)).astype(np.float64)))
    for m in mods[1:]:
        m.load_state_dict(mods[0].state_dict(), strict=True)


def test_conv_windows_cross_the_input_windows_when_n_differs():
    """n = 3, compress_window_size = 2: the conv runs over the 9 flattened
    tokens, giving 4 outputs whose windows straddle the input's windows."""
    ours, seed = (m.double() for m in build("conv", (2, 2, 2)))
    _set_int_params(ours, seed)
    kv = _ints((1, 2, 3, 3, 2))                                   # [b, h, w, n, d]
    got = ours(kv)
    assert got.shape == (1, 2, 4, 2)                              # floor(3 * 3 / 2), not w = 3
    assert torch.equal(got, seed(kv))
    # by hand: output t of head g = sum over flattened tokens 2t, 2t+1
    x = kv.reshape(1, 2, 9, 2)
    Wc, bc = ours.conv.weight.view(2, 2, 2, 2), ours.conv.bias.view(2, 2)     # [g, o, i, j], [g, o]
    for t in range(4):
        for g in range(2):
            expect = bc[g] + sum(Wc[g, :, :, j] @ x[0, g, 2 * t + j] for j in range(2))
            assert torch.equal(got[0, g, t], expect)
    # output 1 reads token 3 = the first token of input window 1
    kv2 = kv.clone()
    kv2[0, :, 1, 0] += 1
    assert not torch.equal(ours(kv2)[:, :, 1], got[:, :, 1])


def test_conv_on_fewer_tokens_than_a_window_is_empty_where_the_seed_raises():
    ours, seed = build("conv", (2, 3, 4))
    kv = torch.randn(2, 2, 1, 3, 3)                               # w * n = 3 < 4
    with pytest.raises(RuntimeError):
        seed(kv)
    got = ours(kv)
    assert got.shape == (2, 2, 0, 3)


def test_attention_pool_ignores_compress_window_size():
    kv = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)          # n = 5
    outs = []
    for cws in (1, 2, 5, 9):
        ours, seed = (m.double() for m in build("attention_pool", (6, cws)))
        _set_int_params(ours, seed, seed=3)
        outs.append((ours(kv), seed(kv)))
    for o, s in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(s, outs[0][1])


def test_grouped_projection_shares_one_matrix_over_positions():
    """y = sum_j kv[j] @ W[h]: any n, order of positions irrelevant."""
    ours, seed = (m.double() for m in build("single_projection_grouped", (3, 2, 2)))
    _set_int_params(ours, seed)
    for n in (1, 2, 5):
        kv = _ints((2, 2, 3, n, 3), seed=n)
        got = ours(kv)
        assert torch.equal(got, seed(kv))
        assert torch.equal(got, ours(kv.flip(3)))
        assert torch.equal(got, torch.einsum("bhwi,hio->bhwo", kv.sum(3), ours.compress.weight))


def test_single_projection_is_shared_by_every_head():
    ours, seed = (m.double() for m in build("single_projection", (3, 2)))
    _set_int_params(ours, seed)
    kv = _ints((2, 4, 3, 2, 3))                                   # h = 4 with heads = 1
    got = ours(kv)
    assert torch.equal(got, seed(kv))
    for k in range(4):
        assert torch.equal(got[:, k:k + 1], ours(kv[:, k:k + 1]))


@pytest.mark.parametrize("name, args", [("attention_pool", (3, 2)), ("single_projection_grouped", (3, 2, 2))])
def test_empty_windows_give_zeros_like_the_seed(name, args):
    ours, seed = build(name, args)
    kv = torch.randn(2, 2, 3, 0, 3)                               # n = 0
    got, expected = ours(kv), seed(kv)
    assert got.shape == expected.shape == (2, 2, 3, 3)
    assert torch.equal(got, expected) and not got.any()


@pytest.mark.parametrize("name, args", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("b, w", [(0, 2), (2, 0), (0, 0)])
def test_empty_batch_or_windows(name, args, b, w):
    """b = 0 or w = 0: an empty output of the seed's shape where the seed
    runs; the conv needs >= compress_window_size tokens (w = 0 has none),
    where ours is empty too (documented)."""
    ours, seed = build(name, args)
    kv = torch.randn(kv_shape(name, args, b=b, w=w))
    got = ours(kv)
    B, h, _, _, d = kv.shape
    if name == "conv" and w == 0:
        with pytest.raises(RuntimeError):
            seed(kv)
        assert got.shape == (B, h, 0, d)
    else:
        assert got.shape == seed(kv).shape
    assert got.numel() == 0
    got.sum().backward()                      # the graph exists even when empty
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


# ---------------------------------------------------------------------------
# forward goes through kvcompress.functional with views of the parameters


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name, args, n", [
    ("conv", (2, 3, 4), 2), ("attention_pool", (3, 4), 5), ("grouped_mlp", (3, 4, 2), 4),
    ("single_projection", (3, 4), 4), ("single_projection_grouped", (3, 4, 2), 3)])
def test_forward_calls_functional_with_parameter_views(monkeypatch, name, args, n):
    ours, _ = build(name, args)
    kind = SPECS[name].kind
    calls = []
    real = getattr(kf, kind)

    def spy(x, *params, **kw):
        calls.append((x, params, kw))
        return real(x, *params, **kw)

    monkeypatch.setattr(kf, kind, spy)
    kv = torch.randn(kv_shape(name, args, n=n))
    _, h, _, _, d = kv.shape
    y = ours(kv)
    assert len(calls) == 1, f"{name} must call kvcompress.functional.{kind} once"
    x, params, kw = calls[0]
    L = args[2] if name == "conv" else n
    assert kw["block_size"] == kw["stride"] == L and kw["padding"] == "valid" and kw["backend"] == "auto"
    assert x.shape == (2, h, 3 * n, d)
    own = {_storage(p) for p in ours.parameters()}
    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    assert tensors and all(_storage(p) in own for p in tensors), "weights must be views of the parameters"
    y.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name, args, shape, exc, match", [
    ("conv", (2, 3, 4), (2, 3, 1, 4, 3), ValueError, r"kv must have h = heads = 2"),
    ("conv", (2, 3, 4), (2, 2, 1, 4, 5), ValueError, r"kv must have d = dim_head = 3"),
    ("conv", (2, 3, 4), (2, 2, 4, 3), ValueError, r"kv must have 5 dims"),
    ("attention_pool", (3, 4), (1, 2, 1, 4, 4), ValueError, r"d = dim_head = 3"),
    ("grouped_mlp", (3, 4, 2), (1, 2, 1, 3, 3), ValueError, r"n = compress_window_size = 4"),
    ("grouped_mlp", (3, 4, 2), (1, 3, 1, 4, 3), ValueError, r"h = heads = 2"),
    ("single_projection", (3, 4), (1, 2, 1, 2, 3), ValueError, r"n = compress_window_size = 4"),
    ("single_projection_grouped", (3, 4, 2), (1, 3, 1, 4, 3), ValueError, r"h = heads = 2"),
])
def test_bad_kv_raises_where_the_seed_raises(name, args, shape, exc, match):
    ours, seed = build(name, args)
    kv = torch.randn(shape)
    with pytest.raises(Exception):   # noqa: B017 - the seed's own error, whatever its type
        seed(kv)
    with pytest.raises(exc, match=match):
        ours(kv)


def test_kv_dtype_and_type_errors():
    ours = modules.AttentionPool(3, 4)
    with pytest.raises(TypeError, match="kv must have the parameters' dtype torch.float32, got torch.float64"):
        ours(torch.randn(1, 1, 1, 4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="kv must be a torch.Tensor"):
        ours(np.zeros((1, 1, 1, 4, 3), dtype=np.float32))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: modules.ConvLinearCompress(0, 3, 4), ValueError, "heads must be an int >= 1, got 0"),
    (lambda: modules.AttentionPool(3, 0), ValueError, "compress_window_size must be an int >= 1"),
    (lambda: modules.GroupedMLP(1, 1, 2, 0.5), ValueError,
     r"int\(compress_window_size \* dim_head \* expand_factor\) >= 1"),
    (lambda: modules.GroupedMLP(1, 2, 1, float("nan")), ValueError, "expand_factor must be a finite number"),
    (lambda: modules.GroupedMLP(1, 2, 1, float("inf")), ValueError, "expand_factor must be a finite number"),
    # issue 16, item 4: a str was repeated (int(11 * "3") = 33...3 hidden units), a bool taken for 1
    (lambda: modules.GroupedMLP(1, 2, 1, expand_factor="3"), TypeError, "expand_factor must be a real number"),
    (lambda: modules.GroupedMLP(64, 32, 8, expand_factor="1"), TypeError, "expand_factor must be a real number"),
    (lambda: modules.GroupedMLP(1, 2, 1, expand_factor=True), TypeError, "expand_factor must be a real number"),
    (lambda: modules.GroupedMLP(1, 2, 1, expand_factor=None), TypeError, "expand_factor must be a real number"),
    (lambda: modules.SingleProjection(2.0, 4), TypeError, "dim_head must be an int >= 1, got float 2.0"),
    (lambda: modules.ConvLinearCompress(2, True, 4), TypeError, "dim_head must be an int >= 1, got bool"),
    (lambda: modules.ConvLinearCompress(2, 3, 4, backend="nope"), ValueError, "backend must be 'auto' or one of"),
    (lambda: modules.ConvLinearCompress(2, 3, 4, backend=None), TypeError, "backend must be a str"),
])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_grouped_mlp_takes_numpy_sizes_and_factors():
    m = modules.GroupedMLP(np.int64(3), np.int32(2), np.int64(2), expand_factor=np.float32(1.5))
    assert m.dim_hidden == 9 and m(torch.randn(1, 2, 1, 2, 3)).shape == (1, 2, 1, 3)


@pytest.mark.parametrize("name, args", [("conv", (2, 3, 4)), ("attention_pool", (3, 4)), ("grouped_mlp", (3, 4, 2)),
                                        ("single_projection", (3, 4)), ("single_projection_grouped", (3, 4, 2))])
def test_kv_on_another_device_is_named(name, args):
    """Issue 16, item 5: the device mismatch names kv (it named the
    functional weight, which the caller never passed)."""
    ours, _ = build(name, args)
    kv = torch.randn(kv_shape(name, args, n=4), device="meta")
    with pytest.raises(ValueError, match="kv must be on the parameters' device cpu, got meta"):
        ours(kv)


def test_backend_choice_is_used():
    ours = modules.ConvLinearCompress(2, 3, 2, backend="torch")
    kv = torch.randn(1, 2, 2, 2, 3)
    expected = kf.linear(kv.reshape(1, 2, 4, 3), ours.conv.weight.view(2, 3, 3, 2).permute(0, 3, 2, 1),
                         ours.conv.bias.view(2, 3), block_size=2, stride=2, backend="torch")
    assert torch.equal(ours(kv), expected)
