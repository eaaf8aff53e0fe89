"""The reference checked against itself: two independent readings of SPEC
(the loop reference and a vectorized NumPy formulation on gathered windows)
must agree, worked examples from SPEC must come out, dtypes round-trip, and
bad input is refused."""

from __future__ import annotations

import kvcompress_reference as reference
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcompress.testing.cases import make_inputs
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.strategies import cases


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_loop_reference_matches_vectorized_formulation(kind, data):
    case = data.draw(cases(kind=kind, dtype="float64", magnitudes=False), label="case")
    rec = RECORDS[kind]
    inputs = make_inputs(case, rec)
    loop = rec.call_reference(case, inputs)
    vec = rec.vectorized(case, inputs.x64, rec.args(inputs, torch_side=False), inputs.pe64, case.seqlens)
    np.testing.assert_allclose(loop, vec, rtol=1e-12, atol=1e-12, err_msg=repr(case))


def test_worked_examples_from_spec():
    # x = tokens 1..5 (D = 1), L = 3, S = 2
    x = np.arange(1.0, 6.0).reshape(1, 1, 5, 1)
    # valid: windows [0, 3), [2, 5): means 2 and 4
    np.testing.assert_array_equal(reference.mean_pool(x, block_size=3, stride=2)[0, 0, :, 0], [2.0, 4.0])
    # left: one zero token prepended, W = 5 // 2 = 2: windows {0, 1, 2}, {2, 3, 4}
    np.testing.assert_array_equal(reference.mean_pool(x, block_size=3, stride=2, padding="left")[0, 0, :, 0],
                                  [1.0, 3.0])
    # pe is added at every window position, pad tokens included:
    # (0 + 10, 1, 2) and (2 + 10, 3, 4)
    pe = np.array([10.0, 0.0, 0.0]).reshape(1, 3, 1)
    np.testing.assert_array_equal(
        reference.mean_pool(x, block_size=3, stride=2, padding="left", pe=pe)[0, 0, :, 0], [13 / 3, 19 / 3])
    # packed: sequences [1, 2, 3] and [4, 5]: only the first holds a window
    cu = np.array([0, 3, 5])
    np.testing.assert_array_equal(reference.mean_pool(x, block_size=3, stride=2, cu_seqlens=cu)[0, 0, :, 0], [2.0])
    np.testing.assert_array_equal(reference.compressed_cu_seqlens(cu, 3, 2), [0, 1, 1])
    np.testing.assert_array_equal(reference.compressed_cu_seqlens(cu, 3, 2, "left"), [0, 1, 2])
    # attention pool with zero weight is the mean; mlp flattens token-major
    np.testing.assert_allclose(reference.attention_pool(x, np.zeros((1, 1, 1)), block_size=3, stride=2),
                               reference.mean_pool(x, block_size=3, stride=2))
    x2 = np.arange(4.0).reshape(1, 1, 2, 2)          # window [[0, 1], [2, 3]]
    w1 = np.zeros((1, 4, 1))
    w1[0, 2, 0] = 1.0                                 # picks flat index 2 = token 1, feature 0
    y = reference.mlp(x2, w1, None, np.ones((1, 1, 1)), None, block_size=2, stride=2)
    assert y[0, 0, 0, 0] == 2.0


def test_activations_and_nan():
    from kvcompress_reference.mlp import gelu, relu, silu
    assert relu(-1.0) == 0.0 and relu(2.0) == 2.0 and np.isnan(relu(float("nan")))
    assert abs(gelu(1.0) - 0.8413447460685429) < 1e-15     # Phi(1) = 0.841344746...
    assert silu(-800.0) == -0.0 and silu(800.0) == 800.0   # no overflow either way
    x = np.ones((1, 1, 4, 2))
    x[0, 0, 1, 0] = np.nan
    y = reference.attention_pool(x, np.ones((1, 2, 2)), block_size=2, stride=2)
    assert np.isnan(y[0, 0, 0]).all() and np.isfinite(y[0, 0, 1]).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_returns_input_dtype(kind, dtype):
    case = RECORDS[kind]
    from kvcompress.testing.cases import Case
    c = Case(kind=kind, dtype="float64", B=1, H=2, G=2, T=7, D=3, block_size=3, stride=2, D_out=2, F=4, seed=1)
    inputs = make_inputs(c, case)
    args = [None if a is None else a.astype(dtype) for a in case.args(inputs, torch_side=False)]
    y = case.reference(inputs.x64.astype(dtype), *args, **c.window_kwargs(), **case.extra_kwargs(c))
    assert y.dtype == np.dtype(dtype) and y.shape == (1, 2, 3, case.d_out(c))


@pytest.mark.parametrize("bad, match", [
    (dict(x=np.zeros((2, 3, 4))), "4 dims"),
    (dict(stride=0), "stride"),
    (dict(stride=4), "stride"),
    (dict(block_size=2.0), "block_size"),
    (dict(padding="same"), "padding"),
    (dict(pe=np.zeros((1, 2, 2))), "pe must have shape"),
    (dict(cu_seqlens=np.array([0, 2])), "batch size 1"),
    (dict(x=np.zeros((1, 1, 5, 2)), cu_seqlens=np.array([0, 3, 2, 5])), "non-decreasing"),
    (dict(x=np.zeros((1, 1, 5, 2)), cu_seqlens=np.array([0, 4])), "to T=5"),
    (dict(x=np.zeros((1, 1, 5, 2)), cu_seqlens=np.array([0.0, 5.0])), "integer"),
    (dict(x=np.zeros((1, 1, 5, 2), dtype=np.int64)), "floating"),
])
def test_reference_rejects_bad_input(bad, match):
    kw = dict(x=np.zeros((2, 1, 5, 2)), block_size=3, stride=2)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        reference.mean_pool(kw.pop("x"), **kw)


def test_reference_rejects_bad_groups_and_shapes():
    x = np.zeros((1, 3, 5, 2))
    with pytest.raises(ValueError, match="divide"):
        reference.linear(x, np.zeros((2, 3, 2, 2)), block_size=3, stride=1)
    with pytest.raises(ValueError, match="weight must have shape"):
        reference.linear(x, np.zeros((3, 2, 2, 2)), block_size=3, stride=1)
    with pytest.raises(ValueError, match="activation"):
        reference.mlp(x, np.zeros((1, 6, 1)), None, np.zeros((1, 1, 1)), None, activation="tanh", block_size=3,
                      stride=1)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(block_size=3.0), TypeError, "block_size must be an int"),
    (dict(block_size=True), TypeError, "block_size must be an int"),
    (dict(stride=None), TypeError, "stride must be an int"),
    (dict(stride="2"), TypeError, "stride must be an int"),
    (dict(block_size=0), ValueError, "block_size must be an int >= 1"),
    (dict(padding=None), TypeError, "padding must be a str"),
    (dict(x=np.zeros((1, 1, 5, 2)), cu_seqlens=np.array([0.0, 5.0])), TypeError, "cu_seqlens must be a 1-D integer"),
    (dict(x=np.zeros((1, 1, 5, 2)), cu_seqlens=np.array([[0, 5]])), ValueError, "cu_seqlens must be a 1-D integer"),
])
def test_reference_error_types(bad, exc, match):
    """The library's rule (docs/semantics.md, "Errors"): a wrong type is a
    TypeError, a right type out of range or of the wrong shape a ValueError."""
    kw = dict(x=np.zeros((2, 1, 5, 2)), block_size=3, stride=2)
    kw.update(bad)
    with pytest.raises(exc, match=match):
        reference.mean_pool(kw.pop("x"), **kw)


def test_reference_parameter_ranks_and_types():
    x = np.zeros((1, 2, 5, 2))
    with pytest.raises(ValueError, match="weight must have 3 dims"):
        reference.attention_pool(x, np.zeros(()), block_size=2, stride=1)
    with pytest.raises(TypeError, match="weight must be a floating array"):
        reference.weighted_pool(x, np.zeros((1, 2), dtype=np.int64), block_size=2, stride=1)
    with pytest.raises(TypeError, match="activation must be a str"):
        reference.mlp(x, np.zeros((1, 4, 1)), None, np.zeros((1, 1, 1)), None, activation=None, block_size=2,
                      stride=1)


def test_reference_takes_numpy_integers():
    x = np.arange(1.0, 6.0).reshape(1, 1, 5, 1)
    y = reference.mean_pool(x, block_size=np.int64(3), stride=np.int32(2), cu_seqlens=np.array([0, 5]))
    np.testing.assert_array_equal(y[0, 0, :, 0], [2.0, 4.0])
    assert reference.mean_pool(x, block_size=2 ** 40, stride=2 ** 40).shape == (1, 1, 0, 1)
