"""Argument validation shared by every public entry point.

Everything is checked before any computation, and every error names the
argument, what was expected and what came. One rule everywhere
(docs/semantics.md, "Errors"):

- TypeError: a value of the wrong Python or tensor type. An integer
  argument must be an ``int`` or any other ``numbers.Integral`` (numpy
  integers included) but not a bool; a tensor argument must be a
  ``torch.Tensor``; a choice (padding, activation, kind, backend) must be
  a str; a parameter's dtype must be x's.
- ValueError: a value of the right type that is out of range or has the
  wrong rank, shape or device.

Nothing is broadcast, cast or truncated silently; integers are normalised
to ``int`` before use.
"""

from __future__ import annotations

import numbers

import torch

from .kinds import ACTIVATIONS, PADDINGS  # noqa: F401  (re-exported: one list, in the kind records)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _is_int(v) -> bool:
    """An integer by the rule above: numbers.Integral (numpy integers too), not bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(fn: str, name: str, v, lo: int = 1) -> int:
    """``v`` as an ``int`` >= lo: TypeError if it is not an integer, ValueError if it is below ``lo``."""
    if not _is_int(v):
        raise TypeError(f"{fn}: {name} must be an int >= {lo}, got {type(v).__name__} {v!r}")
    v = int(v)
    if v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
    return v


def check_choice(fn: str, name: str, v, choices: tuple) -> str:
    """``v`` must be one of ``choices`` (strings): TypeError for a non-str, ValueError for another str."""
    if not isinstance(v, str):
        raise TypeError(f"{fn}: {name} must be a str, one of {choices}, got {type(v).__name__} {v!r}")
    if v not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {v!r}")
    return v


def check_window_args(fn: str, block_size, stride, padding) -> tuple[int, int]:
    """block_size (int >= 1), stride (int, 1 <= stride <= block_size), padding
    ("valid" or "left"); returns (block_size, stride) as ints."""
    block_size = check_int(fn, "block_size", block_size)
    if not _is_int(stride):
        raise TypeError(f"{fn}: stride must be an int with 1 <= stride <= block_size={block_size}, "
                        f"got {type(stride).__name__} {stride!r}")
    stride = int(stride)
    if not 1 <= stride <= block_size:
        raise ValueError(f"{fn}: stride must be an int with 1 <= stride <= block_size={block_size}, got {stride!r}")
    check_choice(fn, "padding", padding, PADDINGS)
    return block_size, stride


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
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor whose first dim is the number of groups G, "
                        f"got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError(f"{fn}: {name} must have a first dim, the number of groups G, got a 0-d tensor")
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


def check_cu_seqlens(fn: str, cu, x: torch.Tensor, *, read_values: bool = True) -> list[int] | None:
    """cu_seqlens (N+1,) int32/int64 on x's device, 0 = cu[0] <= ... <= cu[N] = T,
    with x of batch size 1; returns its values as a host list, or None when
    not read. Reading the values synchronises with a GPU; ``read_values=False``
    (the caller passed total_windows) checks the rest only. On the CPU the
    values are always read (it costs nothing)."""
    check_cu_seqlens_layout(fn, cu, x)
    if not read_values and cu.device.type != "cpu":
        return None
    return check_cu_seqlens_values(fn, cu, x)


def check_cu_seqlens_layout(fn: str, cu, x: torch.Tensor) -> None:
    """What ``check_cu_seqlens`` checks without reading the values: cu_seqlens
    a (N+1,) int32/int64 tensor on x's device, x of batch size 1."""
    check_cu_seqlens_tensor(fn, cu)
    if cu.device != x.device:
        raise ValueError(f"{fn}: cu_seqlens must be on x's device {x.device}, got {cu.device}")
    if x.shape[0] != 1:
        raise ValueError(f"{fn}: with cu_seqlens, x must hold the packed sequences in batch 1, got B={x.shape[0]}")


def check_cu_seqlens_values(fn: str, cu: torch.Tensor, x: torch.Tensor) -> list[int]:
    """The values of a cu_seqlens that passed ``check_cu_seqlens_layout``, read
    on the host (a synchronisation on a GPU): non-decreasing from 0 to x's T.
    Returns them as a list; ValueError otherwise."""
    T = x.shape[2]
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != T or any(a > b for a, b in zip(vals, vals[1:])):
        shown = vals if len(vals) <= 16 else vals[:8] + ["..."] + vals[-4:]
        raise ValueError(f"{fn}: cu_seqlens must be non-decreasing from 0 to T={T}, got {shown}")
    return vals


def check_pe(fn: str, pe, x: torch.Tensor, block_size: int) -> None:
    check_param(fn, "pe", pe, x, (x.shape[1], block_size, x.shape[3]), optional=True)


def check_activation(fn: str, activation) -> None:
    check_choice(fn, "activation", activation, ACTIVATIONS)


def check_total_windows(fn: str, total_windows, cu_seqlens) -> int | None:
    """None, or (with cu_seqlens) an int >= 0: the packed output size; returned as an int."""
    if total_windows is None:
        return None
    if not _is_int(total_windows):
        raise TypeError(f"{fn}: total_windows must be None or an int, got {type(total_windows).__name__}")
    if cu_seqlens is None:
        raise ValueError(f"{fn}: total_windows is the packed output size and needs cu_seqlens")
    if total_windows < 0:
        raise ValueError(f"{fn}: total_windows must be >= 0, got {total_windows}")
    return int(total_windows)
