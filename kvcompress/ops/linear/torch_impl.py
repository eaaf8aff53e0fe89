"""linear, vectorized torch: one batched matmul per window position over all
windows, heads and sequences (strided views of the token stream)."""

import torch

from ...backends import register
from .._torch_common import per_head, position_sum, setup


@register("linear", "torch", devices=("cpu", "cuda"))
def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), weight (G, L, D, D_out), bias (G, D_out) or None
    -> (B, H, W, D_out); arguments already validated."""
    G, L = weight.shape[:2]
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w = weight.to(acc)
    y = layout.gather(position_sum(layout, stream, w))           # [G, Hg, B, W, D_out]
    H = x.shape[1]
    if pe is not None:
        # sum_j pe[h, j] @ weight[g, j] is the same for every window of head h
        y = y + layout.per_head(torch.einsum("hjd,hjdo->ho", pe.to(acc), per_head(w, H)))
    if bias is not None:
        y = y + bias.to(acc)[:, None, None, None, :]
    return layout.to_bhwc(y, x.dtype)
