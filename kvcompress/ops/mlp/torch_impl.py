"""mlp, vectorized torch: the first layer is a per-position batched matmul
like ``linear``; the hidden layer exists only for the real windows."""

import torch
import torch.nn.functional as F

from ...backends import register
from .._torch_common import per_head, position_sum, setup

_ACT = {"relu": F.relu, "gelu": lambda z: F.gelu(z, approximate="none"), "silu": F.silu}


@register("mlp", "torch", devices=("cpu", "cuda"))
def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), w1 (G, L*D, F), b1 (G, F) or None, w2 (G, F, D_out),
    b2 (G, D_out) or None -> (B, H, W, D_out); arguments already validated."""
    G, LD, Fh = w1.shape
    L, D = block_size, x.shape[3]
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w1_ = w1.to(acc).view(G, L, D, Fh)
    pre = layout.gather(position_sum(layout, stream, w1_))           # [G, Hg, B, W, F]
    if pe is not None:
        # flat(pe[h]) @ w1[g] is the same for every window of head h
        w1_heads = per_head(w1_.flatten(1, 2), x.shape[1])                # [H, L*D, F]
        pre = pre + layout.per_head(torch.einsum("hk,hkf->hf", pe.to(acc).flatten(1), w1_heads))
    if b1 is not None:
        pre = pre + b1.to(acc)[:, None, None, None, :]
    hidden = _ACT[activation](pre)
    Hg, B, W = hidden.shape[1:4]
    y = torch.bmm(hidden.reshape(G, Hg * B * W, Fh), w2.to(acc)).view(G, Hg, B, W, w2.shape[2])
    if b2 is not None:
        y = y + b2.to(acc)[:, None, None, None, :]
    return layout.to_bhwc(y, x.dtype)
