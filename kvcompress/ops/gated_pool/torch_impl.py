"""gated_pool, vectorized torch (SPEC section 3b): every window's L tokens
gathered by one index tensor (split: each position's feature chunk picked in
the same gather), one softmax over positions per feature, weighted sum."""

import torch

from ..._windows import StreamLayout
from ...backends import register
from .._torch_common import accumulation_dtype, per_head


def window_tokens(layout: StreamLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, real), each (W, L): the token of every window position (0 at a
    pad) and whether it is a real token. From the stream layout's offsets,
    so packed sequences, left pads and malformed cu_seqlens behave exactly as
    in the other torch paths: stream offset -> token (-1: pad), then window
    w's positions are the offsets windows[w] * S + j of its (head, batch) row."""
    L, S = layout.L, layout.S
    dev = layout.dest.device
    inv = torch.full((layout.Tp + L - S,), -1, dtype=torch.int64, device=dev)   # stream offset -> token
    inv[layout.dest] = torch.arange(layout.dest.shape[0], device=dev)
    tok = inv[layout.windows[:, None] * S + torch.arange(L, device=dev)]        # [W, L]
    real = tok >= 0
    return tok.clamp(min=0), real


# no promise of batch invariance: torch's reductions over a window axis may
# pick their blocking by the tensor's shape (attention_pool's torch path makes none either)
@register("gated_pool", "torch", devices=("cpu", "cuda"))
def gated_pool(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None):
    """x, z (B, H, T, Dx) any strides, bias (G, L, D_out) or None -> (B, H, W, D_out)
    in x's dtype; arguments already validated (split: S divides L, C = L // S
    divides Dx, D_out = Dx // C; else D_out = Dx).

    Accumulates in float32 (float64 for float64 input), nothing rounded to x's
    dtype before the output (precision class ``strict``). Differentiable in
    x, z and bias through autograd, which keeps the gathered windows and the
    probabilities: (L / S) times the input, where the Triton path recomputes.
    A pad position is masked (weight exactly 0, value 0), so a NaN in token 0,
    which pads read through the clamped index, reaches no other window.
    """
    B, H, T, Dx = x.shape
    L, S = block_size, stride
    C = L // S if split else 1
    Do = Dx // C
    acc = accumulation_dtype(x.dtype)
    layout = StreamLayout(B, H, 1, T, Dx, block_size=L, stride=S, padding=padding, cu_seqlens=cu_seqlens,
                          device=x.device)
    if layout.W == 0:   # attached to every input, so each gets a zero gradient; nothing sized by L
        y = x.new_zeros((B, H, 0, Do), dtype=acc) + (x[:0].sum() + z[:0].sum()).to(acc)
        if bias is not None:
            y = y + bias[:0].sum().to(acc)
        return y.to(x.dtype)
    tok, real = window_tokens(layout)                                   # [W, L]
    chunk = torch.div(torch.arange(L, device=x.device), S, rounding_mode="floor") if split \
        else torch.zeros(L, dtype=torch.int64, device=x.device)         # [L] feature chunk of each position
    # one advanced index over (token, chunk): [B, H, W, L, Do], any strides of x and z. Cast first, then
    # gather: the gather's backward sums the windows holding a token, which must happen in float32 (cast
    # after the gather, autograd would round each window's share to x's dtype and sum them there)
    v = x.to(acc).unflatten(3, (C, Do))[:, :, tok, chunk]
    s = z.to(acc).unflatten(3, (C, Do))[:, :, tok, chunk]
    if bias is not None:
        s = s + per_head(bias.to(acc), H)[None, :, None]                # [1, H, 1, L, Do]
    pad = ~real[None, None, :, :, None]
    # masked_fill, not a product: a pad reads token 0 through the clamped index, and its value and
    # score (a NaN there included) must reach neither the output nor, through 0 * NaN, a gradient
    s = s.masked_fill(pad, float("-inf"))        # weight exactly 0; the last S positions are always real
    v = v.masked_fill(pad, 0.0)
    p = torch.softmax(s, dim=3)                  # max-shifted; NaN/inf stay in their (window, feature)
    y = (p * v).sum(3)                           # [B, H, W, Do]
    return y.to(x.dtype)
