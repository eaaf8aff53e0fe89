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


# --------------------------------------------------------------------------- one model, NumPy or torch

ARRAY_CASES = [
    dict(dtype="float32", B=2, H=4, G=2, T=23, D=3, block_size=4, stride=3, padding="left", F=7, D_out=5, bias=True,
         bias2=True, use_pe=True, activation="relu"),
    dict(dtype="bfloat16", B=1, H=2, G=1, T=16, D=2, block_size=3, stride=2, seqlens=(5, 0, 9, 2), F=4, D_out=3,
         activation="gelu", use_pe=True, bias=True),
    dict(dtype="float16", B=2, H=1, G=1, T=14, D=4, block_size=2, stride=2, F=6, D_out=2, bias=True,
         activation="silu", x_exp=3, w_exp=-2),
    dict(dtype="float32", B=1, H=4, G=2, T=19, D=4, block_size=4, stride=2, padding="left", F=5, D_out=3, bias=True,
         use_pe=True),   # gated_pool with split (C = 2)
]


@pytest.mark.parametrize("fixed", range(len(ARRAY_CASES)))
@pytest.mark.parametrize("kind", KINDS)
def test_model_is_the_same_on_numpy_and_torch(kind, fixed):
    """The tolerance model is written once for NumPy arrays and torch tensors
    (kvcompress/testing/_xp.py), so scripts/gpu_check.py runs the harness's
    own functions on CUDA tensors: on float64 CPU tensors they give the
    NumPy numbers (exact output, forward bound, every exact gradient and
    its bound, the conditioning) to float64 rounding."""
    import torch

    from kvcompress.testing import gradients
    from kvcompress.testing._xp import float64_inputs
    from kvcompress.testing.cases import Case

    rec = RECORDS[kind]
    case = Case(kind=kind, seed=fixed, **ARRAY_CASES[fixed])
    if not rec.kind.pe:
        case = case.replace(use_pe=False)
    if "split" in rec.kind.option_names and case.L % case.S == 0 and case.D % (case.L // case.S) == 0:
        case = case.replace(split=True)
    inputs = make_inputs(case, rec)
    g = round_to(np.random.default_rng(fixed).standard_normal((case.B, case.H, case.W, rec.d_out(case))), case.dtype)

    def t(a):
        return None if a is None else torch.from_numpy(a)
    on_torch = float64_inputs(t(inputs.x64), {k: t(v) for k, v in inputs.params64.items()}, t(inputs.pe64))
    want, ok_np = gradients.model(case, inputs, g)
    got, ok_t = gradients.model(case, on_torch, torch.from_numpy(g))
    assert ok_np == ok_t and isinstance(ok_t, bool)
    assert set(got) == set(want) == {"y", "x", *(k for k, v in inputs.params64.items() if v is not None),
                                     *(["pe"] if case.use_pe else [])}
    for name in want:
        for what, a, b in zip(("exact", "bound"), want[name], got[name]):
            assert isinstance(b, torch.Tensor) and b.dtype == torch.float64
            np.testing.assert_allclose(b.numpy(), a, rtol=1e-12, atol=1e-300, err_msg=f"{what} {name}")
    np.testing.assert_allclose(want["y"][0], rec.call_reference(case, inputs), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- gated_pool (SPEC 3b)


def _gated_draw(data, *, dtypes=("float64",)):
    """A small gated_pool configuration and its float64 values, exactly
    representable in the drawn dtype: dict of arrays and windowing."""
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    split = data.draw(st.booleans(), label="split")
    S = data.draw(st.integers(1, 3), label="stride")
    C = data.draw(st.integers(1, 3), label="chunks") if split else 1
    L = C * S if split else data.draw(st.integers(S, 4), label="block_size")
    D_out = data.draw(st.integers(1, 3), label="D_out")
    G = data.draw(st.integers(1, 2), label="groups")
    H = G * data.draw(st.integers(1, 2), label="heads_per_group")
    B = data.draw(st.integers(1, 2), label="batch")
    T = data.draw(st.integers(0, 10), label="T")
    padding = data.draw(st.sampled_from(["valid", "left"]), label="padding")
    z_exp = data.draw(st.integers(-3, 2), label="z_exp")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    rng = np.random.default_rng(seed)
    Dx = C * D_out
    x = round_to(rng.standard_normal((B, H, T, Dx)), dtype)
    z = round_to(rng.standard_normal((B, H, T, Dx)) * 2.0 ** z_exp, dtype)
    bias = None if data.draw(st.booleans(), label="no_bias") else round_to(rng.standard_normal((G, L, D_out)), dtype)
    return dict(x=x, z=z, bias=bias, split=split, L=L, S=S, padding=padding, dtype=dtype, rng=rng)


def _gated_windows(a, x):
    """x (B, H, T, Dx) -> (win (B, H, W, L, D_out), idx, valid, chunk of each
    position): the features each window position reads, pads 0."""
    kw = dict(block_size=a["L"], stride=a["S"], padding=a["padding"])
    idx, valid = windows.window_index(x.shape[2], **kw)
    win = windows.gather_windows(x, **kw)                                           # [B, H, W, L, Dx]
    L = a["L"]
    D_out = x.shape[3] // (L // a["S"]) if a["split"] else x.shape[3]
    chunk = np.arange(L) // a["S"] if a["split"] else np.zeros(L, int)
    out = np.stack([win[:, :, :, j, chunk[j] * D_out:(chunk[j] + 1) * D_out] for j in range(L)], axis=3)
    return out, idx, valid, chunk, D_out


def _gated_forward(a, x, z, bias):
    """A plain float64 gated_pool for the tests: y (B, H, W, D_out)."""
    v, _, valid, _, _ = _gated_windows(a, x)
    s, *_ = _gated_windows(a, z)
    if bias is not None:
        s = s + bias[windows.group_of_head(bias.shape[0], x.shape[1])][None, :, None]
    s = np.where(valid[None, None, :, :, None], s, -np.inf)
    p = np.exp(s - s.max(axis=3, keepdims=True))
    return (p / p.sum(axis=3, keepdims=True) * v).sum(axis=3)


def _gated_scatter(a, local, T, Dx):
    """The adjoint of _gated_windows: (B, H, W, L, D_out) -> (B, H, T, Dx)."""
    B, H, W, L, D_out = local.shape
    _, idx, valid, chunk, _ = _gated_windows(a, np.zeros((B, H, T, Dx)))
    out = np.zeros((B, H, T, Dx))
    for j in range(L):
        m = valid[:, j]
        np.add.at(out, (slice(None), slice(None), idx[m, j], slice(chunk[j] * D_out, (chunk[j] + 1) * D_out)),
                  local[:, :, m, j])
    return out


@property_settings()
@given(data=st.data())
def test_gated_pool_exact_gradients_match_finite_differences(data):
    """gradients.gated_pool_exact_and_bounds: dv = P g and ds = P (v - y) g
    per window position, scattered to the tokens' feature chunks, and dbias
    summed over windows and the heads of its group, against central
    differences of a float64 forward (h = 1e-6 relative: their error is
    about 1e-10 of the magnitude, a wrong formula O(1) of it)."""
    from kvcompress.testing.gradients import gated_pool_exact_and_bounds
    a = _gated_draw(data)
    x, z, bias, rng = a["x"], a["z"], a["bias"], a["rng"]
    v, _, valid, _, _ = _gated_windows(a, x)
    assume(v.shape[2] > 0)
    g = rng.standard_normal(v.shape[:3] + v.shape[4:])
    gb = gated_pool_exact_and_bounds(v, _gated_windows(a, z)[0], bias, valid, g, dtype="float64")
    T, Dx = x.shape[2:]
    exact = {"x": _gated_scatter(a, gb.exact["v"], T, Dx), "z": _gated_scatter(a, gb.exact["z"], T, Dx)}
    tensors = {"x": x, "z": z}
    if bias is not None:
        exact["bias"], tensors["bias"] = gb.exact["bias"], bias
    else:
        assert "bias" not in gb.exact
    for name, arr in tensors.items():
        assert exact[name].shape == arr.shape
        flat = arr.reshape(-1)
        mag = float(np.abs(exact[name]).max(initial=0.0)) + 1.0
        for i in rng.choice(flat.size, size=min(8, flat.size), replace=False):
            val = flat[i]
            h = 1e-6 * max(1.0, abs(val))
            flat[i] = val + h
            fp = float((_gated_forward(a, x, z, bias) * g).sum())
            flat[i] = val - h
            fm = float((_gated_forward(a, x, z, bias) * g).sum())
            flat[i] = val
            fd = (fp - fm) / (2 * h)
            assert abs(fd - exact[name].reshape(-1)[i]) <= 1e-6 * mag, f"d/d{name}[{i}]: {fd} != " \
                f"{exact[name].reshape(-1)[i]}"


def _gated_kernel_emulation(v, s_z, bias, valid, *, dtype, precision):
    """A strict (or io-intermediates) gated_pool kernel emulated in NumPy:
    logits z + bias in float32 (io-intermediates: then rounded to the
    dtype), max-shifted exp, sums and the division in float32 left to right,
    the output rounded once to the dtype."""
    f32 = np.float32
    s = s_z.astype(f32)
    if bias is not None:
        s = s + bias[windows.group_of_head(bias.shape[0], v.shape[1])][None, :, None].astype(f32)
    if precision == "io-intermediates":
        s = round_to(s.astype(np.float64), dtype).astype(f32)
    s = np.where(valid[None, None, :, :, None], s, f32(-np.inf))
    m = s.max(axis=3)
    num = np.zeros(m.shape, f32)
    den = np.zeros(m.shape, f32)
    for j in range(v.shape[3]):
        e = np.exp(s[:, :, :, j] - m)
        den = den + e
        num = num + e * v[:, :, :, j].astype(f32)
    return round_to((num / den).astype(np.float64), dtype)


@property_settings()
@given(data=st.data())
def test_gated_pool_forward_bound_holds_for_a_float32_kernel(data):
    """tolerance.gated_pool_bound covers a float32 kernel of either precision
    class (SPEC 3c) in float32, float16 and bfloat16, on drawn cases; the
    bound is worst-case, so it holds on every element."""
    from kvcompress.testing.tolerance import gated_pool_bound, gated_pool_exact
    a = _gated_draw(data, dtypes=("float32", "float16", "bfloat16"))
    precision = data.draw(st.sampled_from(["strict", "io-intermediates"]), label="precision")
    v, _, valid, _, _ = _gated_windows(a, a["x"])
    s_z = _gated_windows(a, a["z"])[0]
    b = gated_pool_bound(v, s_z, a["bias"], valid, dtype=a["dtype"], precision=precision)
    assume(b.well_conditioned)
    exact = gated_pool_exact(v, s_z, a["bias"], valid)
    np.testing.assert_allclose(exact, _gated_forward(a, a["x"], a["z"], a["bias"]), rtol=1e-12, atol=1e-300)
    got = _gated_kernel_emulation(v, s_z, a["bias"], valid, dtype=a["dtype"], precision=precision)
    err = np.abs(got - exact)
    assert np.all(err <= b.bound), f"worst error / bound {np.max(err / b.bound, initial=0):.3g}"
