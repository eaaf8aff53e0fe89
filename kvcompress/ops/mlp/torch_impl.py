"""mlp, vectorized torch: the first layer is ``window_sum`` over the token
stream, like ``linear`` (C = L / S chunk matmuls with K = S*D when S
divides L, else L position matmuls with K = D); the hidden layer exists
only for the real windows."""

import torch
import torch.nn.functional as F

from ...backends import register
from .._torch_common import setup, window_sum

# relu may run in place: gather (index_select) saves nothing of its output
# for backward, and relu's backward needs only its own output
_ACT = {"relu": lambda z: F.relu(z, inplace=True), "gelu": lambda z: F.gelu(z, approximate="none"),
        "silu": F.silu}


@register("mlp", "torch", devices=("cpu", "cuda"), lean=False)
def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), w1 (G, L*D, F), b1 (G, F) or None, w2 (G, F, D_out),
    b2 (G, D_out) or None -> (B, H, W, D_out); arguments already validated."""
    G, LD, Fh = w1.shape
    L, D = block_size, x.shape[3]
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    # pe (H, L, D) added to every window and b1: window_sum adds the per-head
    # constant flat(pe[h]) @ w1[g] + b1[g] to its product
    w1_ = w1.to(acc).view(G, L, D, Fh)
    pre = window_sum(layout, stream, w1_, None if pe is None else pe.to(acc), None if b1 is None else b1.to(acc))
    pre = layout.gather(pre)                                                   # [G, Hg, B, W, F]
    hidden = _ACT[activation](pre)
    Hg, B, W = hidden.shape[1:4]
    y = torch.bmm(hidden.reshape(G, Hg * B * W, Fh), w2.to(acc)).view(G, Hg, B, W, w2.shape[2])
    if b2 is not None:
        y = y + b2.to(acc)[:, None, None, None, :]
    return layout.to_bhwc(y, x.dtype)
