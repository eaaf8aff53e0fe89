"""Bad input gets a clear error naming the argument and what was expected,
raised before any backend runs (the backends are replaced by a tripwire)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvcompress.functional as kf
from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.impls import arm_tripwire
from kvcompress.testing.records import KINDS, RECORDS


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    """Every registered backend fails the test if it is reached."""
    arm_tripwire(monkeypatch)


def _valid(kind):
    case = Case(kind=kind, dtype="float32", B=1, H=4, G=2, T=9, D=3, block_size=4, stride=2, D_out=5, F=6,
                use_pe=True, bias=True, bias2=True, seqlens=(4, 5))
    inputs = make_inputs(case, RECORDS[kind])
    args = [inputs.x, *RECORDS[kind].args(inputs)]
    return args, RECORDS[kind].kwargs(case, inputs.pe, inputs.cu_seqlens)


def _call(kind, args, kw):
    return getattr(kf, kind)(*args, **kw)


COMMON = [
    # (what, mutate(args, kw), exception, message fragment)
    ("x not a tensor", lambda a, k: a.__setitem__(0, a[0].numpy()), TypeError, "x must be a torch.Tensor"),
    ("x 3-D", lambda a, k: a.__setitem__(0, a[0][0]), ValueError, r"x must have 4 dims \(B, H, T, D\)"),
    ("x integer", lambda a, k: a.__setitem__(0, a[0].long()), TypeError, "x must have a dtype in"),
    ("block_size 0", lambda a, k: k.update(block_size=0), ValueError, "block_size must be an int >= 1"),
    ("block_size float", lambda a, k: k.update(block_size=4.0), TypeError, "block_size must be an int"),
    ("block_size bool", lambda a, k: k.update(block_size=True), TypeError, "block_size must be an int"),
    ("block_size None", lambda a, k: k.update(block_size=None), TypeError, "block_size must be an int"),
    ("block_size str", lambda a, k: k.update(block_size="4"), TypeError, "block_size must be an int"),
    ("stride float", lambda a, k: k.update(stride=2.0), TypeError, "stride must be an int"),
    ("stride bool", lambda a, k: k.update(stride=True), TypeError, "stride must be an int"),
    ("stride 0", lambda a, k: k.update(stride=0), ValueError, "stride must be an int with 1 <= stride <= block_size"),
    ("stride > L", lambda a, k: k.update(stride=5), ValueError, "1 <= stride <= block_size=4"),
    ("padding", lambda a, k: k.update(padding="same"), ValueError, "padding must be one of"),
    ("padding not a str", lambda a, k: k.update(padding=None), TypeError, "padding must be a str"),
    ("pe shape", lambda a, k: k.update(pe=k["pe"][:, :2]), ValueError, r"pe must have shape \(4, 4, 3\)"),
    ("pe dtype", lambda a, k: k.update(pe=k["pe"].double()), TypeError, "pe must have x's dtype torch.float32"),
    ("pe device", lambda a, k: k.update(pe=k["pe"].to("meta")), ValueError, "pe must be on x's device"),
    ("cu_seqlens float", lambda a, k: k.update(cu_seqlens=k["cu_seqlens"].float()), TypeError, "int32 or int64"),
    ("cu_seqlens 2-D", lambda a, k: k.update(cu_seqlens=k["cu_seqlens"][None]), ValueError, "must be 1-D"),
    ("cu_seqlens not from 0", lambda a, k: k.update(cu_seqlens=k["cu_seqlens"] + 1), ValueError,
     "non-decreasing from 0 to T=9"),
    ("cu_seqlens short of T", lambda a, k: k.update(cu_seqlens=k["cu_seqlens"][:-1]), ValueError, "to T=9"),
    ("cu_seqlens decreasing", lambda a, k: k.update(cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32)),
     ValueError, "non-decreasing"),
    ("cu_seqlens device", lambda a, k: k.update(cu_seqlens=k["cu_seqlens"].to("meta")), ValueError,
     "cu_seqlens must be on x's device"),
    ("cu_seqlens with B > 1", lambda a, k: a.__setitem__(0, a[0].expand(2, -1, -1, -1)), ValueError,
     "packed sequences in batch 1, got B=2"),
    ("backend", lambda a, k: k.update(backend="cuda-magic"), ValueError, "backend must be 'auto' or one of"),
    ("backend not a str", lambda a, k: k.update(backend=1), TypeError, "backend must be a str"),
]


# pe's rows only for the kinds that take pe
COMMON_CASES = [(kind, *c) for kind in KINDS for c in COMMON if RECORDS[kind].kind.pe or not c[0].startswith("pe ")]


@pytest.mark.parametrize("kind, what, mutate, exc, match", COMMON_CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in COMMON_CASES])
def test_common_arguments(kind, what, mutate, exc, match):
    args, kw = _valid(kind)
    mutate(args, kw)
    with pytest.raises(exc, match=match):
        _call(kind, args, kw)


def _set(i, fn):
    return lambda a, k: a.__setitem__(i, fn(a[i]))


PARAMS = {
    "weighted_pool": [
        ("G does not divide H", _set(1, lambda w: w[:1].expand(3, -1)), ValueError, "must divide H=4, got G=3"),
        ("weight shape", _set(1, lambda w: w[:, :3]), ValueError, r"weight must have shape \(2, 4\)"),
        ("weight dtype", _set(1, lambda w: w.half()), TypeError, "weight must have x's dtype"),
        ("weight device", _set(1, lambda w: w.to("meta")), ValueError, "weight must be on x's device"),
    ],
    "linear": [
        ("G does not divide H", _set(1, lambda w: torch.zeros(3, 4, 3, 5)), ValueError, "G=3"),
        ("weight D", _set(1, lambda w: w[:, :, :2]), ValueError, r"weight must have shape \(2, 4, 3, \?\)"),
        ("weight 3-D", _set(1, lambda w: w[0]), ValueError, "weight must have shape"),
        ("bias shape", _set(2, lambda b: b[:, :4]), ValueError, r"bias must have shape \(2, 5\)"),
        ("bias dtype", _set(2, lambda b: b.double()), TypeError, "bias must have x's dtype"),
        ("weight not a tensor", _set(1, lambda w: w.tolist()), TypeError, "weight must be a torch.Tensor"),
        ("weight 0-d", _set(1, lambda w: w[0, 0, 0, 0]), ValueError, "weight must have a first dim"),
    ],
    "mlp": [
        ("activation", lambda a, k: k.update(activation="tanh"), ValueError, "activation must be one of"),
        ("activation not a str", lambda a, k: k.update(activation=None), TypeError, "activation must be a str"),
        ("w1 shape", _set(1, lambda w: w[:, :-1]), ValueError, r"w1 must have shape \(2, 12, \?\)"),
        ("b1 shape", _set(2, lambda b: b[:, :-1]), ValueError, r"b1 must have shape \(2, 6\)"),
        ("w2 shape", _set(3, lambda w: w[:, :-1]), ValueError, r"w2 must have shape \(2, 6, \?\)"),
        ("b2 shape", _set(4, lambda b: b[:, :-1]), ValueError, r"b2 must have shape \(2, 5\)"),
        ("w2 dtype", _set(3, lambda w: w.double()), TypeError, "w2 must have x's dtype"),
        ("w1 groups", _set(1, lambda w: torch.zeros(3, 12, 6)), ValueError, "w1.shape\\[0\\] is the number of groups"),
    ],
    "attention_pool": [
        ("weight shape", _set(1, lambda w: w[:, :, :2]), ValueError, r"weight must have shape \(2, 3, 3\)"),
        ("weight groups", _set(1, lambda w: torch.zeros(8, 3, 3)), ValueError, "must divide H=4, got G=8"),
        ("weight device", _set(1, lambda w: w.to("meta")), ValueError, "weight must be on x's device"),
    ],
}
PARAM_CASES = [(kind, *c) for kind, cs in PARAMS.items() for c in cs]


@pytest.mark.parametrize("kind, what, mutate, exc, match", PARAM_CASES, ids=[f"{c[0]}-{c[1]}" for c in PARAM_CASES])
def test_parameters(kind, what, mutate, exc, match):
    args, kw = _valid(kind)
    mutate(args, kw)
    with pytest.raises(exc, match=match):
        _call(kind, args, kw)


def test_compressed_cu_seqlens_validates():
    with pytest.raises(TypeError, match="int32 or int64"):
        kf.compressed_cu_seqlens(torch.tensor([0.0, 3.0]), 2, 1)
    with pytest.raises(ValueError, match="stride"):
        kf.compressed_cu_seqlens(torch.tensor([0, 3]), 2, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_tripwire_is_armed(kind):
    """The valid arguments reach the backend: the errors above are the validators'."""
    args, kw = _valid(kind)
    with pytest.raises(AssertionError, match="a backend ran"):
        _call(kind, args, kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value, exc, match", [
    (1.0, TypeError, "total_windows must be None or an int"),
    (True, TypeError, "total_windows must be None or an int"),
    (-1, ValueError, "total_windows must be >= 0"),
])
def test_total_windows(kind, value, exc, match):
    args, kw = _valid(kind)
    with pytest.raises(exc, match=match):
        _call(kind, args, {**kw, "total_windows": value})
    kw.pop("cu_seqlens")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        _call(kind, args, {**kw, "total_windows": 3})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cu", [[0, 7, 4, 9], [0, 4, 8], [1, 4, 9], [0, 4, 10]],
                         ids=["decreasing", "short of T", "not from 0", "past T"])
def test_total_windows_still_reads_cu_seqlens_on_the_cpu(kind, cu):
    """Issue 16, item 3: with total_windows the values of cu_seqlens are
    trusted on a GPU (no host synchronisation), but on the CPU reading them
    is free, so a malformed one is refused by name before any backend runs
    (it was a RuntimeError from repeat_interleave)."""
    args, kw = _valid(kind)
    kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing from 0 to T=9"):
        _call(kind, args, {**kw, "total_windows": 5})


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_total_windows_is_refused_on_the_cpu_before_computing(kind):
    args, kw = _valid(kind)        # seqlens (4, 5), L = 4, S = 2, valid: 1 + 1 windows
    with pytest.raises(ValueError, match="total_windows=3, but cu_seqlens gives 2 windows"):
        _call(kind, args, {**kw, "total_windows": 3})


def test_layout_names_cu_seqlens_when_trusted_values_are_malformed():
    """Where the values were not read (a GPU caller passed total_windows), the
    torch path's layout turns repeat_interleave's RuntimeError into a
    ValueError naming cu_seqlens."""
    from kvcompress._windows import StreamLayout
    for cu in ([0, 7, 4, 9], [0, 4, 8]):
        with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing from 0 to T=9"):
            StreamLayout(1, 2, 1, 9, 3, block_size=2, stride=1, padding="valid",
                         cu_seqlens=torch.tensor(cu), device=torch.device("cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_integers_are_integers(kind):
    """Issue 16, item 6: numpy integers count as ints (as in the reference);
    the valid call reaches the backend."""
    args, kw = _valid(kind)
    kw.update(block_size=np.int64(kw["block_size"]), stride=np.int32(kw["stride"]), total_windows=np.int64(2))
    with pytest.raises(AssertionError, match="a backend ran"):
        _call(kind, args, kw)


# ---------------------------------------------------------------------------
# no windows: an empty output, whatever block_size is (issue 16, item 1)


@pytest.mark.parametrize("kind", ["mean_pool", "attention_pool"])   # the others' weights have L rows
@pytest.mark.parametrize("L", [65536, 2 ** 40, 2 ** 70])
@pytest.mark.parametrize("packed", [False, True])
def test_no_window_returns_empty_without_a_backend(kind, L, packed):
    """block_size = stride = L on T = 9 tokens: no window. The answer is
    (B, H, 0, D_out), returned before any backend runs (the tripwire stays
    silent): no buffer sized by L (105 TB for 2**40) and no loop over L
    (0.4 s for 65536)."""
    args, kw = _valid(kind)
    if not packed:
        kw["cu_seqlens"] = None
    kw.update(block_size=L, stride=L, pe=None)
    y = _call(kind, args, kw)
    assert y.shape == (1, 4, 0, 3) and y.dtype == args[0].dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding", ["valid", "left"])
def test_no_window_output_is_attached_to_autograd(monkeypatch, kind, padding):
    monkeypatch.undo()                     # the real backends: compare with them
    args, kw = _valid(kind)
    per_token = [p.per_token for p in RECORDS[kind].params]
    # T = 1 < S: no window either way (gated_pool's z cut like x)
    leaves = [a if a is None else (a[:, :, :1] if i == 0 or per_token[i - 1] else a).detach().requires_grad_()
              for i, a in enumerate(args)]
    kw.update(cu_seqlens=None, padding=padding)
    if "pe" in kw:
        kw["pe"] = kw["pe"].detach().requires_grad_()
    y = _call(kind, leaves, kw)
    assert y.shape[2] == 0 and y.requires_grad
    ts = [t for t in leaves + [kw.get("pe")] if t is not None]
    grads = torch.autograd.grad(y.sum(), ts)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, ts))


# ---------------------------------------------------------------------------
# num_windows checks its arguments (issue 16, item 2)


@pytest.mark.parametrize("args, exc, match", [
    ((10, 4, 0), ValueError, "stride must be an int with 1 <= stride <= block_size=4, got 0"),
    ((10, 0, 1), ValueError, "block_size must be an int >= 1, got 0"),
    ((10, 4, 5), ValueError, "stride must be an int with 1 <= stride <= block_size=4, got 5"),
    ((-5, 4, 2), ValueError, "n must be an int >= 0, got -5"),
    ((10.5, 4, 2), TypeError, "n must be an int >= 0, got float 10.5"),
    ((True, 4, 2), TypeError, "n must be an int"),
    ((10, 4.0, 2), TypeError, "block_size must be an int"),
    ((10, 4, 2, "same"), ValueError, "padding must be one of"),
    ((10, 4, 2, None), TypeError, "padding must be a str"),
])
def test_num_windows_validates(args, exc, match):
    import kvcompress_reference as reference
    with pytest.raises(exc, match=f"num_windows: {match}"):
        kf.num_windows(*args)
    with pytest.raises(exc, match=match):
        reference.num_windows(*args)


def test_num_windows_values():
    assert kf.num_windows(10, 4, 2) == 4 and kf.num_windows(10, 4, 2, "left") == 5
    assert kf.num_windows(np.int64(10), np.int32(4), 2) == 4 and kf.num_windows(3, 4, 4) == 0
    assert kf.num_windows(10, 2 ** 70, 2 ** 70) == 0


# ---------------------------------------------------------------------------
# numerics at the edge of the accumulation dtype (issue 16, item 7): the
# promise, narrowed in docs/semantics.md ("Numerics") and the reference's
# docstrings, is "finite inputs whose intermediates (window sums, logits)
# fit the accumulation dtype give finite outputs"; beyond it only the
# windows whose intermediates overflow are affected.


def _two_windows(big: float) -> torch.Tensor:
    x = torch.ones(1, 1, 8, 1)        # window 0: tokens 0..3, window 1: tokens 4..7
    x[0, 0, :4] = big
    x[0, 0, 1] = -big                 # logits of both signs in window 0
    return x


@pytest.mark.parametrize("big, w", [(1e18, 1e19), (1e30, 1e7), (3e38, 1e-38)])
def test_attention_pool_is_finite_while_its_logits_fit_float32(monkeypatch, big, w):
    """|logits| up to 1e37 < 3.4e38 = float32's max: finite, and the reference's answer."""
    monkeypatch.undo()
    import kvcompress_reference as reference
    x, weight = _two_windows(big), torch.full((1, 1, 1), w)
    y = kf.attention_pool(x, weight, block_size=4, stride=4)
    want = reference.attention_pool(x.numpy(), weight.numpy(), block_size=4, stride=4)
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6)


def test_attention_pool_logits_beyond_float32_reach_only_their_window(monkeypatch):
    """x ~ 1e30 with weight 1e10: logits 1e40 overflow float32, so the
    max-shifted softmax computes inf - inf and window 0 is NaN on the torch
    path (outside the promise); the reference, in float64, gives the exact
    1e30 there. Window 1 is untouched either way."""
    monkeypatch.undo()
    import kvcompress_reference as reference
    x, weight = _two_windows(1e30), torch.full((1, 1, 1), 1e10)
    y = kf.attention_pool(x, weight, block_size=4, stride=4, backend="torch")
    want = reference.attention_pool(x.numpy(), weight.numpy(), block_size=4, stride=4)
    assert np.isfinite(want).all()
    assert torch.isnan(y[0, 0, 0]).all() and y[0, 0, 1].item() == want[0, 0, 1, 0] == 1.0


@pytest.mark.parametrize("big", [8e37, -8e37])
def test_mean_pool_is_finite_while_its_window_sums_fit_float32(monkeypatch, big):
    """Four tokens of 8e37: sum_j |X[j]| = 3.2e38 fits float32 (max 3.4e38),
    so whatever order the sum is taken in, the mean is finite and exact."""
    monkeypatch.undo()
    import kvcompress_reference as reference
    x = torch.ones(1, 1, 8, 1)
    x[0, 0, :4] = big
    y = kf.mean_pool(x, block_size=4, stride=4)
    want = reference.mean_pool(x.numpy(), block_size=4, stride=4)
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6)


def test_mean_pool_sums_beyond_float32_reach_only_their_window(monkeypatch):
    """Four tokens of 3e38: the window sum 1.2e39 overflows float32 (the
    mean 3e38 would not): inf on the torch path, outside the promise; the
    reference's float64 sum gives 3e38. Window 1 is untouched."""
    monkeypatch.undo()
    import kvcompress_reference as reference
    x = torch.ones(1, 1, 8, 1)
    x[0, 0, :4] = 3e38
    y = kf.mean_pool(x, block_size=4, stride=4, backend="torch")
    want = reference.mean_pool(x.numpy(), block_size=4, stride=4)
    assert np.isfinite(want).all() and want[0, 0, 0, 0] == np.float32(3e38)
    assert torch.isinf(y[0, 0, 0]).all() and y[0, 0, 1].item() == 1.0
