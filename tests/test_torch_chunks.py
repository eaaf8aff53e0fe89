"""The chunk formulation of the vectorized torch backend (issue 14):
``chunk_sum`` (C = L / S matmuls with K = S*D over chunks of the token
stream) equals ``position_sum`` (L matmuls with K = D over strided views)
plus the per-head pe term, forward and every gradient (stream, weight, pe),
in float64; its backward is itself differentiable (gradgradcheck); and
linear and mlp take it exactly when S divides L.

Values against the reference and the tolerance model are the property
suite's job (kvcompress/testing/properties); this file pins the two
internal paths to each other on the layouts that make the stream tricky:
left padding, packed sequences, groups, several batch rows, T not a
multiple of S, no window and one window.
"""

from __future__ import annotations

import pytest
import torch

import kvcompress.functional as kf
from kvcompress._windows import StreamLayout
from kvcompress.ops import _torch_common as tc

F64 = torch.float64

# (B, H, G, T, D, L, S, padding, cu_seqlens): S divides L in every case
CASES = {
    "left": (1, 2, 2, 40, 3, 8, 4, "left", None),
    "valid": (1, 2, 2, 40, 3, 8, 4, "valid", None),
    "G=1": (1, 3, 1, 21, 2, 6, 3, "left", None),
    "1<G<H": (1, 4, 2, 19, 2, 4, 2, "valid", None),
    "B>1, T%S!=0": (3, 2, 1, 23, 2, 6, 2, "left", None),
    "S=L": (2, 2, 2, 17, 3, 4, 4, "valid", None),
    "packed, left": (1, 4, 2, 30, 2, 6, 3, "left", [0, 7, 7, 20, 30]),
    "packed, valid": (1, 2, 1, 30, 3, 4, 2, "valid", [0, 3, 15, 30]),
    "W=0": (2, 2, 1, 5, 2, 8, 4, "valid", None),
    "W=0 packed": (1, 2, 2, 9, 2, 8, 4, "valid", [0, 4, 9]),
    "W=1": (2, 4, 2, 8, 2, 8, 4, "valid", None),
    "W=1 left": (1, 2, 1, 4, 3, 8, 4, "left", None),
}


def _make(case, O, *, pe=True, bias=True, seed=0):
    """A layout, a leaf stream of random tokens, a leaf weight (G, L, D, O),
    a leaf pe (H, L, D) (or None) and a leaf bias (G, O) (or None), float64."""
    B, H, G, T, D, L, S, padding, cu = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=gen, dtype=F64)
    cu = None if cu is None else torch.tensor(cu)
    layout = StreamLayout(B, H, G, T, D, block_size=L, stride=S, padding=padding, cu_seqlens=cu, device=x.device)
    stream = layout.to_stream(x, F64).detach().requires_grad_()
    w = torch.randn(G, L, D, O, generator=gen, dtype=F64).requires_grad_()
    p = torch.randn(H, L, D, generator=gen, dtype=F64).requires_grad_() if pe else None
    b = torch.randn(G, O, generator=gen, dtype=F64).requires_grad_() if bias else None
    return layout, stream, w, p, b


def _by_positions(layout, stream, w, pe=None, bias=None):
    """position_sum plus the pe and bias terms written out per head: (G, R, O)."""
    y = tc.position_sum(layout, stream, w)                                   # [G, R, O]
    G, L, D, O = w.shape
    y = y.view(G, layout.Hg, -1, O)
    if pe is not None:
        w_heads = w.repeat_interleave(layout.Hg, 0)                          # [H, L, D, O]
        y = y + torch.einsum("hjd,hjdo->ho", pe, w_heads).view(G, layout.Hg, 1, O)
    if bias is not None:
        y = y + bias[:, None, None, :]
    return y.reshape(G, layout.R, O)


@pytest.mark.parametrize("O", [2, 40], ids=["O<R", "O>R"])    # the two weight-gradient forms of _ChunkSum
@pytest.mark.parametrize("pe,bias", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["-", "pe", "bias", "pe+bias"])
@pytest.mark.parametrize("name", list(CASES))
def test_chunk_path_equals_position_path(name, pe, bias, O):
    layout, stream, w, p, b = _make(CASES[name], O, pe=pe, bias=bias)
    leaves = [t for t in (stream, w, p, b) if t is not None]
    y_pos = _by_positions(layout, stream, w, p, b)
    y_chk = tc.chunk_sum(layout, stream, w, p, b)
    where = f"case {name!r} {CASES[name]}, O={O}, pe={pe}, bias={bias}, R={layout.R}, W={layout.W}"
    assert y_chk.shape == y_pos.shape == (layout.G, layout.R, O), where
    # rows that straddle two sequences are dropped by gather; compare all rows anyway (both compute them)
    torch.testing.assert_close(y_chk, y_pos, rtol=1e-12, atol=1e-12, msg=lambda m: f"forward, {where}: {m}")
    gy = torch.randn(y_pos.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    g_pos = torch.autograd.grad(y_pos, leaves, gy, allow_unused=True)
    g_chk = torch.autograd.grad(y_chk, leaves, gy, allow_unused=True)
    labels = [n for n, t in zip(("stream", "weight", "pe", "bias"), (stream, w, p, b)) if t is not None]
    for label, gc, gp in zip(labels, g_chk, g_pos):
        assert gc is not None and gp is not None, f"d {label}: no gradient, {where}"
        torch.testing.assert_close(gc, gp, rtol=1e-12, atol=1e-12, msg=lambda m, lb=label: f"d {lb}, {where}: {m}")
    # window_sum is chunk_sum here (S divides L in every case); its fallback: the next test
    torch.testing.assert_close(tc.window_sum(layout, stream, w, p, b), y_chk, rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["valid", "left"])
def test_window_sum_falls_back_to_positions(padding):
    """S does not divide L: window_sum is position_sum plus the pe and bias terms."""
    layout, stream, w, p, b = _make((2, 4, 2, 23, 3, 5, 2, padding, None), 4)
    y = tc.window_sum(layout, stream, w, p, b)
    y_pos = _by_positions(layout, stream, w, p, b)
    torch.testing.assert_close(y, y_pos, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    for label, a, e in zip(("stream", "weight", "pe", "bias"), torch.autograd.grad(y, (stream, w, p, b), gy),
                           torch.autograd.grad(y_pos, (stream, w, p, b), gy)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m, lb=label: f"d {lb}: {m}")


@pytest.mark.parametrize("pe,bias", [(False, False), (True, True)], ids=["-", "pe+bias"])
@pytest.mark.parametrize("name,O", [("packed, left", 2), ("1<G<H", 3), ("W=1", 30), ("G=1", 40)])
def test_chunk_sum_gradgradcheck(name, O, pe, bias):
    """Double backward through _ChunkSum's backward (both weight-gradient
    forms: O < R and O > R)."""
    layout, stream, w, p, b = _make(CASES[name], O, pe=pe, bias=bias)
    assert layout.R > 0
    inputs = (stream, w) if p is None else (stream, w, p, b)
    assert torch.autograd.gradcheck(lambda *a: tc.chunk_sum(layout, *a), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: tc.chunk_sum(layout, *a), inputs)


def _args(kind, *, T=20, D=3, L=4, S=2, G=2, H=4, pe=True):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, H, T, D, generator=gen)
    if kind == "linear":
        params = (torch.randn(G, L, D, 5, generator=gen), torch.randn(G, 5, generator=gen))
    else:
        params = (torch.randn(G, L * D, 7, generator=gen), torch.randn(G, 7, generator=gen),
                  torch.randn(G, 7, 5, generator=gen), torch.randn(G, 5, generator=gen))
    return x, params, torch.randn(H, L, D, generator=gen) if pe else None


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("L,S,path", [(4, 2, "chunk"), (4, 4, "chunk"), (4, 1, "chunk"), (5, 2, "position"),
                                      (6, 4, "position")])
def test_dispatch_picks_chunks_when_stride_divides_block(monkeypatch, kind, L, S, path):
    calls = []
    chunk_sum, position_sum = tc.chunk_sum, tc.position_sum
    monkeypatch.setattr(tc, "chunk_sum", lambda *a, **k: calls.append("chunk") or chunk_sum(*a, **k))
    monkeypatch.setattr(tc, "position_sum", lambda *a, **k: calls.append("position") or position_sum(*a, **k))
    x, params, pe = _args(kind, L=L, S=S)
    y = getattr(kf, kind)(x, *params, block_size=L, stride=S, padding="left", pe=pe, backend="torch")
    assert calls == [path], f"{kind} L={L} S={S}: took {calls}, expected [{path!r}]"
    if path == "chunk":   # and the answer does not depend on the path: force the position one
        monkeypatch.setattr(tc, "chunk_sum", _by_positions)
        y_pos = getattr(kf, kind)(x, *params, block_size=L, stride=S, padding="left", pe=pe, backend="torch")
        torch.testing.assert_close(y, y_pos, rtol=1e-5, atol=1e-5)
