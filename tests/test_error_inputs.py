"""Error inputs as data (issue 16): every bad input of the table in
``kvcompress.testing.error_inputs`` gets its exception and message at every
entry point that takes the argument, before any backend runs; and a fuzz
property throws arbitrary malformed arguments at every entry point,
accepting only a TypeError/ValueError that names an argument, or the
correct result (the reference's, for kvcompress.functional)."""

from __future__ import annotations

import math
import re

import kvcompress_reference as reference
import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

from kvcompress.testing import error_inputs as ei
from kvcompress.testing.impls import TRIPWIRE_MESSAGE, arm_tripwire
from kvcompress.testing.plugin import property_settings
from kvcompress.testing.records import RECORDS

CASES = ei.cases()
ENTRY_NAMES = [e.name for e in ei.ENTRY_POINTS]


def _check(entry, kind, error) -> str | None:
    """None if the corrupted call raises as the table says, else what happened."""
    try:
        ei.run(entry, kind, error)
    except Exception as e:   # noqa: BLE001 - any other exception is the failure reported
        if type(e) is error.exc and re.search(error.pattern(entry), str(e)):
            return None
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("entry", ei.ENTRY_POINTS, ids=ENTRY_NAMES)
def test_every_error_input(monkeypatch, entry):
    """Each applicable (kind, error input) of this entry point, in turn."""
    arm_tripwire(monkeypatch)
    bad = []
    for e, kind, error in CASES:
        if e is entry:
            got = _check(entry, kind, error)
            if got is not None:
                bad.append(f"{kind} / {error.what}: expected {error.exc.__name__} matching "
                           f"{error.pattern(entry)!r}, got {got}")
    assert not bad, f"{entry.name}: {len(bad)} error inputs not refused as listed:\n  " + "\n  ".join(bad)


def test_table_reaches_every_entry_point_and_kind():
    """No (entry point, kind) without error inputs, and no row that applies nowhere."""
    used = {(e.name, k) for e, k, _ in CASES}
    assert used == {(e.name, k) for e in ei.ENTRY_POINTS for k in e.kinds}
    assert {id(err) for _, _, err in CASES} == {id(err) for err in ei.ERROR_INPUTS}


@property_settings()
@given(data=st.data())
def test_error_input_property(data):
    """The property over the table: any entry point, kind and error input,
    drawn; validation comes before computation (the tripwire stays silent)."""
    entry, kind, error = data.draw(st.sampled_from(CASES), label="case")
    note(f"{entry.name} / {kind} / {error.what}")
    with pytest.MonkeyPatch.context() as mp:
        arm_tripwire(mp)
        got = _check(entry, kind, error)
    assert got is None, (f"{entry.name} / {kind} / {error.what}: expected {error.exc.__name__} matching "
                         f"{error.pattern(entry)!r}, got {got}")


# ---------------------------------------------------------------------------
# fuzz: arbitrary malformed arguments


# sizes allocate (a Compressor's parameters, a stream state's pending
# buffer): a huge one is a resource error of the allocator, not a malformed
# input, so only arguments that allocate nothing by themselves get huge ints
_HUGE_OK = {("functional", "block_size"), ("functional", "stride"), ("functional", "total_windows")}
_FLOATS = [0.0, 0.5, 1.0, 2.0, 4.0, 10.5, -1.0, math.nan, math.inf, -math.inf, 1e3]
_STRINGS = ["", "valid", "left", "relu", "gelu", "auto", "torch", "triton", "linear", "3", "max_pool"]
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.bool]


@st.composite
def _tensors(draw):
    shape = draw(st.lists(st.integers(0, 5), max_size=5), label="shape")
    dtype = draw(st.sampled_from(_DTYPES), label="dtype")
    device = draw(st.sampled_from(["cpu", "cpu", "meta"]), label="device")
    return torch.zeros(shape, dtype=dtype).to(device) if dtype != torch.bool else torch.zeros(shape, dtype=dtype,
                                                                                               device=device)


def _mutations(v):
    """Small changes of a valid value: what a near-miss caller passes."""
    if isinstance(v, torch.Tensor):
        out = [v.to("meta"), v.double() if v.dtype != torch.float64 else v.float(), v.long(), v[None], v.tolist()]
        if v.dim():
            out += [v[:-1] if v.dim() == 1 else v[..., :-1], v.flatten()[:1].reshape(()), v.transpose(0, -1)]
        return out
    if isinstance(v, bool):
        return [not v, int(v), None]
    if isinstance(v, int):
        return [v + 1, v - 1, 0, -v, float(v), np.int64(v), str(v), True]
    if isinstance(v, str):
        return [v.upper(), v + " ", None]
    return []


def _junk(entry_name: str, arg: str, valid):
    ints = st.integers(-3, 10)
    if (entry_name, arg) in _HUGE_OK:
        ints = ints | st.sampled_from([2 ** 31, 2 ** 40, 2 ** 62, 2 ** 70])
    return st.one_of(st.none(), st.booleans(), ints, st.integers(-3, 10).map(np.int64), st.sampled_from(_FLOATS),
                     st.sampled_from(_STRINGS), st.lists(st.integers(0, 9), max_size=4), _tensors(),
                     st.sampled_from(_mutations(valid)) if _mutations(valid) else st.nothing())


def _to_numpy(v):
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64 if v.is_floating_point() else v.dtype).cpu().numpy()
    return v


def _reference_answer(kind, args):
    a = {k: _to_numpy(v) for k, v in args.items() if k not in ("total_windows", "backend")}
    x, params = a.pop("x"), [a.pop(p.name) for p in RECORDS[kind].params]
    return getattr(reference, kind)(x, *params, **a)


@pytest.mark.parametrize("entry", ei.ENTRY_POINTS, ids=ENTRY_NAMES)
@property_settings(scale=2)   # cheap examples (validation, tiny calls): 80 per entry point in ci
@given(data=st.data())
def test_fuzz_malformed_arguments(entry, data):
    kind = data.draw(st.sampled_from(entry.kinds), label="kind")
    args = entry.valid(kind)
    names = data.draw(st.lists(st.sampled_from(sorted(args)), min_size=1, max_size=2, unique=True), label="args")
    # a huge block_size with left padding is a real (and costly) call: windows of 2**40 positions
    assume(not ({"block_size", "stride"} & set(names) and "padding" in names))
    for name in names:
        args[name] = data.draw(_junk(entry.name, name, args[name]), label=name)
    note(f"{entry.name} / {kind}: " + ", ".join(f"{n}={args[n]!r}"[:120] for n in names))
    try:
        got = entry.call(kind, dict(args))
    except (TypeError, ValueError) as e:
        msg = str(e)
        named = [n for n in entry.argument_names(kind) if re.search(rf"\b{re.escape(n)}\b", msg)]
        assert named, f"{entry.name}: {type(e).__name__} naming no argument: {msg}"
        assert TRIPWIRE_MESSAGE not in msg
        return
    # accepted: the call was valid after all, so the answer must be right
    if entry.name == "num_windows":
        assert got == reference.num_windows(**args) and type(got) is int
        return
    if entry.name == "compressed_cu_seqlens":
        assert got.dtype == args["cu_seqlens"].dtype and got.shape == args["cu_seqlens"].shape
        if got.device.type == "cpu":
            cu = args["cu_seqlens"].numpy()
            if (cu[0] == 0 and (np.diff(cu) >= 0).all()):    # the values are not checked (no device read)
                want = reference.compressed_cu_seqlens(cu, args["block_size"], args["stride"], args["padding"])
                np.testing.assert_array_equal(got.numpy(), want)
        return
    outs = [got] if isinstance(got, torch.Tensor) else [t for t in got if isinstance(t, torch.Tensor)]
    assert outs, f"{entry.name} returned {type(got).__name__}"
    if entry.name == "functional":
        want = _reference_answer(kind, args)      # the reference accepts what the library accepts
        assert tuple(got.shape) == want.shape
        np.testing.assert_allclose(got.detach().double().numpy(), want.astype(np.float64), rtol=2e-3, atol=2e-3)
