"""Streaming compression for decoding (issue 6; docs/streaming.md).

Keys and values arrive a few tokens at a time. A *stream* is one sequence
growing that way; a batch of N streams advances together, each stream by
its own number of tokens (zero included) per step. A compressed token
appears in the step that delivers its window's last token, it is computed
once (the prefix is never recompressed), and the concatenation of
everything a stream emitted equals the full pass over what it received
(``kvcompress.functional`` with the same padding).

The state keeps, per stream, the tokens that a future window still needs
(at most L - 1: once L are pending, a window is complete) and two counters.
With ``padding="left"`` a fresh stream holds the L - S zero tokens that the
full pass prepends, so left padding needs no special case afterwards.

How a step computes, through ``kvcompress.functional`` (so every registered
backend serves, ``backend=``): after w windows a stream's pending tokens
start at w * S of its (left-padded) sequence, which is where window w
starts. Pending tokens followed by the new ones therefore form a sequence
whose ``padding="valid"`` windows are exactly the next windows of the full
pass, with ``pe[h, j]`` on window position j as there, pad zeros included.
The covered part of those sequences is compressed in one packed call; what
the last window did not consume becomes the new pending tokens.

Shapes: N streams, H heads, D head dim, L = block_size, S = stride,
T_new new tokens in a step, W_new windows it completes, D_out output dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import numpy as np
import torch

from . import backends as _backends
from . import functional as _functional
from . import kinds as _kinds
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    _is_int,
    check_choice,
    check_int,
    check_pe,
    check_window_args,
)
from ._windows import _num_windows_tensor, num_windows

__all__ = ["StepOutput", "StreamState", "StreamingCompressor", "init_state", "reset", "step"]

# a kind's keyword arguments that a step forwards to kvcompress.functional are
# its record's options (kvcompress/kinds.py); block_size, stride, padding and
# cu_seqlens come from the state
_STATE_TENSORS = ("pending", "n_tokens", "n_windows")


def _pad_tokens(block_size: int, stride: int, padding: str) -> int:
    """Zero tokens the full pass prepends to every sequence (SPEC section 2)."""
    return block_size - stride if padding == "left" else 0


@dataclass(frozen=True, eq=False)
class StreamState:
    """What N streams need to continue: pending tokens and two counters.

    pending: (N, L - 1, H, D) tensor of x's dtype; ``pending[k, :n_pending[k]]``
        are stream k's tokens not yet consumed by a window, oldest first
        (with padding="left", pad zeros count as tokens); the rest is zero.
    n_tokens: (N,) int64, tokens received (pad zeros not counted).
    n_windows: (N,) int64, compressed tokens emitted; always
        ``num_windows(n_tokens, block_size, stride, padding)``.
    block_size, stride (int, 1 <= stride <= block_size), padding ("valid"
        or "left"): the windowing, fixed for the life of the state.
    fill: one float per per-token input of the kind (the state keeps the
        inputs side by side along D): the value of a left pad token
        (default (0.0,): a zero token; gated_pool's (0.0, -inf): value 0,
        score -inf, i.e. weight 0). ``init_state(..., kind=)`` sets it.

    All tensors live on one device. The state is immutable: ``step`` and
    ``reset`` return new states. Build one with ``init_state``; move it with
    ``.to(device)``; save it with ``torch.save(state.state_dict(), f)`` and
    restore it with ``StreamState.from_state_dict(torch.load(f))``.

    Raises ValueError/TypeError (naming the field) when the fields'
    shapes, dtypes or devices disagree; ``from_state_dict`` also checks
    the counters' values.
    """

    pending: torch.Tensor     # [N, L-1, H, D]
    n_tokens: torch.Tensor    # [N] int64
    n_windows: torch.Tensor   # [N] int64
    block_size: int
    stride: int
    padding: str
    fill: tuple[float, ...] = (0.0,)

    def __post_init__(self):
        fn = "StreamState"
        L, S = check_window_args(fn, self.block_size, self.stride, self.padding)
        object.__setattr__(self, "block_size", L)      # numpy integers become ints
        object.__setattr__(self, "stride", S)
        p = self.pending
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{fn}: pending must be a torch.Tensor (N, L-1, H, D), got {type(p).__name__}")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: pending must have a dtype in {FLOAT_DTYPES}, got {p.dtype}")
        if p.dim() != 4 or p.shape[1] != self.block_size - 1 or p.shape[2] < 1 or p.shape[3] < 1:
            raise ValueError(f"{fn}: pending must have shape (N, L-1={self.block_size - 1}, H >= 1, D >= 1), "
                             f"got {tuple(p.shape)}")
        fill = self.fill
        if (not isinstance(fill, (tuple, list)) or not fill or not all(isinstance(v, (int, float)) for v in fill)
                or p.shape[3] % len(fill)):
            raise ValueError(f"{fn}: fill must be a non-empty tuple of floats whose length divides D={p.shape[3]}, "
                             f"got {fill!r}")
        object.__setattr__(self, "fill", tuple(float(v) for v in fill))
        for name in ("n_tokens", "n_windows"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"{fn}: {name} must be an int64 torch.Tensor of shape (N,), got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if tuple(t.shape) != (p.shape[0],):
                raise ValueError(f"{fn}: {name} must have shape (N,) = ({p.shape[0]},), got {tuple(t.shape)}")
            if t.device != p.device:
                raise ValueError(f"{fn}: {name} must be on pending's device {p.device}, got {t.device}")

    @property
    def num_streams(self) -> int:
        return self.pending.shape[0]

    @property
    def heads(self) -> int:
        return self.pending.shape[2]

    @property
    def dim(self) -> int:
        return self.pending.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.pending.dtype

    @property
    def device(self) -> torch.device:
        return self.pending.device

    @property
    def pad_tokens(self) -> int:
        """L - S with padding="left" (the zeros a fresh stream holds), else 0."""
        return _pad_tokens(self.block_size, self.stride, self.padding)

    @property
    def n_pending(self) -> torch.Tensor:
        """(N,) int64: pending tokens per stream, n_tokens + pad_tokens - n_windows * S (at most L - 1)."""
        return self.n_tokens + self.pad_tokens - self.n_windows * self.stride

    def to(self, device, *, non_blocking: bool = False) -> StreamState:
        """The same state with every tensor on ``device`` (str or torch.device)."""
        return StreamState(*(getattr(self, n).to(device, non_blocking=non_blocking) for n in _STATE_TENSORS),
                           self.block_size, self.stride, self.padding, self.fill)

    def state_dict(self) -> dict:
        """Tensors and windowing as a plain dict (``torch.load(..., weights_only=True)`` reads it back)."""
        d = {n: getattr(self, n) for n in _STATE_TENSORS}
        d.update(block_size=self.block_size, stride=self.stride, padding=self.padding, fill=self.fill)
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> StreamState:
        """Rebuild a state from ``state_dict()``'s dict, checking it first.

        Raises TypeError if ``d`` is not a dict, ValueError naming the
        missing key, or the field errors of StreamState; ValueError if a
        counter is negative or n_windows != num_windows(n_tokens).
        Reads the counters (a host synchronisation).
        """
        fn = "StreamState.from_state_dict"
        if not isinstance(d, dict):
            raise TypeError(f"{fn}: expected the dict of state_dict(), got {type(d).__name__}")
        keys = _STATE_TENSORS + ("block_size", "stride", "padding")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{fn}: the dict lacks {missing}; it must have the keys {list(keys)}")
        state = cls(**{k: d[k] for k in keys}, fill=tuple(d.get("fill", (0.0,))))
        n_tok = state.n_tokens
        expected = _num_windows_tensor(n_tok, state.block_size, state.stride, state.padding)
        if bool((n_tok < 0).any()) or not torch.equal(state.n_windows, expected):
            raise ValueError(f"{fn}: n_tokens must be >= 0 and n_windows = num_windows(n_tokens); got n_tokens "
                             f"{n_tok.tolist()[:16]}, n_windows {state.n_windows.tolist()[:16]}")
        return state


class StepOutput(NamedTuple):
    """What a step returns.

    y: (1, H, W_new, D_out) in x's dtype, the completed compressed tokens
        of all streams packed in stream order.
    cu_y: (N+1,) offsets of each stream's tokens in y, cu_new's dtype.
    state: the new StreamState.
    """

    y: torch.Tensor
    cu_y: torch.Tensor
    state: StreamState


def _fresh(shape, fill, dtype, device, pad: int) -> torch.Tensor:
    """Pending tokens (N, L-1, H, D) of fresh streams: the first ``pad`` hold
    the pad value of each input (``fill``, side by side along D), the rest 0."""
    pending = torch.zeros(shape, dtype=dtype, device=device)
    if pad and any(v != 0.0 for v in fill):
        per = shape[3] // len(fill)
        pending[:, :pad] = torch.tensor(fill, dtype=dtype, device=device).repeat_interleave(per)   # [D]
    return pending


def init_state(num_streams: int, heads: int, dim: int, *, block_size: int, stride: int, padding: str = "valid",
               dtype: torch.dtype = torch.float32, device=None, kind: str | None = None) -> StreamState:
    """A state of ``num_streams`` fresh streams.

    num_streams (N >= 0), heads (H >= 1), dim (D >= 1): ints; a kind with
    several per-token inputs keeps them side by side (gated_pool: dim =
    2 * D, x then z). block_size, stride, padding: as in
    kvcompress.functional. dtype: the token dtype (default float32).
    device: default the current default device. kind: the kind the state
    serves (default None: any kind whose pads are zero tokens); it sets
    the pad value (gated_pool's scores -inf).
    With padding="left" every stream starts holding L - S pad tokens.
    Raises TypeError for a size, block_size or stride that is not an
    integer (bool and float included), a non-str padding or a non-float
    dtype; ValueError for a size or windowing out of range.
    """
    fn = "init_state"
    num_streams, heads, dim = (check_int(fn, name, v, lo) for name, v, lo in (
        ("num_streams", num_streams, 0), ("heads", heads, 1), ("dim", dim, 1)))
    block_size, stride = check_window_args(fn, block_size, stride, padding)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    fill = (0.0,) if kind is None else _kinds.get(check_choice(fn, "kind", kind, _kinds.KINDS)).pad_fill
    if dim % len(fill):
        raise ValueError(f"{fn}: {kind} keeps {len(fill)} inputs side by side, so dim must be a multiple of "
                         f"{len(fill)}, got {dim}")
    zeros = torch.zeros(num_streams, dtype=torch.int64, device=device)
    pending = _fresh((num_streams, block_size - 1, heads, dim), fill, dtype, device,
                     _pad_tokens(block_size, stride, padding))
    return StreamState(pending, zeros, zeros.clone(), block_size, stride, padding, fill)


def _stream_mask(fn: str, streams, n: int) -> list[bool]:
    """A host list of N booleans from a bool mask (N,) or a collection of stream indices."""
    if isinstance(streams, torch.Tensor):
        if streams.dtype == torch.bool:
            if tuple(streams.shape) != (n,):
                raise ValueError(f"{fn}: a boolean streams mask must have shape (N,) = ({n},), "
                                 f"got {tuple(streams.shape)}")
            return streams.tolist()
        if streams.dtype not in INDEX_DTYPES or streams.dim() > 1:
            raise TypeError(f"{fn}: streams must be a bool mask (N,) or int32/int64 indices, got dtype "
                            f"{streams.dtype} shape {tuple(streams.shape)}")
        streams = streams.reshape(-1).tolist()
    try:
        idx = list(streams)
    except TypeError:
        raise TypeError(f"{fn}: streams must be a bool mask (N,) or a collection of stream indices, "
                        f"got {type(streams).__name__}") from None
    if not all(_is_int(i) for i in idx):
        raise TypeError(f"{fn}: stream indices must be ints, got {idx[:16]}")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"{fn}: stream indices must be in [0, N={n}), got {bad[:16]}")
    mask = [False] * n
    for i in idx:
        mask[int(i)] = True
    return mask


def reset(state: StreamState, streams) -> StreamState:
    """A new state in which the chosen streams start over (the others are unchanged).

    streams: a bool tensor (N,) or a list/tuple/int tensor of stream
    indices. A reset stream holds what a fresh one holds: nothing, or the
    L - S pad zeros with padding="left"; its counters are 0.
    Raises TypeError/ValueError naming ``state`` or ``streams``.
    """
    fn = "reset"
    if not isinstance(state, StreamState):
        raise TypeError(f"{fn}: state must be a StreamState, got {type(state).__name__}")
    mask = torch.tensor(_stream_mask(fn, streams, state.num_streams), dtype=torch.bool).to(state.device)  # [N]
    fresh = _fresh((1, *state.pending.shape[1:]), state.fill, state.dtype, state.device,
                   state.pad_tokens)                                                # [1, L-1, H, D]
    pending = torch.where(mask[:, None, None, None], fresh, state.pending)           # [N, L-1, H, D]
    zero = torch.zeros((), dtype=torch.int64, device=state.device)
    return StreamState(pending, torch.where(mask, zero, state.n_tokens), torch.where(mask, zero, state.n_windows),
                       state.block_size, state.stride, state.padding, state.fill)


def _check_step_args(fn, kind, state, x, cu_new, pe, backend, kind_kwargs, more=()) -> None:
    """Everything a step can check without reading device values. ``more``:
    the kind's per-token inputs after x (gated_pool's z)."""
    check_choice(fn, "kind", kind, _kinds.KINDS)
    if not isinstance(state, StreamState):
        raise TypeError(f"{fn}: state must be a StreamState (see init_state), got {type(state).__name__}")
    inputs = _kinds.get(kind).inputs
    if state.dim % len(inputs):
        raise ValueError(f"{fn}: {kind} keeps its inputs {inputs} side by side in the state, so init_state's dim "
                         f"must be {len(inputs)} * D; got a state of dim {state.dim}")
    if state.padding == "left" and state.fill != _kinds.get(kind).pad_fill:
        raise ValueError(f"{fn}: state holds left pads of value {state.fill}, but {kind} pads with "
                         f"{_kinds.get(kind).pad_fill}: make the state with init_state(..., kind={kind!r})")
    H, D = state.heads, state.dim // len(inputs)
    for name, t in zip(inputs, (x, *more)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor (1, H, T_new, D), got {type(t).__name__}")
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != H or t.shape[3] != D or t.shape[2] != x.shape[2]:
            raise ValueError(f"{fn}: {name} must have shape (1, H={H}, T_new, D={D}) (the new tokens of all "
                             f"streams, packed), got {tuple(t.shape)}")
        if t.dtype != state.dtype:
            raise TypeError(f"{fn}: {name} must have the state's dtype {state.dtype}, got {t.dtype}")
        if t.device != state.device:
            raise ValueError(f"{fn}: {name} must be on the state's device {state.device}, got {t.device}")
    if not isinstance(cu_new, torch.Tensor):
        raise TypeError(f"{fn}: cu_new must be a torch.Tensor of int32/int64 offsets, got {type(cu_new).__name__}")
    if cu_new.dtype not in INDEX_DTYPES:
        raise TypeError(f"{fn}: cu_new must have dtype int32 or int64, got {cu_new.dtype}")
    N = state.num_streams
    if tuple(cu_new.shape) != (N + 1,):
        raise ValueError(f"{fn}: cu_new must have shape (N+1,) = ({N + 1},), one offset per stream of the state "
                         f"plus one, got {tuple(cu_new.shape)}")
    if cu_new.device != x.device:
        raise ValueError(f"{fn}: cu_new must be on x's device {x.device}, got {cu_new.device}")
    rec = _kinds.get(kind)
    extra = [k for k in kind_kwargs if k not in rec.option_names]
    if extra:
        raise TypeError(f"{fn}: {kind} takes no keyword arguments {extra} here (allowed: {list(rec.option_names)}; "
                        f"block_size, stride, padding and cu_seqlens come from the state and cu_new)")
    for o in rec.options:
        if o.name in kind_kwargs and o.choices is not None:
            check_choice(fn, o.name, kind_kwargs[o.name], o.choices)
    if rec.pe:
        check_pe(fn, pe, x, state.block_size)
    elif pe is not None:
        raise TypeError(f"{fn}: {kind} takes no pe (got a {type(pe).__name__})")
    if not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a str, 'auto' or a backend name, got {type(backend).__name__}")
    if backend != "auto":
        _backends.get(kind, backend)


def _ranges(first: list[int], length: list[int]) -> np.ndarray:
    """The concatenation of arange(first[k], first[k] + length[k]) over k, int64.

    Built on the host with NumPy: the step knows these sizes already, and
    tiny torch ops would each pay a parallel-region start on the CPU."""
    n = np.asarray(length, dtype=np.int64)
    start = np.asarray(first, dtype=np.int64) - (np.cumsum(n) - n)
    return np.repeat(start, n) + np.arange(int(n.sum()), dtype=np.int64)


def _copy_segments(out, pending, xt, out_first, p_first, p_len, n_first, n_len, device) -> None:
    """Fill out[out_first[k] + r] for each stream k: with pending[p_first[k] + r]
    for r < p_len[k], then with xt[n_first[k] + r - p_len[k]] for
    p_len[k] <= r < p_len[k] + n_len[k] (its pending, then its new tokens).

    out (U, H, D), pending (N*(L-1), H, D), xt (T_new, H, D), all on ``device``.
    """
    idx = [_ranges(out_first, p_len), _ranges(p_first, p_len),
           _ranges([o + p for o, p in zip(out_first, p_len)], n_len), _ranges(n_first, n_len)]
    sizes = [len(i) for i in idx]
    dst_p, src_p, dst_n, src_n = torch.from_numpy(np.concatenate(idx)).to(device).split(sizes)  # one copy
    out.index_copy_(0, dst_p, pending.index_select(0, src_p))
    out.index_copy_(0, dst_n, xt.index_select(0, src_n))


def step(kind: str, state: StreamState, x: torch.Tensor, cu_new: torch.Tensor, *params, pe=None,
         backend: str = "auto", **kind_kwargs) -> StepOutput:
    """Feed new tokens to N streams; return what they complete and the new state.

    kind: one of ``kvcompress.kinds.KINDS``.
    state: the StreamState (N streams, H heads, D dims, dtype, device). A
        kind with several per-token inputs (gated_pool: x and z) keeps them
        side by side: its state has dim n_inputs * D.
    x: (1, H, T_new, D), state's dtype and device, any strides: the new
        tokens of all streams packed in stream order (the cu_seqlens
        convention of kvcompress.functional).
    cu_new: (N+1,) int32/int64 on x's device, 0 = cu_new[0] <= ... <=
        cu_new[N] = T_new; stream k receives x[:, :, cu_new[k]:cu_new[k+1]]
        (zero tokens allowed).
    *params: the kind's other inputs (gated_pool's z, shaped like x) and
        parameters, positional as in kvcompress.functional (linear: weight,
        bias; mlp: w1, b1, w2, b2; gated_pool: z, bias), x's dtype/device.
    pe: (H, L, D) or None, default None; added at window position j as in
        the full pass (pad zeros of padding="left" included).
    backend: "auto" (default) or a registered backend name.
    **kind_kwargs: the kind's options (mlp's ``activation``, gated_pool's
        ``split``).

    Returns StepOutput(y, cu_y, state): y (1, H, W_new, D_out) the newly
    completed compressed tokens packed in stream order, cu_y (N+1,) their
    offsets (cu_new's dtype), and the new state. Pure: ``state`` itself is
    never modified. Window i of a stream is emitted by the step that
    delivers its token i*S + L - 1 (valid) or (i+1)*S - 1 (left).

    Raises, before computing: ValueError/TypeError naming ``kind``,
    ``state`` (also when its counters are inconsistent), ``x``, ``cu_new``,
    ``pe``, ``activation``, ``backend`` or an unexpected keyword; the kind's
    weights are checked by kvcompress.functional before its backend runs.
    Reads the counters and cu_new on the host (a synchronisation on CUDA,
    as is kvcompress.functional's reading of cu_seqlens).
    """
    fn = "step"
    n_more = len(_kinds.get(kind).inputs) - 1 if kind in _kinds.KINDS else 0
    if len(params) < n_more:
        raise TypeError(f"{fn}: {kind} takes the inputs {_kinds.get(kind).inputs} before its parameters")
    more, params = params[:n_more], params[n_more:]
    _check_step_args(fn, kind, state, x, cu_new, pe, backend, kind_kwargs, more)
    if more:   # the state keeps a kind's inputs side by side: (1, H, T_new, n_in * D)
        x = torch.cat([x, *more], dim=3)
    N, L, S, H, D = state.num_streams, state.block_size, state.stride, state.heads, state.dim
    C, T_new = L - 1, x.shape[2]
    vals = torch.cat([state.n_tokens, state.n_windows, cu_new.to(torch.int64)]).tolist()
    n_tok, n_win, cu = vals[:N], vals[N:2 * N], vals[2 * N:]
    if cu[0] != 0 or cu[-1] != T_new or any(a > b for a, b in zip(cu, cu[1:])):
        shown = cu if len(cu) <= 16 else cu[:8] + ["..."] + cu[-4:]
        raise ValueError(f"{fn}: cu_new must be non-decreasing from 0 to T_new={T_new}, got {shown}")

    pad = state.pad_tokens
    p = [t + pad - w * S for t, w in zip(n_tok, n_win)]         # pending tokens, each < L
    if any(t < 0 or v != num_windows(t, L, S, state.padding) for t, v in zip(n_tok, n_win)):
        raise ValueError(f"{fn}: state is inconsistent: its n_windows must be num_windows(n_tokens) with "
                         f"n_tokens >= 0, got n_tokens {n_tok[:16]}, n_windows {n_win[:16]}")
    n = [b - a for a, b in zip(cu, cu[1:])]                     # new tokens
    c = [pk + nk for pk, nk in zip(p, n)]                       # pending + new: starts at a window start
    w = [num_windows(ck, L, S, "valid") for ck in c]            # windows completed now
    used = [(wk - 1) * S + L if wk else 0 for wk in w]          # tokens those windows cover
    keep = [wk * S for wk in w]                                 # first token of the next window (<= c[k])
    device = x.device
    xt = x[0].transpose(0, 1)                                   # [T_new, H, D], a view
    flat = state.pending.reshape(N * C, H, D)                   # [N*(L-1), H, D]

    # the tokens of the completed windows, stream after stream: every used
    # token is written (used[k] >= L > p[k] whenever w[k] > 0); NaN first,
    # so that a token left unwritten by a bug would poison its window
    ends = list(accumulate(used))
    out_first = [e - u for e, u in zip(ends, used)]
    x_cat = x.new_full((sum(used), H, D), float("nan"))         # [U, H, D]
    _copy_segments(x_cat, flat, xt, out_first, [k * C for k in range(N)], [pk if u else 0 for pk, u in zip(p, used)],
                   cu[:-1], [u - pk if u else 0 for pk, u in zip(p, used)], device)
    cu_cat = torch.tensor([0] + ends, dtype=torch.int64, device=device)
    x_in = x_cat.permute(1, 0, 2).unsqueeze(0).split(D // (n_more + 1), dim=3)   # n_in x [1, H, U, D]
    if _kinds.get(kind).pe:
        kind_kwargs = dict(kind_kwargs, pe=pe)
    y = getattr(_functional, kind)(*x_in, *params, block_size=L, stride=S, padding="valid", cu_seqlens=cu_cat,
                                   backend=backend, **kind_kwargs)

    # what the next window needs: tokens keep[k] .. c[k] of pending + new
    a = [min(kk, pk) for kk, pk in zip(keep, p)]                # first pending token kept
    b = [max(kk - pk, 0) for kk, pk in zip(keep, p)]            # first new token kept
    pending = torch.zeros(state.pending.shape, dtype=state.dtype, device=device)   # [N, L-1, H, D]
    _copy_segments(pending.view(N * C, H, D), flat, xt, [k * C for k in range(N)],
                   [k * C + ak for k, ak in enumerate(a)], [pk - ak for pk, ak in zip(p, a)],
                   [ck + bk for ck, bk in zip(cu[:-1], b)], [nk - bk for nk, bk in zip(n, b)], device)
    counts = torch.tensor([[t + nk for t, nk in zip(n_tok, n)], [v + wk for v, wk in zip(n_win, w)]],
                          dtype=torch.int64).to(device)                              # [2, N]
    cu_y = torch.tensor([0] + list(accumulate(w)), dtype=cu_new.dtype, device=device)
    new_state = StreamState(pending, counts[0].contiguous(), counts[1].contiguous(), L, S, state.padding, state.fill)
    return StepOutput(y, cu_y, new_state)


class StreamingCompressor:
    """A kind, its parameters and a StreamState, stepped together.

    kind: as in ``step``. *params: the kind's parameters (positional, as
    in kvcompress.functional, without its per-token inputs: gated_pool's
    bias only). state: a StreamState (``init_state``; gated_pool's with
    kind="gated_pool"). pe: (H, L, D) or None. backend: "auto" or a backend
    name. **kind_kwargs: the kind's options (mlp's ``activation``,
    gated_pool's ``split``).

    ``step(x, cu_new, *inputs)`` (gated_pool: ``step(x, cu_new, z)``, z the
    new gate scores shaped like x) returns (y, cu_y) and replaces
    ``self.state`` only when the step succeeded: after an error the state
    is the one before.
    ``reset(streams)`` starts the chosen streams over (all when None).
    Raises TypeError naming ``state`` when it is not a StreamState.
    """

    def __init__(self, kind: str, *params, state: StreamState, pe=None, backend: str = "auto", **kind_kwargs):
        if not isinstance(state, StreamState):
            raise TypeError(f"StreamingCompressor: state must be a StreamState, got {type(state).__name__}")
        check_choice("StreamingCompressor", "kind", kind, _kinds.KINDS)
        self.kind, self.params, self.state = kind, params, state
        self.pe, self.backend, self.kind_kwargs = pe, backend, kind_kwargs

    def step(self, x: torch.Tensor, cu_new: torch.Tensor, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (1, H, W_new, D_out), cu_y (N+1,)) for new tokens x (1, H, T_new, D) at offsets cu_new (N+1,);
        ``inputs``: the kind's other per-token inputs of this step (gated_pool's z), shaped like x."""
        n_more = len(_kinds.get(self.kind).inputs) - 1
        if len(inputs) != n_more:
            raise TypeError(f"StreamingCompressor.step: {self.kind} takes the inputs {_kinds.get(self.kind).inputs} "
                            f"(x, cu_new{', ' if n_more else ''}{', '.join(_kinds.get(self.kind).inputs[1:])}): "
                            f"the new tokens of each, got {len(inputs)} after cu_new")
        out = step(self.kind, self.state, x, cu_new, *inputs, *self.params, pe=self.pe, backend=self.backend,
                   **self.kind_kwargs)
        self.state = out.state
        return out.y, out.cu_y

    def reset(self, streams=None) -> None:
        """Start the chosen streams over: a bool mask (N,) or stream indices; None: every stream."""
        self.state = reset(self.state, range(self.state.num_streams) if streams is None else streams)
