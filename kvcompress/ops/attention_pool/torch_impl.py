"""attention_pool, vectorized torch: logits per window position by batched
matmul on strided views, one softmax over positions, weighted sum."""

import torch

from ...backends import register
from .._torch_common import setup


@register("attention_pool", "torch", devices=("cpu", "cuda"))
def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), weight (G, D, D) -> (B, H, W, D); arguments already validated.

    Autograd keeps the softmax probabilities, L values per window and
    feature: inherent to the math, but it is the one place where this path
    stores L/S times the input. The Triton path recomputes them instead.
    """
    G, D = weight.shape[:2]
    L = block_size
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w = weight.to(acc)
    Hg, B, Np = layout.Hg, layout.B, layout.Np
    pe_ = pe.to(acc).view(G, Hg, 1, L, D) if pe is not None else None

    def values(j):  # window position j of every window, pe included: [G, Hg, B*Np, D]
        v = layout.position(stream, j).view(G, Hg, B * Np, D)
        return v if pe_ is None else v + pe_[:, :, :, j]

    def logits(j):  # values(j) @ weight[g], with pe's share as a per-head constant
        z = torch.bmm(layout.position(stream, j), w).view(G, Hg, B * Np, D)
        return z if pe_ is None else z + torch.matmul(pe_[:, :, :, j], w[:, None])

    logits = torch.stack([logits(j) for j in range(L)])  # [L, G, Hg, B*Np, D]
    p = torch.softmax(logits, dim=0)      # max-shifted; NaN/inf stay in their column
    y = 0
    for j in range(L):
        y = y + p[j] * values(j)          # [G, Hg, B*Np, D]
    y = layout.gather(y.view(G, Hg * B * Np, D))
    return layout.to_bhwc(y, x.dtype)
