"""The chunk Functions of the vectorized torch path for attention_pool and
weighted_pool (kvcompress/ops/_torch_windows.py, issue 14 item 4) equal the
previous formulation, plain autograd through the L strided views of the
token stream (kept here as the reference), forward and every gradient
(x, weight, pe), in float64; their backward is itself differentiable
(gradgradcheck); a NaN token stays in its windows (docs/semantics.md).

Values against the loop reference and the tolerance model are the property
suite's job (kvcompress/testing/properties); this file pins the new
Functions to the old formulation on the layouts that make the stream
tricky: left padding, packed sequences, groups, several batch rows, T not a
multiple of S, S not dividing L, no window and one window.
"""

from __future__ import annotations

import pytest
import torch

import kvcompress.functional as kf
from kvcompress._windows import StreamLayout
from kvcompress.ops import _torch_common as tc
from kvcompress.ops import _torch_windows as tw
from tests.test_torch_chunks import CASES as CHUNK_CASES

F64 = torch.float64

# (B, H, G, T, D, L, S, padding, cu_seqlens): test_torch_chunks' layouts (S divides L), and S that does not
CASES = {**CHUNK_CASES,
         "S does not divide L": (2, 2, 1, 26, 3, 7, 3, "left", None),
         "S does not divide L, valid": (1, 4, 2, 25, 2, 5, 2, "valid", None),
         "S=1": (1, 2, 1, 12, 2, 3, 1, "left", None)}
KINDS = ("attention_pool", "weighted_pool")


def _make(kind, case, *, pe=True, seed=0):
    """Leaf x (B, H, T, D), weight (attention_pool (G, D, D), weighted_pool
    (G, L)), pe (H, L, D) or None, float64, and the window kwargs."""
    B, H, G, T, D, L, S, padding, cu = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=gen, dtype=F64).requires_grad_()
    if kind == "attention_pool":
        w = (torch.eye(D, dtype=F64) + torch.randn(G, D, D, generator=gen, dtype=F64)).requires_grad_()
    else:
        w = torch.randn(G, L, generator=gen, dtype=F64).requires_grad_()
    p = torch.randn(H, L, D, generator=gen, dtype=F64).requires_grad_() if pe else None
    kw = dict(block_size=L, stride=S, padding=padding, cu_seqlens=None if cu is None else torch.tensor(cu))
    return x, w, p, kw


def _old(kind, x, weight, *, block_size, stride, padding, pe=None, cu_seqlens=None):
    """The previous formulation: the L strided views of the stream, plain
    autograd (attention_pool: stacked logits, torch.softmax over positions;
    weighted_pool: one multiply-add per position). (B, H, W, D)."""
    G, L = weight.shape[0], block_size
    B, H, T, D = x.shape
    layout = StreamLayout(B, H, G, T, D, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                          device=x.device)
    stream = layout.to_stream(x, F64)
    Hg, R = layout.Hg, layout.R
    views = [layout.position(stream, j).view(G, Hg, -1, D) for j in range(L)]            # [G, Hg, RB, D] each
    if kind == "attention_pool":
        vals = [v if pe is None else v + pe.view(G, Hg, 1, L, D)[:, :, :, j] for j, v in enumerate(views)]
        logits = torch.stack([torch.matmul(v, weight[:, None]) for v in vals])           # [L, G, Hg, RB, D]
        p = torch.softmax(logits, dim=0)
        y = sum(p[j] * vals[j] for j in range(L))
    else:
        y = sum(weight[:, j, None, None, None] * v for j, v in enumerate(views))
        if pe is not None:
            y = y + (tc.per_head(weight, H)[:, :, None] * pe).sum(1).view(G, Hg, 1, D)
    y = layout.gather(y.reshape(G, R, D))
    return layout.to_bhwc(y, x.dtype)


def _new(kind, x, weight, **kw):
    return getattr(kf, kind)(x, weight, **kw, backend="torch")


@pytest.mark.parametrize("pe", [False, True], ids=["-", "pe"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_new_equals_old(kind, name, pe):
    x, w, p, kw = _make(kind, CASES[name], pe=pe)
    leaves = [t for t in (x, w, p) if t is not None]
    y_old = _old(kind, x, w, pe=p, **kw)
    y_new = _new(kind, x, w, pe=p, **kw)
    where = f"{kind}, case {name!r} {CASES[name]}, pe={pe}"
    assert y_new.shape == y_old.shape, where
    torch.testing.assert_close(y_new, y_old, rtol=1e-12, atol=1e-12, msg=lambda m: f"forward, {where}: {m}")
    gy = torch.randn(y_old.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    g_old = torch.autograd.grad(y_old, leaves, gy, allow_unused=True)
    g_new = torch.autograd.grad(y_new, leaves, gy, allow_unused=True)
    for name_, a, b in zip(["x", "weight", "pe"], g_new, g_old):
        assert a is not None, f"no gradient reaches {name_} (every input stays attached), {where}"
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m, n=name_: f"d{n}, {where}: {m}")


@pytest.mark.parametrize("name", ["packed, left", "B>1, T%S!=0", "S does not divide L", "1<G<H", "W=0"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradgradcheck(kind, name):
    x, w, p, kw = _make(kind, CASES[name], pe=True)
    # small values keep the softmax away from saturation, where finite differences lose digits
    x, w, p = (t.detach().mul(0.5).requires_grad_() for t in (x, w, p))

    def f(x, w, p):
        return _new(kind, x, w, pe=p, **kw)
    assert torch.autograd.gradcheck(f, (x, w, p))
    assert torch.autograd.gradgradcheck(f, (x, w, p))


@pytest.mark.parametrize("name", ["left", "packed, left", "B>1, T%S!=0", "S does not divide L", "valid"])
@pytest.mark.parametrize("kind", KINDS)
def test_nan_token_stays_in_its_windows(kind, name):
    """A NaN token makes exactly the outputs of its windows NaN (every
    feature), forward; the gradient of x is NaN only on the tokens of those
    windows (a window computed but not returned, which may straddle two
    rows or sequences, does not leak it)."""
    x, w, p, kw = _make(kind, CASES[name], pe=True)
    B, H, G, T, D, L, S, padding, cu = CASES[name]
    clean = _new(kind, x.detach(), w.detach(), pe=p.detach(), **kw)
    for t in (0, T // 2, T - 1):            # a first, a middle and a last token (of a row or a sequence)
        x2 = x.detach().clone()
        x2[0, 0, t] = float("nan")
        x2.requires_grad_()
        y = _new(kind, x2, w.detach(), pe=p.detach(), **kw)
        # which outputs read token t: the same call with a 1 there and 0 elsewhere through mean-free windows
        probe = torch.zeros_like(x2.detach())
        probe[0, 0, t] = 1.0
        hit = kf.weighted_pool(probe, torch.ones(1, L, dtype=F64), **kw, backend="torch") != 0   # [B, H, W, D]
        hit = hit.any(-1, keepdim=True).expand_as(y)
        assert torch.isnan(y[hit]).all(), f"{kind} {name} token {t}: a window holding the NaN token is not NaN"
        torch.testing.assert_close(y[~hit], clean[~hit], rtol=0, atol=0)
        gx, = torch.autograd.grad(y, x2, torch.ones_like(y))
        # the tokens of the NaN token's windows: those a sum over the hit windows reads
        ones = torch.zeros_like(x2.detach()).requires_grad_()
        near, = torch.autograd.grad(kf.weighted_pool(ones, torch.ones(1, L, dtype=F64), **kw, backend="torch"),
                                    ones, hit.to(F64))
        assert not torch.isnan(gx[near == 0]).any(), f"{kind} {name} token {t}: NaN leaked into other windows' tokens"


def test_chunk_views():
    """chunk(t, c) is window positions [c*S, c*S + S_c) of every window."""
    layout = StreamLayout(2, 2, 1, 13, 3, block_size=7, stride=3, padding="left", cu_seqlens=None,
                          device=torch.device("cpu"))
    stream = layout.to_stream(torch.randn(2, 2, 13, 3, dtype=F64), F64)
    for c in range(3):
        v = tw.chunk(stream, c, R=layout.R, S=3, L=7)
        for s in range(v.shape[2]):
            assert torch.equal(v[:, :, s], layout.position(stream, 3 * c + s))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["mean_pool", "weighted_pool"])
def test_batch_invariant_on_cuda_at_the_nsa_shape(kind):
    """The torch pools promise batch invariance (kvcompress.backends): on
    CUDA, bfloat16, at the NSA shape with 64 sequences, a sequence's windows
    computed alone, and its last window computed as one batch row of one
    window (what a decode step hands the backend), equal its windows among
    the others bit for bit. The decode benchmark's gate found weighted_pool's
    cuBLAS matrix-vector form breaking this (H200 run 47)."""
    B, H, T, D, L, S = 64, 4, 4096, 128, 32, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, H, T, D, device="cuda", generator=g).to(torch.bfloat16)
    params = [] if kind == "mean_pool" else [(torch.randn(H, L, device="cuda", generator=g) / L).to(torch.bfloat16)]
    f = getattr(kf, kind)
    y = f(x, *params, block_size=L, stride=S, padding="left", backend="torch")            # [B, H, W, D]
    for k in (0, 22, 63):
        alone = f(x[k:k + 1], *params, block_size=L, stride=S, padding="left", backend="torch")
        assert torch.equal(alone[0], y[k]), f"sequence {k} alone differs from the batch"
    last = f(x[:, :, T - L:], *params, block_size=L, stride=S, padding="valid", backend="torch")   # [B, H, 1, D]
    assert torch.equal(last[:, :, 0], y[:, :, -1]), "one window per row differs from the full pass's last window"
