"""linear, vectorized torch, over the token stream of StreamLayout.

When S divides L (the NSA case L = 32, S = 16): C = L / S batched matmuls
with K = S*D, one per chunk of S tokens of a window (``chunk_sum``). Else:
one batched matmul per window position, K = D (``position_sum``). Either
covers all windows, heads and sequences at once (``window_sum`` picks,
and adds the pe and bias terms)."""

from ...backends import register
from .._torch_common import setup, window_sum


@register("linear", "torch", devices=("cpu", "cuda"))
def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), weight (G, L, D, D_out), bias (G, D_out) or None
    -> (B, H, W, D_out); arguments already validated."""
    G, L, D, D_out = weight.shape
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w = weight.to(acc)
    # pe (H, L, D) added to every window and the bias: window_sum adds the per-head
    # constant flat(pe[h]) @ flat(weight[g]) + bias[g] to its product
    y = window_sum(layout, stream, w, None if pe is None else pe.to(acc), None if bias is None else bias.to(acc))
    y = layout.gather(y)                                                       # [G, Hg, B, W, D_out]
    return layout.to_bhwc(y, x.dtype)
