"""total_windows: the packed output size given by the caller spares the
host read of cu_seqlens; every backend gives the same result with it, and a
wrong value is an error, not a silently wrong shape."""

from __future__ import annotations

import pytest
import torch

import kvcompress.functional as kf
from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.records import RECORDS

pytestmark = pytest.mark.kvcompress_property   # parametrized over the implementations by the kvcompress plugin


def _setup(impl):
    if not impl.builtin:
        pytest.skip("a contributor's callable has the reference signature, without total_windows")
    if "packed" not in impl.domain.inputs:
        pytest.skip(f"{impl.id} declares dense inputs only: total_windows sizes a packed output")
    case = Case(kind=impl.kind, dtype="float32", B=1, H=2, G=2, T=19, D=3, block_size=4, stride=2, D_out=3, F=4,
                use_pe=True, bias=True, seqlens=(0, 7, 3, 9), padding="left")
    rec = RECORDS[impl.kind]
    return case, rec, make_inputs(case, rec, impl.device)


def test_same_result_with_total_windows(impl):
    case, rec, inputs = _setup(impl)
    want = rec.call(impl.fn, case, inputs)
    total = int(kf.compressed_cu_seqlens(inputs.cu_seqlens, case.L, case.S, case.padding)[-1])
    got = rec.call(impl.fn, case, inputs, total_windows=total)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_wrong_total_windows_is_an_error(impl):
    case, rec, inputs = _setup(impl)
    total = int(kf.compressed_cu_seqlens(inputs.cu_seqlens, case.L, case.S, case.padding)[-1])
    with pytest.raises((ValueError, RuntimeError)):
        rec.call(impl.fn, case, inputs, total_windows=total + 1)
        if impl.device == "cuda":
            torch.cuda.synchronize()   # a device-side assertion surfaces here
