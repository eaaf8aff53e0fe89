"""gated_pool's loop reference (SPEC section 3b) checked three ways: against
the vectorized NumPy oracle (two independent readings of SPEC must agree),
on hand-checkable cases, and against a NumPy transcription of DeepSeek-V4's
KV compressor, the model this kind exists for."""

from __future__ import annotations

import itertools

import kvcompress_reference as reference
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from kvcompress.testing import windows

TOL = dict(rtol=1e-12, atol=1e-13)


def _random_case(rng, *, B, H, G, T, L, S, Dx, padding, split, with_bias, seqlens=None):
    """Inputs and both answers (loop reference, vectorized oracle) of one case."""
    C = L // S if split else 1
    D_out = Dx // C
    x = rng.standard_normal((B, H, T, Dx))
    z = 3.0 * rng.standard_normal((B, H, T, Dx))     # spread scores: softmaxes far from uniform
    bias = rng.standard_normal((G, L, D_out)) if with_bias else None
    cu = None if seqlens is None else np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)
    loop = reference.gated_pool(x, z, bias, split=split, block_size=L, stride=S, padding=padding, cu_seqlens=cu)
    vec = windows.gated_pool_tokens(x, z, bias, split=split, block_size=L, stride=S, padding=padding,
                                    seqlens=seqlens)
    return loop, vec


# --- (a) loop reference == vectorized oracle --------------------------------

GRID = list(itertools.product(("valid", "left"), (False, True), (False, True), ("one", "per_head"), (False, True)))


@pytest.mark.parametrize("padding, split, with_bias, groups, packed", GRID)
def test_loop_reference_matches_oracle_grid(padding, split, with_bias, groups, packed):
    """Every combination once: both paddings, split on/off, bias on/off, G in {1, H}, packed or not."""
    rng = np.random.default_rng(GRID.index((padding, split, with_bias, groups, packed)))
    H = 2
    seqlens = [9, 0, 3, 12] if packed else None       # an empty and a shorter-than-a-window sequence
    B = 1 if packed else 2
    T = sum(seqlens) if packed else 11
    loop, vec = _random_case(rng, B=B, H=H, G=1 if groups == "one" else H, T=T, L=4, S=2, Dx=6,
                             padding=padding, split=split, with_bias=with_bias, seqlens=seqlens)
    assert loop.shape == vec.shape and loop.shape[2] > 0
    np.testing.assert_allclose(loop, vec, **TOL)


@given(data=st.data())
def test_loop_reference_matches_oracle(data):
    L = data.draw(st.integers(1, 6), label="block_size")
    split = data.draw(st.booleans(), label="split")
    if split:
        S = data.draw(st.sampled_from([s for s in range(1, L + 1) if L % s == 0]), label="stride")
        C = L // S
        Dx = C * data.draw(st.integers(1, 3), label="D_out")
    else:
        S = data.draw(st.integers(1, L), label="stride")
        Dx = data.draw(st.integers(1, 4), label="Dx")
    H = data.draw(st.sampled_from([1, 2, 4]), label="H")
    G = data.draw(st.sampled_from([g for g in (1, 2, 4) if H % g == 0]), label="G")
    padding = data.draw(st.sampled_from(["valid", "left"]), label="padding")
    packed = data.draw(st.booleans(), label="packed")
    if packed:
        seqlens = data.draw(st.lists(st.integers(0, 2 * L + 2), min_size=1, max_size=3), label="seqlens")
        B, T = 1, sum(seqlens)
    else:
        seqlens = None
        B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(0, 3 * L + 2), label="T")
    with_bias = data.draw(st.booleans(), label="with_bias")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    note(f"rerun: _random_case(np.random.default_rng({seed}), B={B}, H={H}, G={G}, T={T}, L={L}, S={S}, "
         f"Dx={Dx}, padding={padding!r}, split={split}, with_bias={with_bias}, seqlens={seqlens})")
    loop, vec = _random_case(np.random.default_rng(seed), B=B, H=H, G=G, T=T, L=L, S=S, Dx=Dx, padding=padding,
                             split=split, with_bias=with_bias, seqlens=seqlens)
    assert loop.shape == vec.shape
    np.testing.assert_allclose(loop, vec, **TOL)


@pytest.mark.parametrize("padding, T", [("valid", 3), ("left", 1)])
def test_shorter_than_a_window_is_empty(padding, T):
    x = np.ones((2, 2, T, 4))
    y = reference.gated_pool(x, x, np.zeros((1, 4, 2)), split=True, block_size=4, stride=2, padding=padding)
    assert y.shape == (2, 2, 0, 2) and y.dtype == x.dtype
    vec = windows.gated_pool_tokens(x, x, np.zeros((1, 4, 2)), split=True, block_size=4, stride=2, padding=padding)
    assert vec.shape == (2, 2, 0, 2)


# --- (b) hand-checkable cases ----------------------------------------------

def test_constant_scores_give_the_mean_over_real_positions():
    x = np.arange(1.0, 6.0).reshape(1, 1, 5, 1)       # tokens 1..5
    z = np.full_like(x, 7.0)
    # valid L=3, S=2: windows {1, 2, 3}, {3, 4, 5}
    np.testing.assert_allclose(reference.gated_pool(x, z, block_size=3, stride=2)[0, 0, :, 0], [2.0, 4.0])
    # left: one pad then {1, 2}, and {2, 3, 4}: the pad is not averaged in (it would give 1.0, not 1.5)
    np.testing.assert_allclose(reference.gated_pool(x, z, block_size=3, stride=2, padding="left")[0, 0, :, 0],
                               [1.5, 3.0])


def test_split_reads_chunk_j_over_S():
    # Dx = 4, L = 4, S = 2: C = 2 chunks of D_out = 2; positions 0, 1 read features 0:2, positions 2, 3 read 2:4
    T = 6
    x = np.arange(T * 4, dtype=np.float64).reshape(1, 1, T, 4)      # x[t, f] = 4t + f
    z = np.zeros_like(x)
    y = reference.gated_pool(x, z, split=True, block_size=4, stride=2, padding="left")
    # window 0: pads at 0, 1; tokens 0, 1 at positions 2, 3 read features 2, 3: means over t in {0, 1}
    np.testing.assert_allclose(y[0, 0, 0], [(2 + 6) / 2, (3 + 7) / 2])
    # window 1: tokens 0, 1 read features 0, 1 and tokens 2, 3 features 2, 3
    np.testing.assert_allclose(y[0, 0, 1], [(0 + 4 + 10 + 14) / 4, (1 + 5 + 11 + 15) / 4])


def test_a_dominant_score_selects_its_value():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 8, 3))
    z = rng.standard_normal((1, 2, 8, 3))
    z[0, :, 5, 1] = 1e6                                             # token 5, feature 1 only
    y = reference.gated_pool(x, z, block_size=4, stride=4)          # windows {0..3}, {4..7}
    np.testing.assert_allclose(y[0, :, 1, 1], x[0, :, 5, 1])
    # the other features of that window are untouched by it: a plain softmax of their own scores
    p = np.exp(z[0, :, 4:8, 0] - z[0, :, 4:8, 0].max(axis=1, keepdims=True))
    np.testing.assert_allclose(y[0, :, 1, 0], (p * x[0, :, 4:8, 0]).sum(1) / p.sum(1), **TOL)


def test_pads_weigh_zero_whatever_their_bias():
    x = np.arange(1.0, 5.0).reshape(1, 1, 4, 1)
    z = np.zeros_like(x)
    bias = np.array([[[1e6], [0.0], [0.0]]])                        # a huge bias on the pad position 0
    y = reference.gated_pool(x, z, bias, block_size=3, stride=2, padding="left")
    # window 0 = (pad, 1, 2): the pad's bias is ignored; window 1 = (2, 3, 4): its position 0 is real and wins
    np.testing.assert_allclose(y[0, 0, :, 0], [1.5, 2.0])
    y = reference.gated_pool(x, z, bias, block_size=3, stride=1, padding="valid")
    np.testing.assert_allclose(y[0, 0, :, 0], [1.0, 2.0])           # real token at position 0 dominates


def test_log_bias_is_weighted_pool_and_scores_are_shift_invariant():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 9, 3))
    w = rng.uniform(0.5, 2.0, size=(2, 4))                           # (G, L)
    bias = np.repeat(np.log(w)[:, :, None], 3, axis=2)               # [G, L, D]
    y = reference.gated_pool(x, np.zeros_like(x), bias, block_size=4, stride=1)
    np.testing.assert_allclose(y, reference.weighted_pool(x, w / w.sum(1, keepdims=True), block_size=4, stride=1),
                               **TOL)
    z = rng.standard_normal(x.shape)
    shifted = z + rng.standard_normal((2, 2, 1, 3)) * 100            # one constant per (b, h, feature)
    np.testing.assert_allclose(reference.gated_pool(x, shifted, block_size=4, stride=3),
                               reference.gated_pool(x, z, block_size=4, stride=3), rtol=1e-10, atol=1e-12)


def test_nan_stays_in_its_windows():
    x = np.ones((1, 1, 8, 2))
    z = np.zeros_like(x)
    z[0, 0, 1, 0] = np.nan
    y = reference.gated_pool(x, z, block_size=4, stride=4)
    assert np.isnan(y[0, 0, 0, 0]) and np.isfinite(y[0, 0, 0, 1]) and np.isfinite(y[0, 0, 1]).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
def test_returns_input_dtype(dtype):
    x = np.linspace(-1, 1, 2 * 7 * 4).reshape(1, 2, 7, 4).astype(dtype)
    y = reference.gated_pool(x, x, np.zeros((2, 4, 2), dtype), split=True, block_size=4, stride=2, padding="left")
    assert y.dtype == np.dtype(dtype) and y.shape == (1, 2, 3, 2)
    np.testing.assert_allclose(y.astype(np.float64), reference.gated_pool(
        x.astype(np.float64), x.astype(np.float64), split=True, block_size=4, stride=2, padding="left"),
        rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(z=np.zeros((1, 2, 8, 5))), ValueError, "z must have shape"),
    (dict(z=np.zeros((2, 8, 4))), ValueError, "z must have 4 dims"),
    (dict(z=np.zeros((1, 2, 8, 4), dtype=np.int64)), TypeError, "z must be a floating array"),
    (dict(bias=np.zeros((3, 4, 4))), ValueError, "divide"),
    (dict(bias=np.zeros((1, 4, 2))), ValueError, "bias must have shape"),
    (dict(bias=np.zeros((4, 4))), ValueError, "bias must have 3 dims"),
    (dict(split=1), TypeError, "split must be a bool"),
    (dict(split=True, stride=3), ValueError, "stride S=3 must divide block_size L=4"),
    (dict(split=True, x=np.zeros((1, 2, 8, 3)), z=np.zeros((1, 2, 8, 3))), ValueError, "must divide the feature"),
    (dict(split=True, bias=np.zeros((1, 4, 4))), ValueError, r"bias must have shape \(1, 4, 2\)"),
    (dict(stride=5), ValueError, "stride"),
    (dict(padding="same"), ValueError, "padding"),
])
def test_rejects_bad_input(kwargs, exc, match):
    kw = dict(x=np.zeros((1, 2, 8, 4)), z=np.zeros((1, 2, 8, 4)), bias=None, block_size=4, stride=2)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        reference.gated_pool(kw.pop("x"), kw.pop("z"), kw.pop("bias"), **kw)


# --- (c) DeepSeek-V4 equivalence -------------------------------------------

# Math of DeepSeek-V4 inference/model.py Compressor, read at github.com/Nicooo-Wang/DeepSeek-V4-Pro-code@0ec3a03

def _softmax_pool(kv, score, axis):
    """sum over ``axis`` of softmax(score) * kv, max-shifted, -inf scores weighing 0."""
    p = np.exp(score - score.max(axis=axis, keepdims=True))
    return (kv * (p / p.sum(axis=axis, keepdims=True))).sum(axis=axis)


def deepseek_v4_compress_prefill(kv, score, ape, ratio):
    """DeepSeek-V4's prefill pooling, before its RMSNorm and RoPE.

    kv, score: (b, T, coff*d), the per-token wkv and wgate projections;
    ape: (ratio, coff*d); coff = 2 (overlap) when ratio == 4, else 1.
    Returns (b, T // ratio, d), one compressed token per full group of ratio
    tokens; the trailing T mod ratio tokens only wait in its decode state.
    """
    b, T, F2 = kv.shape
    overlap = ratio == 4
    d = F2 // 2 if overlap else F2
    n = T // ratio
    kv = kv[:, :n * ratio].reshape(b, n, ratio, F2)                   # [b, groups, ratio, coff*d]
    score = score[:, :n * ratio].reshape(b, n, ratio, F2) + ape        # ape[r, e] on token r of each group
    if overlap:
        # rows [0, ratio): the previous group's FIRST d features (group -1: value 0, score -inf);
        # rows [ratio, 2*ratio): the current group's LAST d features
        prev_kv = np.zeros((b, n, ratio, d))
        prev_score = np.full((b, n, ratio, d), -np.inf)
        prev_kv[:, 1:] = kv[:, :-1, :, :d]
        prev_score[:, 1:] = score[:, :-1, :, :d]
        kv = np.concatenate([prev_kv, kv[..., d:]], axis=2)           # [b, groups, 2*ratio, d]
        score = np.concatenate([prev_score, score[..., d:]], axis=2)
    return _softmax_pool(kv, score, axis=2)


def deepseek_v4_compress_decode(kv, score, ape, ratio):
    """DeepSeek-V4's decode path, one token at a time with its state
    buffers: (b, T, coff*d) -> (b, T // ratio, d), a token emitted at the end of each group."""
    b, T, F2 = kv.shape
    overlap = ratio == 4
    d = F2 // 2 if overlap else F2
    coff = 2 if overlap else 1
    kv_state = np.zeros((b, coff * ratio, F2))                        # with overlap: [previous group; current group]
    score_state = np.full((b, coff * ratio, F2), -np.inf)
    out = []
    for pos in range(T):
        r = pos % ratio
        row = ratio + r if overlap else r
        kv_state[:, row] = kv[:, pos]
        score_state[:, row] = score[:, pos] + ape[r]
        if (pos + 1) % ratio:
            continue
        if overlap:
            k = np.concatenate([kv_state[:, :ratio, :d], kv_state[:, ratio:, d:]], axis=1)
            s = np.concatenate([score_state[:, :ratio, :d], score_state[:, ratio:, d:]], axis=1)
            kv_state[:, :ratio] = kv_state[:, ratio:]
            score_state[:, :ratio] = score_state[:, ratio:]
        else:
            k, s = kv_state, score_state
        out.append(_softmax_pool(k, s, axis=1))
    return np.stack(out, axis=1) if out else np.zeros((b, 0, d))


def kvcompress_args_for_deepseek_v4(ape, ratio):
    """SPEC section 3b's mapping: (bias (1, L, d), reference keyword arguments)."""
    if ratio == 4:                                                     # CSA: overlapping windows of 2 groups
        d = ape.shape[1] // 2
        L = 2 * ratio
        bias = np.empty((1, L, d))
        for j in range(L):
            bias[0, j] = ape[j % ratio, (j // ratio) * d:(j // ratio + 1) * d]
        return bias, dict(split=True, block_size=L, stride=ratio, padding="left")
    return ape[None], dict(split=False, block_size=ratio, stride=ratio, padding="valid")   # HCA


@pytest.mark.parametrize("ratio, d, T", [(4, 3, 203), (4, 2, 3), (4, 2, 4), (128, 2, 300), (128, 3, 127)])
def test_deepseek_v4_compressor_equals_gated_pool(ratio, d, T):
    rng = np.random.default_rng(ratio * 1000 + T)
    coff = 2 if ratio == 4 else 1
    b = 2
    kv = rng.standard_normal((b, T, coff * d))
    score = 4.0 * rng.standard_normal((b, T, coff * d))
    ape = 4.0 * rng.standard_normal((ratio, coff * d))
    want = deepseek_v4_compress_prefill(kv, score, ape, ratio)              # [b, T // ratio, d]
    assert want.shape == (b, T // ratio, d)
    np.testing.assert_allclose(deepseek_v4_compress_decode(kv, score, ape, ratio), want, **TOL)
    bias, kw = kvcompress_args_for_deepseek_v4(ape, ratio)
    # DeepSeek's compressor has no head axis: its batch is B, with H = G = 1
    got = reference.gated_pool(kv[:, None], score[:, None], bias, **kw)     # [b, 1, W, d]
    assert got.shape == (b, 1, T // ratio, d)
    np.testing.assert_allclose(got[:, 0], want, **TOL)
    np.testing.assert_allclose(windows.gated_pool_tokens(kv[:, None], score[:, None], bias, **kw)[:, 0], want,
                               **TOL)
