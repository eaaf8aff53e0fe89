"""What the vectorized torch backend promises beyond its values: it never
keeps an L/S-times unfolded copy of the input for backward."""

from __future__ import annotations

import pytest
import torch

import kvcompress.functional as kf
from kvcompress.testing.cases import Case, make_inputs
from kvcompress.testing.records import RECORDS


def _saved_bytes(fn):
    """Bytes of distinct storages autograd saves for backward during fn()."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["mean_pool", "weighted_pool", "linear", "mlp"])
@pytest.mark.parametrize("padding", ["valid", "left"])
def test_no_unfolded_copy_is_kept_for_backward(kind, padding):
    # L / S = 16: an unfolded copy would be 16 times the input
    case = Case(kind=kind, B=2, H=4, G=2, T=512, D=16, block_size=16, stride=1, padding=padding, D_out=16, F=16,
                use_pe=True, bias=True, bias2=True, layout="bthd")
    rec = RECORDS[kind]
    inputs = make_inputs(case, rec)
    x = inputs.x.detach().requires_grad_()
    params = [None if p is None else p.detach().requires_grad_() for p in rec.args(inputs)]
    kw = dict(case.window_kwargs(), pe=inputs.pe, **rec.extra_kwargs(case))
    saved = _saved_bytes(lambda: getattr(kf, kind)(x, *params, backend="torch", **kw))
    x_bytes = x.numel() * 4
    # the stream copy of x, the hidden layer of the mlp ((B, H, W, F) = x's
    # size here), index tensors and parameters: a few times x, never 16
    assert saved <= 4 * x_bytes, f"{kind}: {saved} bytes saved for backward, input is {x_bytes}"


@pytest.mark.parametrize("padding", ["valid", "left"])
def test_unpacked_layout_equals_one_packed_sequence(padding):
    """StreamLayout derives an unpacked input's offsets from host integers;
    they must equal the tensor derivation for cu_seqlens = [0, T] (one
    sequence), the path every packed batch takes, for every small T, L, S
    (T < L and T = 0 included)."""
    from kvcompress._windows import StreamLayout
    cpu = torch.device("cpu")
    for T in range(0, 23):
        for L in range(1, 6):
            for S in range(1, L + 1):
                a = StreamLayout(2, 2, 1, T, 3, block_size=L, stride=S, padding=padding, cu_seqlens=None, device=cpu)
                b = StreamLayout(2, 2, 1, T, 3, block_size=L, stride=S, padding=padding,
                                 cu_seqlens=torch.tensor([0, T]), device=cpu)
                where = f"T={T} L={L} S={S} padding={padding!r}"
                assert (a.W, a.Tp, a.Np, a.R) == (b.W, b.Tp, b.Np, b.R), where
                assert torch.equal(a.dest, b.dest) and a.dest.dtype == b.dest.dtype, where
                assert torch.equal(a.windows, b.windows) and a.windows.dtype == b.windows.dtype, where
