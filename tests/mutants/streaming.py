"""Streaming mutants: kvcompress.streaming (docs/streaming.md) gone wrong.

The streaming properties (tests/test_streaming.py) verify the built-in
backends through ``kvcompress.streaming``; they take no ``--impl``. So a
streaming mutant is a set of monkeypatches on that module: a function
``(ks) -> {attribute: replacement}`` that receives the module and returns
what to replace in it (wrapping the real function where it can, so that
validation stays real). ``tests/test_streaming_mutants.py`` runs the
streaming properties with each mutant applied and requires one of them to
fail on an assertion, and the same properties, on the same examples,
to pass without it.

Registered with ``@streaming_mutant(BUG_CLASS, kind=...)`` (``kind``: the
kind whose torch backend streams in the run); the docstring's first line
names the bug, the rest the real mistake it stands for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

RESET = "streaming: reset"
COUNTER = "streaming: counters"
OTHER_STREAM = "streaming: state of another stream"
PAD_FILL = "streaming: pad value"
STREAMING_CLASSES = (RESET, COUNTER, OTHER_STREAM, PAD_FILL)


@dataclass(frozen=True)
class StreamingMutant:
    """name, bug_class (one of STREAMING_CLASSES), kind (whose torch backend
    streams), patches ((ks) -> {attribute of kvcompress.streaming: replacement})."""

    name: str
    bug_class: str
    kind: str
    patches: Callable

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line: what the bug does."""
        return " ".join((self.patches.__doc__ or "").strip().split("\n\n")[0].split())


STREAMING_MUTANTS: list[StreamingMutant] = []


def streaming_mutant(bug_class: str, *, kind: str = "mean_pool") -> Callable[[Callable], Callable]:
    """Decorator: register ``(ks) -> {attribute: replacement}`` as a streaming
    mutant. Raises ValueError for an unknown class or a missing docstring."""
    if bug_class not in STREAMING_CLASSES:
        raise ValueError(f"streaming_mutant: bug_class must be one of {STREAMING_CLASSES}, got {bug_class!r}")

    def deco(fn: Callable) -> Callable:
        if not (fn.__doc__ or "").strip():
            raise ValueError(f"streaming_mutant: {fn.__name__} needs a docstring naming its bug")
        STREAMING_MUTANTS.append(StreamingMutant(fn.__name__, bug_class, kind, fn))
        return fn

    return deco


@streaming_mutant(RESET)
def reset_drops_pending(ks):
    """A reset empties the pending tokens of every stream; only the chosen streams' counters restart.

    A reset that re-initialises the whole pending buffer (``pending.zero_()``
    on the batch's state, or a fresh buffer) and restores only the counters
    of the streams that go on: those keep counting tokens they no longer
    hold, and their next windows read zeros."""
    real = ks.reset

    def reset(state, streams):
        new = real(state, streams)                                  # validation, the chosen streams' counters
        every = real(state, range(state.num_streams))               # every stream's buffer as fresh
        return ks.StreamState(every.pending, new.n_tokens, new.n_windows, state.block_size, state.stride,
                              state.padding, state.fill)

    return {"reset": reset}


@streaming_mutant(COUNTER)
def counters_advance_only_on_emit(ks):
    """A step advances a stream's counters only when it completes a window:
    tokens of a step that emits nothing are not counted.

    A step whose counter update sits in the emit branch (``if n_complete:
    n_tokens += n_new; n_windows += n_complete``): the counters stay
    consistent with each other, so no check trips, but the stream holds
    tokens it does not count, and the next step reads past them (decoding
    one token at a time loses every token that completes no window)."""
    real = ks.step

    def step(kind, state, x, cu_new, *args, **kwargs):
        out = real(kind, state, x, cu_new, *args, **kwargs)
        emitted = (out.cu_y[1:] - out.cu_y[:-1] > 0).to(state.device)              # [N]
        n_tokens = torch.where(emitted, out.state.n_tokens, state.n_tokens)
        return out._replace(state=dataclasses.replace(out.state, n_tokens=n_tokens))

    return {"step": step}


@streaming_mutant(OTHER_STREAM)
def pending_read_stream_minor(ks):
    """A step reads the pending tokens (N, L-1, H, D) as if stored
    (L-1, N, H, D): streams continue from other streams' tokens.

    A kernel that indexes the state buffer as ``row * N + stream`` where it
    is stored ``stream * (L - 1) + row``: right for a single stream, which
    is how a decoding kernel is often first tested; the state it writes is
    laid out right."""
    real = ks.step

    def step(kind, state, *args, **kwargs):
        if isinstance(state, ks.StreamState):
            N, C = state.pending.shape[:2]
            misread = state.pending.reshape(C, N, *state.pending.shape[2:]).transpose(0, 1).contiguous()
            state = dataclasses.replace(state, pending=misread)
        return real(kind, state, *args, **kwargs)

    return {"step": step}


@streaming_mutant(PAD_FILL, kind="gated_pool")
def reset_refills_zero_pads(ks):
    """A reset stream gets zero pad tokens instead of its kind's pads (gated_pool: score -inf).

    ``reset`` written before kinds had pad values: it refills the L - S left
    pads with zeros, so after a reset a gated_pool stream weights its pads
    as tokens of score 0; a fresh state (``init_state(..., kind=)``) is right."""
    real = ks.reset

    def reset(state, streams):
        new = real(dataclasses.replace(state, fill=(0.0,)), streams)
        return dataclasses.replace(new, fill=state.fill)

    return {"reset": reset}
