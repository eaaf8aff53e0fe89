"""Bad input gets a clear error naming the argument and what was expected,
raised before any backend runs (the backends are replaced by a tripwire)."""

from __future__ import annotations

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
    kw = dict(case.window_kwargs(), pe=inputs.pe, cu_seqlens=inputs.cu_seqlens, **RECORDS[kind].extra_kwargs(case))
    return args, kw


def _call(kind, args, kw):
    return getattr(kf, kind)(*args, **kw)


COMMON = [
    # (what, mutate(args, kw), exception, message fragment)
    ("x not a tensor", lambda a, k: a.__setitem__(0, a[0].numpy()), TypeError, "x must be a torch.Tensor"),
    ("x 3-D", lambda a, k: a.__setitem__(0, a[0][0]), ValueError, r"x must have 4 dims \(B, H, T, D\)"),
    ("x integer", lambda a, k: a.__setitem__(0, a[0].long()), TypeError, "x must have a dtype in"),
    ("block_size 0", lambda a, k: k.update(block_size=0), ValueError, "block_size must be an int >= 1"),
    ("block_size float", lambda a, k: k.update(block_size=4.0), ValueError, "block_size must be an int"),
    ("block_size bool", lambda a, k: k.update(block_size=True), ValueError, "block_size must be an int"),
    ("stride 0", lambda a, k: k.update(stride=0), ValueError, "stride must be an int with 1 <= stride <= block_size"),
    ("stride > L", lambda a, k: k.update(stride=5), ValueError, "1 <= stride <= block_size=4"),
    ("padding", lambda a, k: k.update(padding="same"), ValueError, "padding must be one of"),
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
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("what, mutate, exc, match", COMMON, ids=[c[0] for c in COMMON])
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
    ],
    "mlp": [
        ("activation", lambda a, k: k.update(activation="tanh"), ValueError, "activation must be one of"),
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


def test_total_windows_skips_reading_cu_seqlens(monkeypatch):
    """With total_windows the values of cu_seqlens are trusted: no host read
    (the tripwire backend is reached although cu_seqlens is malformed)."""
    args, kw = _valid("linear")
    kw["cu_seqlens"] = torch.tensor([0, 7, 4, 9], dtype=torch.int32)
    with pytest.raises(AssertionError, match="a backend ran"):
        _call("linear", args, {**kw, "total_windows": 5})
