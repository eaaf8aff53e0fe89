"""weighted_pool, vectorized torch: one strided multiply-add per window position."""

from ...backends import register
from .._torch_common import per_head, position_sum, setup


# elementwise adds and multiplies only: a window's bits never depend on the batch
@register("weighted_pool", "torch", devices=("cpu", "cuda"), batch_invariant=True)
def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), weight (G, L) -> (B, H, W, D); arguments already validated."""
    G, L = weight.shape
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w = weight.to(acc)
    y = layout.gather(position_sum(layout, stream, w))           # [G, Hg, B, W, D]
    if pe is not None:
        # sum_j w[g, j] pe[h, j] is the same for every window of head h
        y = y + layout.per_head((per_head(w, x.shape[1])[:, :, None] * pe.to(acc)).sum(1))
    return layout.to_bhwc(y, x.dtype)
