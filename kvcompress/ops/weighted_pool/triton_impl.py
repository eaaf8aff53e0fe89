"""weighted_pool, Triton: each tile loads its chunk rows once; chunk row q,
phase r adds weight[g, c*S + r] * x to the partial of window q - c, and the
partials are shifted into windows (docs/triton.md). Registered as backend
"triton" (CUDA; CPU tensors too under TRITON_INTERPRET=1, never by "auto").

The op is ``torch.ops.kvcompress.weighted_pool_triton`` (fake implementation
and autograd registered).

Kernels and host path: ``_triton_pool`` (one launch forward, two
backward); eager calls skip the op's dispatch (docs/triton-perf.md).
"""

from __future__ import annotations

from ...backends import register
from .._custom_op import kernel_op
from .._triton.env import DEVICES, DTYPES, supports_call, triton_available
from .._triton.plan import WINDOW_SAVED, backward_plan, seq_plan, total_windows_arg
from .._triton_pool import POOL_INPUTS, pool_backward, pool_bwd_launcher, pool_fake, pool_forward, pool_fwd_launcher

_FWD, _BWD = pool_fwd_launcher(), pool_bwd_launcher()     # one each per kind: separate autotuning caches


def _forward(x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    return pool_forward(_FWD, x, weight, pe, plan), plan


def _backward(dy, x, weight, pe, cu_seqlens, block_size, stride, padding, need_x, need_w, need_pe, state):
    plan = backward_plan(state, dy, x, cu_seqlens, block_size, stride, padding)
    return pool_backward(_BWD, dy, x, weight, pe, plan, need_x, need_w, need_pe)


# x (B, H, T, D) any strides, weight (G, L), pe (H, L, D) or None -> (B, H, W, D), contiguous
_weighted_pool = kernel_op("kvcompress::weighted_pool_triton",
                           inputs="Tensor x, Tensor weight, Tensor? pe, " + POOL_INPUTS,
                           grads={"x": "need_x", "weight": "need_w", "pe": "need_pe"},
                           saved=("x", "weight", "pe", *WINDOW_SAVED),
                           forward=_forward, fake=pool_fake, backward=_backward)


@register("weighted_pool", "triton", devices=DEVICES, dtypes=DTYPES, priority=10, available=triton_available,
          supports=supports_call, auto_devices=("cuda",),
          emulated_devices=("cpu",))
def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None):
    """Weighted sum of every window, Triton kernels (arguments already
    validated by ``kvcompress.functional.weighted_pool``).

    x: (B, H, T, D) float16/bfloat16/float32, any strides (never copied);
    weight: (G, L) of x's dtype; pe: (H, L, D) or None; cu_seqlens: (N+1,)
    int32/int64 or None. total_windows: with cu_seqlens, the packed output
    size if known (no device read then), default None. Returns (B, H, W, D)
    in x's dtype. Differentiable in x, weight and pe.

    Raises TypeError/ValueError for a malformed total_windows.
    """
    total = total_windows_arg("weighted_pool", total_windows, cu_seqlens)
    return _weighted_pool(x, weight, pe, cu_seqlens, block_size, stride, padding, total)
