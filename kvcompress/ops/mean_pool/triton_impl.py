"""mean_pool, Triton: each tile loads its chunk rows once and shifts the
per-chunk partial sums into windows (docs/triton.md). Registered as backend
"triton" (CUDA; CPU tensors too under TRITON_INTERPRET=1, never by "auto").

The op is ``torch.ops.kvcompress.mean_pool_triton`` (fake implementation and
autograd registered), so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque node.

Kernels and host path: ``_triton_pool`` (one launch forward, two
backward); eager calls skip the op's dispatch (docs/triton-perf.md).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...backends import register
from .._triton_common import (
    DEVICES,
    DTYPES,
    empty_like,
    seq_plan,
    supports_call,
    total_windows_arg,
    triton_available,
    windows_or_dynamic,
)
from .._triton_pool import eager_call, pool_backward, pool_bwd_launcher, pool_forward, pool_fwd_launcher

_FWD, _BWD = pool_fwd_launcher(), pool_bwd_launcher()     # one each per kind: separate autotuning caches


def _forward(x, pe, cu_seqlens, block_size, stride, padding, total_windows):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    return pool_forward(_FWD, x, None, pe, plan)


def _backward_impl(dy, x, pe, cu_seqlens, block_size, stride, padding, need_x, need_pe):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=dy.shape[2] if cu_seqlens is not None else -1)
    dx, _, dpe = pool_backward(_BWD, dy, x, None, pe, plan, need_x, False, need_pe)
    return dx, dpe


@torch.library.custom_op("kvcompress::mean_pool_triton", mutates_args=())
def mean_pool_op(x: torch.Tensor, pe: torch.Tensor | None, cu_seqlens: torch.Tensor | None, block_size: int,
                 stride: int, padding: str, total_windows: int) -> torch.Tensor:
    """x (B, H, T, D) any strides, pe (H, L, D) or None -> (B, H, W, D), contiguous."""
    return _forward(x, pe, cu_seqlens, block_size, stride, padding, total_windows)


@mean_pool_op.register_fake
def _(x, pe, cu_seqlens, block_size, stride, padding, total_windows):
    B, H, T, D = x.shape
    return x.new_empty((B, H, windows_or_dynamic(x, cu_seqlens, block_size, stride, padding, total_windows), D))


@torch.library.custom_op("kvcompress::mean_pool_triton_bwd", mutates_args=())
def mean_pool_bwd_op(dy: torch.Tensor, x: torch.Tensor, pe: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                     block_size: int, stride: int, padding: str, need_x: bool,
                     need_pe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dpe (H, L, D)); a gradient not needed is an empty (0,) tensor."""
    return _backward_impl(dy, x, pe, cu_seqlens, block_size, stride, padding, need_x, need_pe)


@mean_pool_bwd_op.register_fake
def _(dy, x, pe, cu_seqlens, block_size, stride, padding, need_x, need_pe):
    return (empty_like(x) if need_x else x.new_empty(0),
            x.new_empty(pe.shape) if need_pe and pe is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, pe, cu_seqlens, block_size, stride, padding, _ = inputs
    ctx.save_for_backward(x, pe, cu_seqlens)
    ctx.window_args = (block_size, stride, padding)


def _backward(ctx, dy):
    x, pe, cu_seqlens = ctx.saved_tensors
    need_x, need_pe = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dpe = torch.ops.kvcompress.mean_pool_triton_bwd(dy, x, pe, cu_seqlens, *ctx.window_args, need_x, need_pe)
    return dx if need_x else None, dpe if need_pe else None, None, None, None, None, None


torch.library.register_autograd("kvcompress::mean_pool_triton", _backward, setup_context=_setup)


class _MeanPoolFn(torch.autograd.Function):
    """The op's forward and backward without its dispatch, for eager calls
    (see ``_triton_common.eager_call``). Same kernels, same results."""

    @staticmethod
    def forward(ctx, x, pe, cu_seqlens, block_size, stride, padding, total_windows):
        ctx.save_for_backward(x, pe, cu_seqlens)
        ctx.window_args = (block_size, stride, padding)
        return _forward(x, pe, cu_seqlens, block_size, stride, padding, total_windows)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, pe, cu_seqlens = ctx.saved_tensors
        need_x, need_pe = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dpe = _backward_impl(dy, x, pe, cu_seqlens, *ctx.window_args, need_x, need_pe)
        return dx if need_x else None, dpe if need_pe else None, None, None, None, None, None


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
    if eager_call(x):
        return _MeanPoolFn.apply(x, pe, cu_seqlens, block_size, stride, padding, total)
    return torch.ops.kvcompress.mean_pool_triton(x, pe, cu_seqlens, block_size, stride, padding, total)
