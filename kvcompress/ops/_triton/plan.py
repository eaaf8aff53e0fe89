"""The windowing of one call as kernel arguments.

- ``seq_plan(...)`` -> ``SeqPlan``: fixed length or packed with
  ``cu_seqlens``, as the integers and device tensors the kernels take,
  computed without a host synchronisation except the one documented read of
  the packed output size; ``backward_plan`` is the backward's (its output
  size is dy's).
- ``total_windows_arg``: validation of the optional packed output size.
- ``windows_or_dynamic``: the output's window count for fake tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._cache import bounded_put
from ..._windows import _num_windows, compressed_cu_seqlens
from .launch import cdiv, next_pow2

__all__ = ["SEQ_ARGS", "SeqPlan", "WINDOW_INPUTS", "WINDOW_SAVED", "backward_plan", "seq_plan", "total_windows_arg",
           "window_fake", "windows_or_dynamic"]

# the sequence parameters every kernel takes, in this order (SeqPlan.seq_args)
SEQ_ARGS = ("cu", "ccu", "cq", "N", "N_STEPS", "T", "W", "NQ", "L", "S", "PRE")
# the window arguments of every kind's custom op (``_custom_op.kernel_op`` syntax), and those its backward takes
WINDOW_INPUTS = "Tensor? cu_seqlens, SymInt block_size, SymInt stride, str padding"
WINDOW_SAVED = ("cu_seqlens", "block_size", "stride", "padding")


@dataclass(frozen=True)
class SeqPlan:
    """The windowing of one call, as kernel arguments.

    B, H, T, D: x's shape. L, S: block_size, stride. PRE: left-pad tokens per
    sequence (L - S for padding="left", else 0). C = ceil(L / S) chunks per
    window; C_PAD = next_pow2(C). varlen: cu_seqlens given.

    Fixed length (varlen False): every (b, h) row is one sequence of T
    tokens; W windows and NQ = ceil((PRE + T) / S) chunk rows per row.
    Packed (varlen True, B == 1): N sequences; W = total windows (the output
    size); NQ = an upper bound of the total chunk rows, from shapes only.
    cu (N+1,) token offsets (x's int dtype), ccu (N+1,) int64 window offsets,
    cq (N+1,) int64 chunk-row offsets; N_STEPS = ceil(log2 N) binary search
    steps. In fixed mode cu/ccu/cq are placeholders never read.
    """

    B: int
    H: int
    T: int
    D: int
    L: int
    S: int
    PRE: int
    C: int
    C_PAD: int
    varlen: bool
    N: int
    W: int
    NQ: int
    N_STEPS: int
    cu: torch.Tensor
    ccu: torch.Tensor
    cq: torch.Tensor

    def seq_args(self) -> tuple:
        """(cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE): the sequence arguments
        every kernel takes, in this order."""
        return (self.cu, self.ccu, self.cq, self.N, self.N_STEPS, self.T, self.W, self.NQ, self.L, self.S,
                self.PRE)

    def seq_kwargs(self) -> dict:
        """The sequence arguments by their kernel parameter names (``seq_args``)."""
        kw = self.__dict__.get("_seq_kwargs")
        if kw is None:     # built once per plan (the forward's is the eager backward's too), then copied
            kw = dict(zip(SEQ_ARGS, self.seq_args()))
            object.__setattr__(self, "_seq_kwargs", kw)
        return kw.copy()


def seq_plan(x: torch.Tensor, *, block_size: int, stride: int, padding: str, cu_seqlens: torch.Tensor | None,
             total_windows: int = -1) -> SeqPlan:
    """The SeqPlan of x (B, H, T, D) for already-validated window arguments.

    total_windows: with cu_seqlens, the packed output size W if the caller
    knows it (int >= 0), else -1: then it is read from the device once (a
    host synchronisation; the fixed-length path never synchronises). When
    given, it is checked on the device (``torch._assert_async``), without a
    synchronisation.
    """
    if cu_seqlens is None:
        key = (*x.shape, block_size, stride, padding)
        try:
            sizes = _FIXED.get(key)
        except TypeError:     # a symbolic size (tracing) is not hashable: computed, never cached
            return SeqPlan(*_fixed_sizes(*key), x, x, x)
        if sizes is None:
            sizes = bounded_put(_FIXED, key, _fixed_sizes(*key), 256)
        # placeholders: the IS_VARLEN=False branches never read them
        return SeqPlan(*sizes, x, x, x)
    B, H, T, D = x.shape
    L, S = block_size, stride
    PRE = L - S if padding == "left" else 0
    C = cdiv(L, S)
    N = cu_seqlens.shape[0] - 1
    cu64 = cu_seqlens.to(torch.int64)
    ccu = compressed_cu_seqlens(cu64, L, S, padding)                       # [N+1] window offsets
    lengths = cu64[1:] - cu64[:-1]                                         # [N]
    nq = torch.where(lengths > 0, torch.div(PRE + lengths + S - 1, S, rounding_mode="floor"),
                     torch.zeros_like(lengths))                            # [N] chunk rows per sequence
    cq = torch.cat([cu64.new_zeros(1), torch.cumsum(nq, 0)])               # [N+1]
    if total_windows is None or total_windows < 0:
        W = int(ccu[-1])                                                   # the one documented device read
    else:
        W = int(total_windows)
        torch._assert_async(ccu[-1] == W, "kvcompress: total_windows differs from compressed_cu_seqlens(...)[-1]")
    NQ = (T + N * (PRE + S - 1)) // S                                      # >= sum(nq), from shapes
    return SeqPlan(B, H, T, D, L, S, PRE, C, next_pow2(C), True, N, W, NQ, max(N - 1, 0).bit_length(),
                   cu_seqlens, ccu, cq)


_FIXED: dict[tuple, tuple] = {}    # (B, H, T, D, L, S, padding) -> a fixed-length plan's sizes (_fixed_sizes)


def _fixed_sizes(B: int, H: int, T: int, D: int, L: int, S: int, padding: str) -> tuple:
    """The integer fields of a fixed-length SeqPlan, in field order (before cu, ccu, cq)."""
    PRE = L - S if padding == "left" else 0
    C = cdiv(L, S)
    W = _num_windows(T, L, S, padding)
    NQ = cdiv(PRE + T, S) if T > 0 else 0
    return B, H, T, D, L, S, PRE, C, next_pow2(C), False, B, W, NQ, 0


def total_windows_arg(fn: str, total_windows, cu_seqlens) -> int:
    """Validate the optional ``total_windows`` of a packed call -> int (-1: unknown).

    Raises TypeError unless it is None or an int, ValueError if it is
    negative or given without cu_seqlens.
    """
    if total_windows is None:
        return -1
    if not isinstance(total_windows, int) or isinstance(total_windows, bool):
        raise TypeError(f"{fn}: total_windows must be None or an int, got {type(total_windows).__name__}")
    if cu_seqlens is None:
        raise ValueError(f"{fn}: total_windows is the packed output size and needs cu_seqlens")
    if total_windows < 0:
        raise ValueError(f"{fn}: total_windows must be >= 0, got {total_windows}")
    return total_windows


def windows_or_dynamic(x: torch.Tensor, cu_seqlens, block_size: int, stride: int, padding: str,
                       total_windows: int):
    """The output's window count for a fake (meta) implementation: known from
    shapes without cu_seqlens, from total_windows when given, else a new
    data-dependent size."""
    if cu_seqlens is None:
        T = x.shape[2]
        if padding == "valid":
            return (T - block_size) // stride + 1 if T >= block_size else 0
        return T // stride
    if total_windows >= 0:
        return total_windows
    return torch.library.get_ctx().new_dynamic_size()


def window_fake(x: torch.Tensor, d_out: int, *, cu_seqlens, block_size: int, stride: int, padding: str,
                total_windows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake (B, H, W, d_out) output of x's dtype (or ``dtype``), contiguous."""
    B, H = x.shape[:2]
    W = windows_or_dynamic(x, cu_seqlens, block_size, stride, padding, total_windows)
    return x.new_empty((B, H, W, d_out), dtype=dtype)


def backward_plan(plan: SeqPlan | None, dy: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  block_size: int, stride: int, padding: str) -> SeqPlan:
    """The backward's SeqPlan: the forward's ``plan`` when an eager call kept
    it, else (the op's backward) recomputed with dy's window count as the
    packed output size: no device read."""
    if plan is not None:
        return plan
    return seq_plan(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                    total_windows=dy.shape[2] if cu_seqlens is not None else -1)

