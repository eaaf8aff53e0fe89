"""weighted_pool, vectorized torch: per chunk of S window positions, one
batched matrix-vector product over strided views of the token stream, in a
custom autograd Function (kvcompress/ops/_torch_windows.py)."""

from ...backends import register
from .._torch_common import per_head, setup
from .._torch_windows import weighted_pool_sum


# a window's bits never depend on the batch: on the CPU matmuls whose reduction (over S_c positions) has
# one order for every window, on CUDA elementwise multiply-adds (_torch_windows._weighted_forward)
@register("weighted_pool", "torch", devices=("cpu", "cuda"), batch_invariant=True)
def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), weight (G, L) -> (B, H, W, D); arguments already validated."""
    G, L = weight.shape
    layout, stream, acc = setup(x, G, block_size=L, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w = weight.to(acc)
    if layout.R == 0:   # no window: the empty output, still attached to every input
        y = layout.gather(stream[:, :0] + w.sum())                 # [G, Hg, B, 0, D]
    else:
        y = layout.gather(weighted_pool_sum(layout, stream, w))   # [G, Hg, B, W, D]
    if pe is not None:
        # sum_j w[g, j] pe[h, j] is the same for every window of head h
        y = y + layout.per_head((per_head(w, x.shape[1])[:, :, None] * pe.to(acc)).sum(1))
    return layout.to_bhwc(y, x.dtype)
