"""Window sums by chunk for the pooling kinds of the vectorized torch path
(attention_pool, weighted_pool; issue 14, item 4).

StreamLayout's stream (kvcompress/_windows.py) puts window r at stream row
r*S, so window positions [c*S, c*S + S_c) of *every* window are the strided
view ``chunk(t, c)`` (G, R, S_c, D) of the stream (or of any tensor laid
out like it): rows r*S + c*S .. + S_c, one contiguous block of S_c*D per
window. C = ceil(L / S) such views cover all L positions (S_c = S, the last
one L - (C-1)*S), so a window-wise op costs C ops over stream-sized views
instead of L ops over (G, R, D) ones, and the stream gradient is assembled
by C in-place adds into the same views (no zero-filled stream-sized tensor
per position, which is what autograd through L strided views costs).

Both Functions here have a fast backward built from in-place ops and, when
a double backward is asked for (``create_graph``, so grad mode is on inside
backward), differentiate an out-of-place recomputation of the forward
instead (gradgradcheck works; its speed does not matter).

Sums over positions are taken in the stream's dtype (the accumulation
dtype: float32, float64 for float64 input): the ``strict`` precision class.
"""

from __future__ import annotations

import torch

from .._windows import StreamLayout

__all__ = ["attention_pool_sum", "chunk", "weighted_pool_sum"]


def chunk(t: torch.Tensor, c: int, *, R: int, S: int, L: int) -> torch.Tensor:
    """Window positions [c*S, c*S + S_c) of windows 0..R-1 of t (G, n, D),
    laid out like the stream (contiguous rows): a view (G, R, S_c, D),
    S_c = min(S, L - c*S). Needs n >= (R - 1)*S + L (the stream's L - S
    tail makes it so)."""
    G, n, D = t.shape
    assert t.stride(2) == 1 and t.stride(1) == D and n >= (R - 1) * S + L, "chunk: not a stream"
    Sc = min(S, L - c * S)
    # unfold of a slice, not as_strided with the storage offset: torch.compile cannot trace storage_offset()
    return t[:, c * S: c * S + (R - 1) * S + Sc].unfold(1, Sc, S).transpose(2, 3)


def _num_chunks(L: int, S: int) -> int:
    return -(-L // S)


# ----------------------------------------------------------------------------- weighted_pool


def _weighted_forward(stream, w, S, R):
    """y (G, R, D) = sum_j w[:, j] * stream[:, j::S][:R], out of place.

    CPU: one batched matrix-vector product per chunk (K = S_c). CUDA: one
    elementwise multiply-add per position j, in order: cuBLAS picks its
    kernel, and with it the order of a window's sum over positions, by the
    number of windows R, so the matmul form is not batch-invariant there
    (bfloat16, 64 streams at the NSA shape: one element of the decode step
    differed from the full pass by one ulp, H200 run 47); elementwise ops
    round each window alike whatever R is."""
    G, L = w.shape
    y = None
    for c in range(_num_chunks(L, S)):
        xc = chunk(stream, c, R=R, S=S, L=L)                                  # [G, R, Sc, D]
        wc = w[:, c * S: c * S + xc.shape[2]]                                 # [G, Sc]
        if stream.is_cuda:
            for j in range(xc.shape[2]):
                t = wc[:, j, None, None] * xc[:, :, j]                        # [G, R, D]
                y = t if y is None else y + t
            continue
        t = torch.matmul(wc[:, None, None, :], xc).squeeze(2)                 # [G, R, D]
        y = t if y is None else y + t
    return y


class _WeightedPool(torch.autograd.Function):
    """y (G, R, D) = sum_j w[:, j] * stream[:, j::S][:R] for stream
    (G, n, D) and w (G, L).

    Backward: the stream gradient is C in-place multiply-adds of gy (times
    w's chunk c, broadcast over S_c) into ``chunk(g_stream, c)``; w's
    gradient is, per chunk, a batched matrix-vector product of the chunk
    with gy summed over windows.
    """

    @staticmethod
    def forward(ctx, stream, w, S, R):
        ctx.S, ctx.R = S, R
        ctx.save_for_backward(stream, w)
        return _weighted_forward(stream, w, S, R)

    @staticmethod
    def backward(ctx, gy):
        stream, w = ctx.saved_tensors
        S, R = ctx.S, ctx.R
        if torch.is_grad_enabled():   # double backward: differentiate the out-of-place forward
            return (*_regrad(lambda s, w_: _weighted_forward(s, w_, S, R), (stream, w), ctx.needs_input_grad, gy),
                    None, None)
        G, L = w.shape
        g_stream = g_w = None
        if ctx.needs_input_grad[0]:
            g_stream = torch.zeros_like(stream)
            for c in range(_num_chunks(L, S)):
                gc = chunk(g_stream, c, R=R, S=S, L=L)                          # [G, R, Sc, D]
                gc.addcmul_(gy[:, :, None, :], w[:, c * S: c * S + gc.shape[2], None][:, None])
        if ctx.needs_input_grad[1]:
            parts = []
            for c in range(_num_chunks(L, S)):
                xc = chunk(stream, c, R=R, S=S, L=L)                            # [G, R, Sc, D]
                parts.append(torch.matmul(xc, gy[..., None]).sum(1)[..., 0])   # [G, Sc]
            g_w = torch.cat(parts, 1)                                           # [G, L]
        return g_stream, g_w, None, None


def weighted_pool_sum(layout: StreamLayout, stream: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w[g, j] * stream[:, j::S][:R] for w (G, L) in the stream's
    dtype: (G, R, D) (see _WeightedPool)."""
    return _WeightedPool.apply(stream, w, layout.S, layout.R)


# ----------------------------------------------------------------------------- attention_pool


def _attention_forward(stream, w, pe, S, R, Hg, L, *, inplace):
    """The attention pool of every window row: y and lse, both
    (G, Hg, R / Hg, D), and Z = stream @ w (G, n, D).

    stream (G, n, D), w (G, D, D), pe (G, Hg, L, D) or None. The logit of
    window r, position j is Z[r*S + j] + (pe[g, i, j] @ w[g]) for head i:
    a per-token product (one GEMM over the stream, not L/S copies) plus a
    per-head (L, D) constant. Softmax over the L positions shifted by its
    maximum (NaN and inf stay in their window and feature, as torch.softmax
    keeps them); lse is the log of its denominator plus the shift.
    ``inplace`` reuses temporaries (no autograd); otherwise every op is out
    of place and differentiable.
    """
    G, n, D = stream.shape
    RB = R // Hg                                                   # window rows per head
    Z = torch.bmm(stream, w)                                       # [G, n, D]
    zpe = None if pe is None else torch.matmul(pe, w[:, None])     # [G, Hg, L, D]
    logits, values, m = [], [], None
    for c in range(_num_chunks(L, S)):
        zc = chunk(Z, c, R=R, S=S, L=L)
        Sc = zc.shape[2]
        lc = zc.view(G, Hg, RB, Sc, D)                             # [G, Hg, RB, Sc, D]
        vc = chunk(stream, c, R=R, S=S, L=L).view(G, Hg, RB, Sc, D)
        if pe is not None:
            lc = lc + zpe[:, :, None, c * S: c * S + Sc]
            vc = vc + pe[:, :, None, c * S: c * S + Sc]
        mc = lc.amax(3)                                            # [G, Hg, RB, D]
        m = mc if m is None else torch.maximum(m, mc)
        logits.append(lc)
        values.append(vc)
    den, exps = None, []
    for lc in logits:
        e = torch.sub(lc, m[:, :, :, None])
        e = e.exp_() if inplace else e.exp()                       # [G, Hg, RB, Sc, D]
        s = e.sum(3)
        den = s if den is None else (den.add_(s) if inplace else den + s)
        exps.append(e)
    # normalised before the values are weighted: sum_j p_j v_j stays within max |v| (an unnormalised
    # sum could overflow near float32's largest value, where the promise still holds)
    y = None
    for e, vc in zip(exps, values):
        pv = e.div_(den[:, :, :, None]).mul_(vc) if inplace else e / den[:, :, :, None] * vc
        s = pv.sum(3)
        y = s if y is None else (y.add_(s) if inplace else y + s)  # [G, Hg, RB, D]
    lse = den.log_().add_(m) if inplace else den.log() + m
    return y, lse, Z


class _AttentionPool(torch.autograd.Function):
    """y (G, R, D): for every window row and feature, sum_j p_j v_j with
    p = softmax_j(Z[r*S + j] + zpe_j), v_j = stream[r*S + j] + pe_j (see
    _attention_forward), for stream (G, n, D), w (G, D, D), pe
    (G, Hg, L, D) or None.

    Saves Z (one stream-sized tensor) and y, lse (R rows each), not the
    L probabilities per window and feature: the backward recomputes them
    chunk by chunk, p = exp(logit - lse), and forms dv = p * gy and
    dz = dv * (v - y) (the softmax's Jacobian), added in place into the
    per-token gradients dV, dZ through ``chunk`` (C adds, not L
    zero-filled stream-sized ones). Then g_stream = dV + dZ @ w^T and
    g_w = stream^T @ dZ (+ pe's share), two GEMMs over the stream.
    """

    @staticmethod
    def forward(ctx, stream, w, pe, S, R, Hg, L, keep):
        ctx.S, ctx.R, ctx.Hg, ctx.L = S, R, Hg, L
        y, lse, Z = _attention_forward(stream, w, pe, S, R, Hg, L, inplace=True)
        ctx.save_for_backward(stream, w, pe, Z, lse, y, keep)
        return y.view(stream.shape[0], R, stream.shape[2])

    @staticmethod
    def backward(ctx, gy):
        stream, w, pe, Z, lse, y, keep = ctx.saved_tensors
        S, R, Hg, L = ctx.S, ctx.R, ctx.Hg, ctx.L
        if torch.is_grad_enabled():   # double backward: differentiate the out-of-place forward
            def f(s, w_, pe_):
                return _attention_forward(s, w_, pe_, S, R, Hg, L, inplace=False)[0].reshape(gy.shape)
            return (*_regrad(f, (stream, w, pe), ctx.needs_input_grad, gy), None, None, None, None, None)
        G, n, D = stream.shape
        RB = R // Hg
        gy = gy.view(G, Hg, RB, D)
        # windows that are computed but not returned get gy = 0, yet a NaN among their tokens (one of
        # another row's or sequence's, or a trailing one in no window) makes their p and y NaN, and
        # 0 * NaN would reach tokens of returned windows: their terms are masked (keep is None when
        # every row is a returned window). Always, not only when y has a NaN: that test would read
        # the device (a host synchronisation per backward on a GPU)
        zpe = None if pe is None else torch.matmul(pe, w[:, None])    # [G, Hg, L, D]
        dZ = torch.zeros_like(Z)
        dV = torch.zeros_like(stream)
        sdz, sdv = [], []                                              # per chunk (G, Hg, Sc, D): pe's gradient
        for c in range(_num_chunks(L, S)):
            zc = chunk(Z, c, R=R, S=S, L=L)
            Sc = zc.shape[2]
            p = torch.sub(zc.view(G, Hg, RB, Sc, D), lse[:, :, :, None])
            if pe is not None:
                p.add_(zpe[:, :, None, c * S: c * S + Sc])
            p.exp_()                                                   # [G, Hg, RB, Sc, D]
            dv = p.mul_(gy[:, :, :, None])                             # p * gy
            t = torch.sub(chunk(stream, c, R=R, S=S, L=L).view(G, Hg, RB, Sc, D), y[:, :, :, None])
            if pe is not None:
                t.add_(pe[:, :, None, c * S: c * S + Sc])
            dz = t.mul_(dv)                                            # p * gy * (v - y)
            if keep is not None:
                dv = torch.where(keep.view(1, 1, RB, 1, 1), dv, 0)
                dz = torch.where(keep.view(1, 1, RB, 1, 1), dz, 0)
            chunk(dZ, c, R=R, S=S, L=L).view(G, Hg, RB, Sc, D).add_(dz)
            chunk(dV, c, R=R, S=S, L=L).view(G, Hg, RB, Sc, D).add_(dv)
            if pe is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
                sdz.append(dz.sum(2))
                sdv.append(dv.sum(2))
        g_stream = g_w = g_pe = None
        if ctx.needs_input_grad[0]:
            g_stream = torch.baddbmm(dV, dZ, w.mT)                     # [G, n, D]
        if sdz:
            sdz = torch.cat(sdz, 2)                                    # [G, Hg, L, D]
        if ctx.needs_input_grad[1]:
            g_w = torch.bmm(stream.mT, dZ)                             # [G, D, D]
            if pe is not None:
                g_w = g_w.baddbmm_(pe.reshape(G, Hg * L, D).mT, sdz.reshape(G, Hg * L, D))
        if ctx.needs_input_grad[2]:
            g_pe = torch.cat(sdv, 2).add_(torch.matmul(sdz, w.mT[:, None]))   # [G, Hg, L, D]
        return g_stream, g_w, g_pe, None, None, None, None, None


def attention_pool_sum(layout: StreamLayout, stream: torch.Tensor, w: torch.Tensor,
                       pe: torch.Tensor | None) -> torch.Tensor:
    """The attention pool of every window row (see _AttentionPool): stream
    (G, n, D), w (G, D, D), pe (H, L, D) or None, all in the stream's
    dtype -> (G, R, D)."""
    G, Hg, L = layout.G, layout.Hg, layout.L
    pe = None if pe is None else pe.view(G, Hg, L, pe.shape[-1])
    keep = None                                                    # every row a returned window
    if layout.windows.numel() != layout.Np:
        keep = torch.zeros(layout.Np, dtype=torch.bool, device=stream.device)
        # rows that are real windows; index_fill_ takes the value as a kernel argument (an index
        # assignment of a Python scalar copies it from the host: not capturable in a CUDA graph)
        keep.index_fill_(0, layout.windows, True)
        keep = keep.repeat(layout.B)                               # [B * Np]
    return _AttentionPool.apply(stream, w, pe, layout.S, layout.R, Hg, L, keep)


def _regrad(f, inputs, needs, gy):
    """Gradients of f(*inputs) against gy, by autograd through f, with a
    graph (for a double backward): one entry per input, None where not
    needed."""
    want = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    with torch.enable_grad():
        y = f(*inputs)
        grads = torch.autograd.grad(y, [inputs[i] for i in want], gy, create_graph=True, allow_unused=True)
    out = [None] * len(inputs)
    for i, g in zip(want, grads):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g
    return out
