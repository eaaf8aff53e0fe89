"""Pieces every vectorized torch path shares.

Two ways to sum a window's tokens against per-position weights, over the
token stream of ``StreamLayout`` (kvcompress/_windows.py):

- ``position_sum``: one bmm per window position j (L of them, K = D) over
  the strided views ``stream[:, j::S]``. Any L and S; the only form for the
  scalar weights of mean_pool and weighted_pool.
- ``chunk_sum``: when S divides L, window r is C = L / S consecutive
  non-overlapping chunks of S tokens (chunks r .. r + C - 1 of the stream
  seen as (G, n / S, S*D), a plain view), so C bmm's with K = S*D do the
  work of L bmm's with K = D, on contiguous rows and with C, not L, passes
  over the output. StreamLayout's stream is already contiguous and, when S
  divides L, (R + C - 1) * S tokens long (its L - S tail is a whole number
  of chunks), so the chunk view needs no copy.

``window_sum`` (linear, mlp) runs ``chunk_sum`` whenever S divides L
(the NSA case L = 32, S = 16), otherwise ``position_sum``; either way it
adds the per-head constant flat(pe[h]) @ flat(w[g]) + bias[g] once, per
group (the weight is never repeated per head).
"""

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


def _chunks(stream: torch.Tensor, S: int) -> torch.Tensor:
    """The stream (G, n, D), n a multiple of S, as its chunks of S tokens:
    (G, n / S, S*D), a view when the stream is contiguous."""
    G, n, D = stream.shape
    return stream.reshape(G, n // S, S * D)


class _ChunkSum(torch.autograd.Function):
    """y (G, R, O) = sum_c chunks[:, c:c+R] @ w_c (+ pe[g, i] @ flat(w[g])
    + bias[g] on the rows of head i) for the stream (G, n, D) seen as chunks
    (G, n/S, S*D) and w (G, L, D, O) seen as C = L / S blocks w_c
    (G, S*D, O): flat(window r) is chunks r .. r + C - 1 side by side, so
    flat(window r) @ flat(w) splits into these C products. pe (G, Hg, L*D)
    or None: the per-head intra-block positions, the same for every window;
    bias (G, O) or None.

    Needs S | L and n = (R + C - 1) * S (StreamLayout's stream: R window
    rows of S tokens plus its L - S zero tail), or n = 0 (no window); the
    R rows are Hg blocks of R / Hg, one per head of the group.
    Backward, same structure: d chunks[r + c] += dy[r] @ w_c^T (one product
    dy @ flat(w)^T, then the C shifted adds as one fold) and d w_c = chunks[:, c:c+R]^T @ dy
    (C products, concatenated), or, when there are fewer window rows R than
    outputs O (mlp: O = F), one product with the windows unfolded, which
    copies less. The per-head constant is added once, in place, to the
    product (no pass of its own over y); pe rides along in the backward
    products as Hg extra rows (dy summed over its head's rows), so it costs
    no weight-sized outer product or gradient sum of its own. Every backward
    op is out of place and differentiable, so double backward works
    (gradgradcheck).
    """

    @staticmethod
    def forward(ctx, stream, w, pe, bias, S, R, Hg):
        ctx.S, ctx.R, ctx.Hg = S, R, Hg
        ctx.save_for_backward(stream, w, pe)
        G, L, D, O = w.shape
        C = L // S
        chunks = _chunks(stream, S)                               # [G, n / S, S*D]
        wc = w.reshape(G, C, S * D, O)                            # [G, C, S*D, O]
        y = torch.bmm(chunks[:, :R], wc[:, 0])                    # [G, R, O]
        for c in range(1, C):
            y.baddbmm_(chunks[:, c: c + R], wc[:, c])            # accumulates in y's dtype (the accumulation dtype)
        const = _head_constant(w, pe, bias)                       # [G, Hg or 1, O]
        if const is not None and R > 0:
            y.view(G, const.shape[1], R // const.shape[1], O).add_(const[:, :, None])  # R // ..., not -1: O may be 0
        return y

    @staticmethod
    def backward(ctx, gy):
        stream, w, pe = ctx.saved_tensors
        S, R, Hg = ctx.S, ctx.R, ctx.Hg
        G, L, D, O = w.shape
        n, C = stream.shape[1], L // S
        g_stream = g_w = g_pe = g_bias = None
        gy_pe = gy
        if pe is not None or ctx.needs_input_grad[3]:
            g_head = gy.view(G, Hg, R // Hg, O).sum(2)                                  # [G, Hg, O]
            if ctx.needs_input_grad[3]:
                g_bias = g_head.sum(1)                                                    # [G, O]
            if pe is not None:   # pe's rows of the products
                gy_pe = torch.cat([gy, g_head], 1)                                        # [G, R + Hg, O]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            # one product for all C blocks: part[:, r, c] is the gradient of
            # window r's chunk c, which is stream chunk r + c
            part = torch.bmm(gy_pe, w.reshape(G, L * D, O).mT).view(G, gy_pe.shape[1], C, S * D)   # [G, R (+Hg), C, SD]
            if ctx.needs_input_grad[0] and R == 0:
                g_stream = gy.new_zeros(G, n, D)
            elif ctx.needs_input_grad[0]:
                # the C shifted adds in one op: the window gradients folded back onto the stream, i.e. the
                # backward of stream.unfold(1, L, S), which is itself differentiable (grad.unfold)
                g_windows = part[:, :R].reshape(G, R, L, D).transpose(2, 3)                # [G, R, D, L]
                g_stream = torch.ops.aten.unfold_backward(g_windows, [G, n, D], 1, L, S)    # [G, n, D]
            if ctx.needs_input_grad[2]:
                g_pe = part[:, R:].reshape(G, Hg, L * D)                                   # [G, Hg, L*D]
        if ctx.needs_input_grad[1]:
            if 0 < R < O:   # the unfolded windows (R x L*D) are smaller than the C blocks' concatenation (L*D x O)
                windows = stream.unfold(1, L, S)[:, :R].transpose(2, 3).reshape(G, R, L * D)   # [G, R, L*D]
                if pe is not None:
                    windows = torch.cat([windows, pe], 1)                                       # [G, R + Hg, L*D]
                g_w = torch.bmm(windows.mT, gy_pe)                                              # [G, L*D, O]
            else:
                chunks = _chunks(stream, S)
                g_w = torch.cat([torch.bmm(chunks[:, c: c + R].mT, gy) for c in range(C)], 1)   # [G, L*D, O]
                if pe is not None:
                    g_w = torch.baddbmm(g_w, pe.mT, gy_pe[:, R:])
            g_w = g_w.view(G, L, D, O)
        return g_stream, g_w, g_pe, g_bias, None, None, None


def _head_constant(w: torch.Tensor, pe: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """What every window row of a head gets added: flat(pe[g, i]) @ flat(w[g])
    + bias[g], (G, Hg, O) ((G, 1, O) for the bias alone; None for neither),
    for w (G, L, D, O), pe (G, Hg, L*D) or None, bias (G, O) or None. Per
    group, so w is never repeated per head."""
    G, L, D, O = w.shape
    const = None if pe is None else torch.bmm(pe, w.reshape(G, L * D, O))    # [G, Hg, O]
    if bias is not None:
        const = bias[:, None] if const is None else const + bias[:, None]
    return const


def _grouped_pe(layout: StreamLayout, pe: torch.Tensor | None) -> torch.Tensor | None:
    """pe (H, L, D) -> (G, Hg, L*D): head h = g * Hg + i uses group g."""
    return None if pe is None else pe.reshape(layout.G, layout.Hg, -1)


def chunk_sum(layout: StreamLayout, stream: torch.Tensor, w: torch.Tensor,
              pe: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """window_sum when S divides L (see _ChunkSum): w (G, L, D, O), pe
    (H, L, D) or None, bias (G, O) or None, all in the stream's dtype ->
    (G, R, O)."""
    return _ChunkSum.apply(stream, w, _grouped_pe(layout, pe), bias, layout.S, layout.R, layout.Hg)


def window_sum(layout: StreamLayout, stream: torch.Tensor, w: torch.Tensor,
               pe: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j (stream[:, j::S][:R] + pe[h, j]) @ w[:, j] + bias[g] for w
    (G, L, D, O), pe (H, L, D) or None (added to the rows of head h), bias
    (G, O) or None, all in the stream's dtype: (G, R, O). By chunk_sum when
    S divides L, else by position_sum plus the per-head constant
    flat(pe[h]) @ flat(w[g]) + bias[g]."""
    if w.shape[1] % layout.S == 0:
        return chunk_sum(layout, stream, w, pe, bias)
    y = position_sum(layout, stream, w)                                        # [G, R, O]
    const = _head_constant(w, _grouped_pe(layout, pe), bias)                   # [G, Hg or 1, O]
    if const is None or layout.R == 0:
        return y
    G, O = y.shape[0], y.shape[2]
    return (y.view(G, const.shape[1], layout.R // const.shape[1], O) + const[:, :, None]).view(G, layout.R, O)
