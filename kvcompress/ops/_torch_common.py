"""Pieces every vectorized torch path shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._windows import StreamLayout


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """SPEC section 3: accumulate in float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def setup(x: torch.Tensor, G: int, *, block_size: int, stride: int, padding: str, cu_seqlens):
    """The stream layout and the stream itself (one compact copy of x in the
    accumulation dtype), plus that dtype."""
    B, H, T, D = x.shape
    acc = accumulation_dtype(x.dtype)
    layout = StreamLayout(B, H, G, T, D, block_size=block_size, stride=stride, padding=padding,
                          cu_seqlens=cu_seqlens, device=x.device)
    return layout, layout.to_stream(x, acc), acc


def per_head(w: torch.Tensor, H: int) -> torch.Tensor:
    """(G, ...) group weights -> (H, ...) head weights: head h uses group h // (H // G)."""
    return w.repeat_interleave(H // w.shape[0], dim=0)


def _positions(stream: torch.Tensor, S: int, R: int, L: int):
    """The L strided views stream[:, j::S][:, :R], each (G, R, D)."""
    return [stream[:, j: j + R * S: S] for j in range(L)]


def _contract(pos: torch.Tensor, w_j: torch.Tensor) -> torch.Tensor:
    """One window position's share: (G, R, D) by w_j (G, D, O) or (G,)."""
    return torch.bmm(pos, w_j) if w_j.dim() == 3 else w_j[:, None, None] * pos


class _PositionSum(torch.autograd.Function):
    """y (G, R, O) = sum_j stream[:, j::S][:R] @ w[:, j] for w (G, L, D, O),
    or sum_j w[:, j] * stream[:, j::S][:R] for w (G, L).

    Autograd through the L strided views would give each view its own
    backward that zero-fills a whole stream-sized gradient and adds it: L
    full passes over the stream. This backward assembles the stream gradient
    by phase instead: stream token r*S + p receives position j = p + k*S of
    window r - k, so phase p is a sum of C = ceil(L/S) shifted (G, R, D)
    terms, and the S phases interleave into the stream. Every op is out of
    place and differentiable, so double backward works (gradgradcheck).
    """

    @staticmethod
    def forward(ctx, stream, w, S, R):
        ctx.S, ctx.R = S, R
        ctx.save_for_backward(stream, w)
        y = None
        for j, pos in enumerate(_positions(stream, S, R, w.shape[1])):
            t = _contract(pos, w[:, j])
            y = t if y is None else y + t
        return y

    @staticmethod
    def backward(ctx, gy):
        stream, w = ctx.saved_tensors
        S, R, L = ctx.S, ctx.R, w.shape[1]
        g_stream = g_w = None
        if ctx.needs_input_grad[0]:
            G, n, D = stream.shape
            C = -(-L // S)
            phases = []
            for p in range(S):
                acc = gy.new_zeros(G, R + C - 1, D)
                for k in range(C):
                    if p + k * S < L:
                        t = _contract(gy, w[:, p + k * S].mT if w.dim() == 4 else w[:, p + k * S])  # [G, R, D]
                        acc = acc + F.pad(t, (0, 0, k, C - 1 - k))   # window r - k -> row r
                phases.append(acc)
            g_stream = torch.stack(phases, 2).reshape(G, (R + C - 1) * S, D)[:, :n]   # (R+C-1)*S >= n
        if ctx.needs_input_grad[1]:
            pos = _positions(stream, S, R, L)
            if w.dim() == 4:
                g_w = torch.stack([torch.bmm(p.mT, gy) for p in pos], 1)          # [G, L, D, O]
            else:
                g_w = torch.stack([(p * gy).sum((1, 2)) for p in pos], 1)         # [G, L]
        return g_stream, g_w, None, None


def position_sum(layout: StreamLayout, stream: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Every window position's contribution, summed: (G, R, O) (see _PositionSum)."""
    return _PositionSum.apply(stream, w, layout.S, layout.R)
