"""A run of consecutive windows as a case of its own.

Windows first..last-1 of one sequence read only the tokens from the first
one's start to the last one's end; under the right padding those windows
are exactly the windows of that token slice. So their exact outputs, and the
exact gradients of a cotangent that is zero outside them, come from a small
Case and its float64 inputs, at any T: this is how the production-shape
gradient property (properties/test_production.py) and the benchmark gate
(benchmarks/checks.py) check slices of a long call.

A subset of heads goes along: each chosen head keeps its own parameter
group, so the slice's G is the number of distinct groups among them (in
order: head h uses group h // (H // G), SPEC section 1); the chosen heads
must then map one-to-one or all-to-one onto their groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import kvcompress_reference as reference
import numpy as np

from .cases import Case, Inputs
from .convert import to_numpy
from .records import RECORDS


def token_range(case: Case, first: int, last: int) -> tuple[int, int, str]:
    """The tokens [t0, t1) of one sequence that its windows first..last-1
    read, and the padding under which exactly those windows are the windows
    of that sequence's tokens t0..t1-1 (first < last)."""
    start = reference.window_start(first, case.L, case.S, case.padding)
    end = reference.window_start(last - 1, case.L, case.S, case.padding) + case.L
    if start >= 0:
        return start, end, "valid"
    return 0, end, "left"   # only left padding starts before token 0, and only from window 0


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64) if isinstance(a, np.ndarray) else to_numpy(a)


@dataclass(frozen=True)
class WindowSlice:
    """Windows first..last-1 of sequence ``seq`` (batch rows ``rows``, heads
    ``heads``) as a Case of their own.

    case: the slice's Case (contiguous layout, no packing).
    inputs: its Inputs, float64 arrays only (x64, params64, pe64).
    tokens: (t0, t1), the tokens the windows read, as indices into x's T
    axis (a packed sequence's offset added).
    windows: (w0, w1), the windows as indices into the output's W axis.
    rows, heads, groups: the batch rows, heads and parameter groups taken,
    as slices or index tuples for x, pe and the parameters.
    """

    case: Case
    inputs: Inputs
    tokens: tuple[int, int]
    windows: tuple[int, int]
    rows: slice
    heads: tuple[int, ...]
    groups: tuple[int, ...]


def window_slice(case: Case, x, params: dict, pe, *, first: int, last: int, seq: int = 0,
                 rows: slice = slice(None), heads: tuple[int, ...] | None = None) -> WindowSlice:
    """Windows first..last-1 (0 <= first < last <= that sequence's window
    count) of sequence ``seq`` (packed cases: the seq-th of case.seqlens;
    else the one sequence of each batch row) of the batch rows ``rows`` and
    the heads ``heads`` (default all, in order).

    x: (B, H, T, D), params: name -> array or None, pe: (H, L, D) or None,
    tensors or float64 arrays (only the slice is converted to float64).
    Raises ValueError for windows outside the sequence or heads that do not
    map one-to-one or all-to-one onto their groups."""
    seqs = [case.T] if case.seqlens is None else list(case.seqlens)
    if not 0 <= seq < len(seqs):
        raise ValueError(f"window_slice: seq must be in [0, {len(seqs)}), got {seq}")
    W = reference.num_windows(seqs[seq], case.L, case.S, case.padding)
    if not 0 <= first < last <= W:
        raise ValueError(f"window_slice: windows {first}..{last - 1} are not among sequence {seq}'s {W}")
    heads = tuple(range(case.H)) if heads is None else tuple(heads)
    groups = tuple(dict.fromkeys(h // (case.H // case.G) for h in heads))
    if len(groups) not in (1, len(heads)):
        raise ValueError(f"window_slice: heads {heads} map onto groups {groups}: take one head per group, or "
                         f"heads of one group")
    t0, t1, padding = token_range(case, first, last)
    offset = sum(seqs[:seq])
    w_offset = sum(reference.num_windows(n, case.L, case.S, case.padding) for n in seqs[:seq])
    B = len(range(case.B)[rows])
    sub = case.replace(B=B, H=len(heads), G=len(groups), T=t1 - t0, padding=padding, layout="contiguous",
                       seqlens=None)
    hs, gs = list(heads), list(groups)
    per_token = {p.name for p in RECORDS[case.kind].params if p.per_token}   # gated_pool's z: cut like x

    def cut(v, name):
        if v is None:
            return None
        if name in per_token:
            return _f64(v[rows][:, hs, offset + t0: offset + t1])
        return _f64(v[gs])

    params64 = {k: cut(v, k) for k, v in params.items()}
    x64 = _f64(x[rows][:, hs, offset + t0: offset + t1])
    inputs = Inputs(x64=x64, params64=params64, pe64=None if pe is None else _f64(pe[hs]), x=None,
                    params=None, pe=None, cu_seqlens=None, cu64=None)
    return WindowSlice(sub, inputs, (offset + t0, offset + t1), (w_offset + first, w_offset + last), rows, heads,
                       groups)
