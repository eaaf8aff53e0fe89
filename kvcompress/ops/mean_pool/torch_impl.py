"""mean_pool, vectorized torch: one strided add per window position."""

from ...backends import register
from .._torch_common import position_sum, setup


# elementwise adds and multiplies only: a window's bits never depend on the batch
@register("mean_pool", "torch", devices=("cpu", "cuda"), batch_invariant=True)
def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D) -> (B, H, W, D); arguments already validated."""
    L = block_size
    layout, stream, acc = setup(x, 1, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    ones = stream.new_ones(1, L)
    y = layout.gather(position_sum(layout, stream, ones) / L)    # [1, H, B, W, D]
    if pe is not None:
        # pe is the same for every window: its mean is a per-head constant
        y = y + layout.per_head(pe.to(acc).mean(1))
    return layout.to_bhwc(y, x.dtype)
