"""Argument validation shared by every public entry point.

Everything is checked before any computation, and every error names the
argument, what was expected and what came. Shapes, dtypes and devices raise
ValueError/TypeError; nothing is broadcast, cast or truncated silently.
"""

from __future__ import annotations

import torch

from ._windows import PADDINGS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = ("relu", "gelu", "silu")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_window_args(fn: str, block_size, stride, padding) -> None:
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"{fn}: block_size must be an int >= 1, got {block_size!r}")
    if not _is_int(stride) or not 1 <= stride <= block_size:
        raise ValueError(f"{fn}: stride must be an int with 1 <= stride <= block_size={block_size}, got {stride!r}")
    if padding not in PADDINGS:
        raise ValueError(f"{fn}: padding must be one of {PADDINGS}, got {padding!r}")


def check_x(fn: str, x) -> tuple[int, int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor of shape (B, H, T, D), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have 4 dims (B, H, T, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must have a dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[3] < 1:
        raise ValueError(f"{fn}: x needs H >= 1 and D >= 1, got shape {tuple(x.shape)}")
    return tuple(x.shape)


def check_param(fn: str, name: str, t, x: torch.Tensor, shape: tuple, *, optional: bool = False) -> None:
    """``t`` must be a tensor of exactly ``shape`` (None entries: any size),
    x's dtype and x's device."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{fn}: {name} is required, a tensor of shape {_fmt(shape)}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape {_fmt(shape)}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise ValueError(f"{fn}: {name} must have shape {_fmt(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def check_groups(fn: str, name: str, t: torch.Tensor, H: int) -> int:
    """The weight's leading dim G must be >= 1 and divide H; returns G."""
    if not isinstance(t, torch.Tensor) or t.dim() < 1:
        raise TypeError(f"{fn}: {name} must be a torch.Tensor whose first dim is the number of groups G")
    G = t.shape[0]
    if G < 1 or H % G != 0:
        raise ValueError(f"{fn}: {name}.shape[0] is the number of groups G and must divide H={H}, got G={G}")
    return G


def check_cu_seqlens_tensor(fn: str, cu) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{fn}: cu_seqlens must be a torch.Tensor of int32/int64 offsets, got {type(cu).__name__}")
    if cu.dtype not in INDEX_DTYPES:
        raise TypeError(f"{fn}: cu_seqlens must have dtype int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{fn}: cu_seqlens must be 1-D with N+1 >= 1 entries, got shape {tuple(cu.shape)}")


def check_cu_seqlens(fn: str, cu, x: torch.Tensor, *, read_values: bool = True) -> None:
    """cu_seqlens (N+1,) int32/int64 on x's device, 0 = cu[0] <= ... <= cu[N] = T,
    with x of batch size 1. Reading the values synchronises with the device;
    ``read_values=False`` (the caller passed total_windows) checks the rest only."""
    check_cu_seqlens_tensor(fn, cu)
    if cu.device != x.device:
        raise ValueError(f"{fn}: cu_seqlens must be on x's device {x.device}, got {cu.device}")
    if x.shape[0] != 1:
        raise ValueError(f"{fn}: with cu_seqlens, x must hold the packed sequences in batch 1, got B={x.shape[0]}")
    if not read_values:
        return
    T = x.shape[2]
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != T or any(a > b for a, b in zip(vals, vals[1:])):
        shown = vals if len(vals) <= 16 else vals[:8] + ["..."] + vals[-4:]
        raise ValueError(f"{fn}: cu_seqlens must be non-decreasing from 0 to T={T}, got {shown}")


def check_pe(fn: str, pe, x: torch.Tensor, block_size: int) -> None:
    check_param(fn, "pe", pe, x, (x.shape[1], block_size, x.shape[3]), optional=True)


def check_activation(fn: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_total_windows(fn: str, total_windows, cu_seqlens) -> None:
    """None, or (with cu_seqlens) an int >= 0: the packed output size."""
    if total_windows is None:
        return
    if not _is_int(total_windows):
        raise TypeError(f"{fn}: total_windows must be None or an int, got {type(total_windows).__name__}")
    if cu_seqlens is None:
        raise ValueError(f"{fn}: total_windows is the packed output size and needs cu_seqlens")
    if total_windows < 0:
        raise ValueError(f"{fn}: total_windows must be >= 0, got {total_windows}")
