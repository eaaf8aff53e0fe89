"""attention_pool, vectorized torch: logits Z = stream @ weight once per
token (one GEMM), then the softmax over each window's positions and the
weighted sum chunk by chunk over strided views of Z and the stream, in a
custom autograd Function that recomputes the probabilities in its backward
(kvcompress/ops/_torch_windows.py)."""

from ...backends import register
from .._torch_common import setup
from .._torch_windows import attention_pool_sum


@register("attention_pool", "torch", devices=("cpu", "cuda"))
def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """x (B, H, T, D), weight (G, D, D) -> (B, H, W, D); arguments already validated.

    Stores for the backward the stream, Z (one stream-sized tensor) and two
    tensors of R rows (y and the softmax's log-denominator), not the
    probabilities (L per window and feature).
    """
    G, D = weight.shape[:2]
    layout, stream, acc = setup(x, G, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens)
    w = weight.to(acc)
    pe_ = None if pe is None else pe.to(acc)
    if layout.R == 0:   # no window: the empty output, still attached to every input
        y = stream[:, :0] + w.sum() + (0 if pe_ is None else pe_.sum())    # [G, 0, D]
    else:
        y = attention_pool_sum(layout, stream, w, pe_)                # [G, R, D]
    return layout.to_bhwc(layout.gather(y), x.dtype)
