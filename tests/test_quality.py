"""The RMS quality check (kvcompress/testing/quality.py) and the strict
class's bound, on kernels emulated in NumPy: a correct float32 kernel with
another summation order passes both; half-precision accumulation fails the
RMS check; an MLP hidden layer stored in bfloat16 (the io-intermediates
class) passes it, and only the strict per-element bound tells it apart."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kvcompress.testing import _xp, quality
from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.records import RECORDS
from kvcompress.testing.tolerance import compare, exact_output, forward_bound

BF16 = ml_dtypes.bfloat16


def _store(a, dtype):
    """float64 values rounded to ``dtype`` (to nearest), as float64."""
    return np.asarray(a, dtype=np.float64).astype(BF16 if dtype == "bfloat16" else dtype).astype(np.float64)


def _sequential(terms, acc_dtype):
    """sum over the last axis of ``terms`` (float64 products, exact in
    float32), one term at a time, each partial sum rounded to ``acc_dtype``."""
    acc = np.zeros(terms.shape[:-1])
    for k in range(terms.shape[-1]):
        acc = _store(acc + terms[..., k], acc_dtype)
    return acc


def _flat_windows(case, inputs):
    win = _xp.gather(inputs.x64, pe=inputs.pe64, seqlens=case.seqlens, **case.window_kwargs())
    B, H, W, L, D = win.shape
    return win.reshape(B, H, W, L * D)


def _linear(case, inputs, acc):
    """linear by sequential sums in ``acc`` (G = 1, no bias), output stored once."""
    w = inputs.params64["weight"][0].reshape(case.L * case.D, -1)                  # [K, O]
    X = _flat_windows(case, inputs)                                                 # [B, H, W, K]
    return _store(_sequential(np.einsum("bhwk,ko->bhwok", X, w), acc), case.dtype)


def _mlp(case, inputs, acc, hidden=None):
    """mlp (relu, G = 1, no biases) with the first layer summed sequentially
    in ``acc``, the hidden layer stored in ``hidden`` (None: kept), the
    second layer in float64 (exact enough), the output stored once."""
    w1, w2 = inputs.params64["w1"][0], inputs.params64["w2"][0]
    X = _flat_windows(case, inputs)
    p = _sequential(np.einsum("bhwk,kf->bhwfk", X, w1), acc)
    h = np.maximum(p, 0.0)
    if hidden is not None:
        h = _store(_store(h, "float32"), hidden)
    return _store(h @ w2, case.dtype)


def _case(kind, **kw):
    base = dict(dtype="bfloat16", B=1, H=1, G=1, T=512, D=16, block_size=8, stride=4, padding="valid", seed=3)
    return Case(kind=kind, **{**base, **kw})


def _judge(case, got):
    inputs = make_inputs(case, RECORDS[case.kind])
    exact = exact_output(case, inputs)
    b = forward_bound(case, inputs, "strict")
    assert b.well_conditioned
    ok = compare(got(case, inputs), exact, b.bound)[0]
    return ok, quality.rms_ratio(case, inputs, got(case, inputs), exact, b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_float32_kernel_of_another_order_passes(dtype):
    """Sequential float32 sums (not the baseline's blocked order) pass the
    strict bound and the RMS check, linear and mlp."""
    for case, fn in [(_case("linear", dtype=dtype, D_out=16), lambda c, i: _linear(c, i, "float32")),
                     (_case("mlp", dtype=dtype, D_out=16, F=32), lambda c, i: _mlp(c, i, "float32"))]:
        ok, rms = _judge(case, fn)
        assert ok and rms <= 1, (case.kind, dtype, rms)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_accumulation_fails_the_rms_check(dtype):
    """Partial sums in the input dtype: the RMS check fails linear and mlp
    (the worst-case bound may or may not, by the case)."""
    for case, fn in [(_case("linear", dtype=dtype, D_out=16), lambda c, i: _linear(c, i, dtype)),
                     (_case("mlp", dtype=dtype, D_out=16, F=32), lambda c, i: _mlp(c, i, dtype))]:
        ok, rms = _judge(case, fn)
        assert rms > 1, (case.kind, rms)


def test_an_io_intermediates_mlp_fails_only_the_strict_bound():
    """The hidden layer stored in bfloat16 (float32 sums), as the Triton mlp
    does: one more rounding, about the output's own in size, so the RMS
    check passes it; the strict class's per-element bound does not, and the
    io-intermediates bound does."""
    case = _case("mlp", D_out=16, F=32)
    fn = lambda c, i: _mlp(c, i, "float32", hidden="bfloat16")   # noqa: E731
    ok, rms = _judge(case, fn)
    assert rms <= 1 and not ok
    inputs = make_inputs(case, RECORDS["mlp"])
    io = forward_bound(case, inputs, "io-intermediates")
    assert compare(fn(case, inputs), exact_output(case, inputs), io.bound)[0]


def test_check_applies_to_strict_kernels_below_float64():
    assert quality.applies("bfloat16", "strict") and quality.applies("float32", "strict")
    assert not quality.applies("bfloat16", "io-intermediates")
    assert not quality.applies("float64", "strict")


def test_empty_and_non_finite_outputs():
    case = _case("mean_pool", T=3)          # no window: L = 8 > T
    inputs = make_inputs(case, RECORDS["mean_pool"])
    b = forward_bound(case, inputs)
    empty = np.zeros((1, 1, 0, 16))
    assert quality.rms_ratio(case, inputs, empty, empty, b) == 0.0
    case = _case("mean_pool")
    inputs = make_inputs(case, RECORDS["mean_pool"])
    exact = exact_output(case, inputs)
    got = exact.copy()
    got[0, 0, 0, 0] = np.nan
    assert quality.rms_ratio(case, inputs, got, exact, forward_bound(case, inputs)) == float("inf")
