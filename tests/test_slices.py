"""kvcompress/testing/slices.py: a run of windows as a case of its own gives
exactly those windows of the whole call, for every kind, both paddings,
packed and batched inputs and head subsets with their groups."""

from __future__ import annotations

import kvcompress_reference as reference
import numpy as np
import pytest

from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.records import KINDS, RECORDS
from kvcompress.testing.slices import token_range, window_slice

CASES = [
    # (case fields, seq, first, last, rows, heads)
    (dict(B=2, H=4, G=2, T=40, padding="left"), 0, 0, 2, slice(1, 2), (0, 3)),
    (dict(B=1, H=4, G=1, T=40, padding="valid"), 0, 3, 5, slice(None), (0, 3)),
    (dict(B=2, H=2, G=2, T=37, padding="left"), 0, 7, 9, slice(None), None),
    (dict(B=1, H=3, G=3, T=9 + 30 + 5, seqlens=(9, 30, 5), padding="left"), 1, 5, 7, slice(None), (2,)),
    (dict(B=1, H=2, G=1, T=9 + 30 + 5, seqlens=(9, 30, 5), padding="valid"), 1, 4, 6, slice(None), (1,)),
]


def _case(kind, fields):
    base = dict(kind=kind, dtype="float64", D=4, block_size=8, stride=4, use_pe=RECORDS[kind].kind.pe,
                D_out=3, F=5, bias=True, bias2=True, seed=11)
    if kind == "gated_pool":
        base.update(D=4, split=True, block_size=8, stride=4)   # C = 2 chunks of D_out = 2
    return Case(**{**base, **fields})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fields, seq, first, last, rows, heads", CASES)
def test_a_slice_gives_those_windows_of_the_whole_call(kind, fields, seq, first, last, rows, heads):
    case = _case(kind, fields)
    rec = RECORDS[kind]
    inputs = make_inputs(case, rec)
    full = rec.vectorized(case, inputs.x64, [inputs.params64[p.name] for p in rec.params], inputs.pe64,
                          seqlens=case.seqlens)                                  # (B, H, W, D_out)
    ws = window_slice(case, inputs.x, inputs.params, inputs.pe, first=first, last=last, seq=seq, rows=rows,
                      heads=heads)
    sub = ws.case
    got = rec.vectorized(sub, ws.inputs.x64, [ws.inputs.params64[p.name] for p in rec.params], ws.inputs.pe64)
    hs = list(range(case.H) if heads is None else heads)
    w0, w1 = ws.windows
    assert w1 - w0 == last - first == sub.W
    np.testing.assert_array_equal(got, full[rows][:, hs, w0:w1])
    # the same slice from the float64 arrays
    again = window_slice(case, inputs.x64, inputs.params64, inputs.pe64, first=first, last=last, seq=seq,
                         rows=rows, heads=heads)
    np.testing.assert_array_equal(again.inputs.x64, ws.inputs.x64)
    t0, t1 = ws.tokens
    offset = 0 if case.seqlens is None else sum(case.seqlens[:seq])
    assert (t0 - offset, t1 - offset) == token_range(case, first, last)[:2]


def test_token_range_covers_exactly_the_windows_read():
    case = Case(kind="mean_pool", T=50, block_size=8, stride=4, padding="left")
    assert token_range(case, 0, 2) == (0, 8, "left")      # window 0 is 4 pads + tokens 0..3, window 1 tokens 0..7
    start = reference.window_start(5, 8, 4, "left")
    assert token_range(case, 5, 7) == (start, reference.window_start(6, 8, 4, "left") + 8, "valid")


def test_bad_slices_are_refused():
    case = _case("linear", dict(B=1, H=4, G=2, T=40))
    inputs = make_inputs(case, RECORDS["linear"])
    args = (case, inputs.x, inputs.params, inputs.pe)
    W = case.W
    with pytest.raises(ValueError, match="windows"):
        window_slice(*args, first=W - 1, last=W + 1)
    with pytest.raises(ValueError, match="windows"):
        window_slice(*args, first=2, last=2)
    with pytest.raises(ValueError, match="seq must be"):
        window_slice(*args, first=0, last=1, seq=1)
    with pytest.raises(ValueError, match="groups"):        # heads 0, 1 share group 0; head 2 has group 1
        window_slice(*args, first=0, last=1, heads=(0, 1, 2))
