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


def _forward(x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=total_windows)
    return pool_forward(_FWD, x, weight, pe, plan)


def _backward_impl(dy, x, weight, pe, cu_seqlens, block_size, stride, padding, need_x, need_w, need_pe):
    plan = seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=dy.shape[2] if cu_seqlens is not None else -1)
    return pool_backward(_BWD, dy, x, weight, pe, plan, need_x, need_w, need_pe)


@torch.library.custom_op("kvcompress::weighted_pool_triton", mutates_args=())
def weighted_pool_op(x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, block_size: int, stride: int, padding: str,
                     total_windows: int) -> torch.Tensor:
    """x (B, H, T, D) any strides, weight (G, L), pe (H, L, D) or None -> (B, H, W, D)."""
    return _forward(x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows)


@weighted_pool_op.register_fake
def _(x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows):
    B, H, T, D = x.shape
    return x.new_empty((B, H, windows_or_dynamic(x, cu_seqlens, block_size, stride, padding, total_windows), D))


@torch.library.custom_op("kvcompress::weighted_pool_triton_bwd", mutates_args=())
def weighted_pool_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor | None,
                         cu_seqlens: torch.Tensor | None, block_size: int, stride: int, padding: str, need_x: bool,
                         need_w: bool, need_pe: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, dweight (G, L), dpe (H, L, D)); one not needed is an empty (0,) tensor."""
    return _backward_impl(dy, x, weight, pe, cu_seqlens, block_size, stride, padding, need_x, need_w, need_pe)


@weighted_pool_bwd_op.register_fake
def _(dy, x, weight, pe, cu_seqlens, block_size, stride, padding, need_x, need_w, need_pe):
    return (empty_like(x) if need_x else x.new_empty(0),
            x.new_empty(weight.shape) if need_w else x.new_empty(0),
            x.new_empty(pe.shape) if need_pe and pe is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, pe, cu_seqlens, block_size, stride, padding, _ = inputs
    ctx.save_for_backward(x, weight, pe, cu_seqlens)
    ctx.window_args = (block_size, stride, padding)


def _backward(ctx, dy):
    x, weight, pe, cu_seqlens = ctx.saved_tensors
    need_x, need_w, need_pe = ctx.needs_input_grad[:3]
    dx, dw, dpe = torch.ops.kvcompress.weighted_pool_triton_bwd(dy, x, weight, pe, cu_seqlens, *ctx.window_args,
                                                                 need_x, need_w, need_pe)
    return (dx if need_x else None, dw if need_w else None, dpe if need_pe else None,
            None, None, None, None, None)


torch.library.register_autograd("kvcompress::weighted_pool_triton", _backward, setup_context=_setup)


class _WeightedPoolFn(torch.autograd.Function):
    """The op's forward and backward without its dispatch, for eager calls
    (see ``_triton_common.eager_call``). Same kernels, same results."""

    @staticmethod
    def forward(ctx, x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows):
        ctx.save_for_backward(x, weight, pe, cu_seqlens)
        ctx.window_args = (block_size, stride, padding)
        return _forward(x, weight, pe, cu_seqlens, block_size, stride, padding, total_windows)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, pe, cu_seqlens = ctx.saved_tensors
        need_x, need_w, need_pe = ctx.needs_input_grad[:3]
        dx, dw, dpe = _backward_impl(dy, x, weight, pe, cu_seqlens, *ctx.window_args, need_x, need_w, need_pe)
        return (dx if need_x else None, dw if need_w else None, dpe if need_pe else None,
                None, None, None, None, None)


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
    if eager_call(x):
        return _WeightedPoolFn.apply(x, weight, pe, cu_seqlens, block_size, stride, padding, total)
    return torch.ops.kvcompress.weighted_pool_triton(x, weight, pe, cu_seqlens, block_size, stride, padding, total)
