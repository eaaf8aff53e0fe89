"""Pieces every vectorized torch path shares."""

from __future__ import annotations

import torch

from .._windows import StreamLayout


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """SPEC section 3: accumulate in float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def setup(x: torch.Tensor, G: int, *, block_size: int, stride: int, padding: str, cu_seqlens):
    """The stream layout and the stream itself (one compact copy of x in the
    accumulation dtype), plus that dtype."""
    B, H, T, D = x.shape
    acc = accumulation_dtype(x.dtype)
    layout = StreamLayout(B, H, G, T, D, block_size=block_size, stride=stride, padding=padding,
                          cu_seqlens=cu_seqlens, device=x.device)
    return layout, layout.to_stream(x, acc), acc


def per_head(w: torch.Tensor, H: int) -> torch.Tensor:
    """(G, ...) group weights -> (H, ...) head weights: head h uses group h // (H // G)."""
    return w.repeat_interleave(H // w.shape[0], dim=0)
