"""Streaming compression, the loop definition (docs/streaming.md).

N streams receive tokens a few at a time. Each stream keeps the tokens a
future window still needs, oldest first; with ``padding="left"`` a fresh
stream holds L - S zero tokens (the pad of SPEC section 2). Tokens are
appended one by one; whenever L tokens are pending they form the next
window, which is compressed right then by the kind's reference function
(``pe`` at window position j, as in the full pass) and the first S tokens
are dropped. So window i of a stream is emitted with its token
i*S + L - 1 (valid) or (i+1)*S - 1 (left), and a stream never holds more
than L - 1 tokens between tokens.

Slow on purpose, obvious by reading; NumPy only (float16/32/64, bfloat16
through ml_dtypes), no torch, no kvcompress.
"""

from __future__ import annotations

import importlib

import numpy as np

from ._windows import check_window_args

__all__ = ["StreamState", "compressor", "init_state", "reset", "step"]


def compressor(kind):
    """(the reference function of ``kind``, its per-token inputs, the value
    of a left pad per input): found by name, ``reference/<kind>.py``
    defining ``<kind>`` and, where they differ from (x,) and (0.0,),
    ``INPUTS`` and ``PAD_FILL`` (gated_pool: ("x", "z") and (0.0, -inf))."""
    try:
        module = importlib.import_module(f"{__package__}.{kind}")
        return getattr(module, kind), getattr(module, "INPUTS", ("x",)), getattr(module, "PAD_FILL", (0.0,))
    except (ImportError, AttributeError, TypeError):
        raise ValueError(f"kind {kind!r} has no reference (reference/<kind>.py defining <kind>)") from None


class StreamState:
    """The state of N streams.

    block_size (L), stride (S), padding, heads (H), dim (D), dtype, fill
    (the value of a left pad token, one per input kept side by side): fixed.
    pending[k]: list of stream k's pending tokens, each a (H, D) array of
    ``dtype``, oldest first (pad zeros included). n_tokens[k]: tokens
    received; n_windows[k]: windows emitted.
    """

    def __init__(self, num_streams, heads, dim, *, block_size, stride, padding, dtype, fill=(0.0,)):
        block_size, stride = check_window_args(block_size, stride, padding)
        self.block_size, self.stride, self.padding = block_size, stride, padding
        self.heads, self.dim, self.dtype, self.fill = heads, dim, np.dtype(dtype), tuple(fill)
        self.pending = [self.fresh() for _ in range(num_streams)]
        self.n_tokens = [0] * num_streams
        self.n_windows = [0] * num_streams

    def fresh(self):
        """What a new stream holds: L - S pad tokens with left padding, else nothing."""
        pad = self.block_size - self.stride if self.padding == "left" else 0
        token = np.repeat(np.asarray(self.fill, dtype=self.dtype), self.dim // len(self.fill))   # (dim,)
        return [np.broadcast_to(token, (self.heads, self.dim)).copy() for _ in range(pad)]

    def copy(self):
        new = object.__new__(StreamState)
        new.__dict__.update(self.__dict__)
        new.pending = [[t.copy() for t in p] for p in self.pending]
        new.n_tokens, new.n_windows = list(self.n_tokens), list(self.n_windows)
        return new


def init_state(num_streams, heads, dim, *, block_size, stride, padding="valid", dtype=np.float64, kind=None):
    """A state of ``num_streams`` fresh streams of (heads, dim) tokens of
    ``dtype``; ``kind`` (default None: pads are zero tokens) sets the pads'
    value (gated_pool's: value 0, score -inf, side by side in dim = 2 D)."""
    fill = (0.0,) if kind is None else compressor(kind)[2]
    return StreamState(num_streams, heads, dim, block_size=block_size, stride=stride, padding=padding, dtype=dtype,
                       fill=fill)


def reset(state, streams):
    """A new state where the streams whose indices are in ``streams`` start over."""
    new = state.copy()
    for k in streams:
        new.pending[k] = new.fresh()
        new.n_tokens[k] = 0
        new.n_windows[k] = 0
    return new


def step(kind, state, x, cu_new, *params, pe=None, **kind_kwargs):
    """Feed new tokens to every stream.

    x: (1, H, T_new, D) array of the state's dtype, the new tokens packed
    in stream order; cu_new: (N+1,) integer offsets, stream k receives
    tokens cu_new[k] .. cu_new[k+1] - 1. params, pe, kind_kwargs: as for
    the kind's reference function; a kind with more per-token inputs
    (gated_pool's z) takes them first in params, and its state keeps them
    side by side with x (dim = n_inputs * D).
    Returns (y, cu_y, new_state): y (1, H, W_new, D_out) in x's dtype, the
    completed windows of stream 0, then stream 1, ...; cu_y (N+1,) their
    offsets. ``state`` is not modified.
    """
    fn, inputs, fill = compressor(kind)
    if state.padding == "left" and state.fill != fill:
        raise ValueError(f"state holds left pads of value {state.fill}, but {kind} pads with {fill}: make it with "
                         f"init_state(..., kind={kind!r})")
    more, params = params[:len(inputs) - 1], params[len(inputs) - 1:]
    x = np.concatenate([np.asarray(x), *(np.asarray(t) for t in more)], axis=3)
    kw = dict(kind_kwargs, **({} if pe is None else {"pe": pe}))
    D = state.dim // len(inputs)

    def compress(tokens):   # (1, H, n, n_in * D) -> the kind on its inputs
        parts = [tokens[..., i * D:(i + 1) * D] for i in range(len(inputs))]
        return fn(*parts, *params, block_size=L, stride=S, padding="valid", **kw)

    L, S = state.block_size, state.stride
    cu = [int(c) for c in np.asarray(cu_new)]
    N = len(state.pending)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != state.heads or x.shape[3] != state.dim:
        raise ValueError(f"x must have shape (1, {state.heads}, T_new, {state.dim}), got {x.shape}")
    if x.dtype != state.dtype:
        raise TypeError(f"x must have the state's dtype {state.dtype}, got {x.dtype}")
    if len(cu) != N + 1 or cu[0] != 0 or cu[-1] != x.shape[2] or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_new must be N+1 = {N + 1} offsets non-decreasing from 0 to {x.shape[2]}, got {cu}")
    new = state.copy()
    out, cu_y = [], [0]
    for k in range(N):
        for t in range(cu[k], cu[k + 1]):
            new.pending[k].append(x[0, :, t, :].copy())
            new.n_tokens[k] += 1
            if len(new.pending[k]) == L:
                window = np.stack(new.pending[k], axis=1)[None]       # (1, H, L, D)
                # one window: T = L with padding="valid" gives exactly it
                y = compress(window)
                out.append(y[:, :, :1])
                new.n_windows[k] += 1
                del new.pending[k][:S]
        cu_y.append(len(out))
    if not out:
        # no window completed: the compressor on no tokens gives the empty (1, H, 0, D_out)
        out.append(compress(x[:, :, :0]))
    return np.concatenate(out, axis=2), np.asarray(cu_y, dtype=np.asarray(cu_new).dtype), new
