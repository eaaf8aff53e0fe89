"""mean_pool, Triton: each tile loads its chunk rows once and shifts the
per-chunk partial sums into windows (docs/triton.md). Registered as backend
"triton" (CUDA; CPU tensors too under TRITON_INTERPRET=1, never by "auto").

The op is ``torch.ops.kvcompress.mean_pool_triton`` (fake implementation and
autograd registered, ``_custom_op.kernel_op``), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node.

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


def _forward(x, pe, cu_seqlens, block_size, stride, padding, total_windows):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    return pool_forward(_FWD, x, None, pe, plan), plan


def _backward(dy, x, pe, cu_seqlens, block_size, stride, padding, need_x, need_pe, state):
    plan = backward_plan(state, dy, x, cu_seqlens, block_size, stride, padding)
    dx, _, dpe = pool_backward(_BWD, dy, x, None, pe, plan, need_x, False, need_pe)
    return dx, dpe


# x (B, H, T, D) any strides, pe (H, L, D) or None -> (B, H, W, D), contiguous
_mean_pool = kernel_op("kvcompress::mean_pool_triton", inputs="Tensor x, Tensor? pe, " + POOL_INPUTS,
                       grads={"x": "need_x", "pe": "need_pe"},
                       saved=("x", "pe", *WINDOW_SAVED),
                       forward=_forward, fake=pool_fake, backward=_backward)


@register("mean_pool", "triton", devices=DEVICES, dtypes=DTYPES, priority=10, available=triton_available,
          supports=supports_call, auto_devices=("cuda",),
          emulated_devices=("cpu",))
def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, total_windows=None):
    """Mean of every window, Triton kernels (arguments already validated by
    ``kvcompress.functional.mean_pool``).

    x: (B, H, T, D) float16/bfloat16/float32, any strides (never copied);
    pe: (H, L, D) or None; cu_seqlens: (N+1,) int32/int64 or None.
    total_windows: with cu_seqlens, the packed output size
    ``compressed_cu_seqlens(...)[-1]`` if the caller knows it (then the call
    never synchronises with the device); default None reads it from the
    device once. Returns (B, H, W, D) in x's dtype. Differentiable in x and pe.

    Raises TypeError/ValueError for a malformed total_windows.
    """
    total = total_windows_arg("mean_pool", total_windows, cu_seqlens)
    return _mean_pool(x, pe, cu_seqlens, block_size, stride, padding, total)
