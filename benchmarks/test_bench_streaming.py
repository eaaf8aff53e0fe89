"""Decode-step latency: kvcompress.streaming and kvcompress.decode against
recompressing the prefix.

NSA sizes: N = 64 streams, H = 4 KV heads, D = 128, L = 32, S = 16,
padding="left" (the seed's), one weight set per head; bfloat16 on CUDA,
float32 on the CPU. Every stream has received a prefix (PREFIX - 1 tokens,
default 4096 - 1; ``KVCOMPRESS_BENCH_PREFIX`` overrides) and gets one new
token per step:

- ``emit``: the new token (index PREFIX - 1) completes window
  PREFIX / S - 1 of every stream, the worst step;
- ``idle``: the next token completes no window (S - 1 of every S steps);
- ``recompress``: the baseline, ``kvcompress.functional`` over the whole
  prefix of all streams, of which only the last window is new;
- ``fixed``: ``kvcompress.decode.decode_step`` on a ``DecodeCache`` handed
  the same prefixes (docs/decoding.md): fixed shapes, no host read, the
  same work whether a stream emits or not (each round is the next decoding
  step of the same cache; eager, where the GPU's CUDA-graph replay of it is
  issue 15's work).

Correctness is checked before anything is timed: the emitting step's
tokens equal the recompression's last windows (bit for bit where
the torch backend declares itself batch-invariant, else within the tolerance
model), and the idle step emits nothing; the fixed step's first call emits
for every stream, the same tokens as the streaming step's (the same rule). CI runs this file with
``--benchmark-disable`` (each callable once, correctness only); timings
come from ``python -m pytest benchmarks/test_bench_streaming.py --benchmark-only``.

On CUDA every timed callable ends with torch.cuda.synchronize(): kernels
are asynchronous, so without it the timer would stop when the launches
return, not when the work is done.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kvcompress.decode as kd
import kvcompress.functional as kf
import kvcompress.streaming as ks
from kvcompress import backends as kb
from kvcompress.testing.cases import Case, Inputs
from kvcompress.testing.convert import to_numpy
from kvcompress.testing.tolerance import forward_bound

N, H, D, L, S = 64, 4, 128, 32, 16
PADDING = "left"
PREFIX = int(os.environ.get("KVCOMPRESS_BENCH_PREFIX", "4096"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
DTYPE_NAME = "bfloat16" if DEVICE == "cuda" else "float32"
KINDS = ("linear", "mean_pool")

assert PREFIX % S == 0 and PREFIX >= L, "the emitting step needs PREFIX to end a window"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _params(kind, gen):
    if kind == "linear":
        w = torch.randn(H, L, D, D, generator=gen) / (L * D) ** 0.5   # [G=H, L, D, D_out]
        return (w.to(DEVICE, DTYPE), None)
    return ()


class Setup:
    """Tokens, parameters, the two states and the emitting step's output for one kind."""

    def __init__(self, kind):
        gen = torch.Generator().manual_seed(0)
        self.kind = kind
        self.params = _params(kind, gen)
        self.x = torch.randn(N, H, PREFIX + 1, D, generator=gen).to(DEVICE, DTYPE)   # [N, H, PREFIX + 1, D]
        P = PREFIX - 1
        prefill = self.x[:, :, :P].transpose(0, 1).reshape(1, H, N * P, D)          # [1, H, N*P, D] packed
        cu = torch.arange(N + 1, device=DEVICE) * P
        state = ks.init_state(N, H, D, block_size=L, stride=S, padding=PADDING, dtype=DTYPE, device=DEVICE)
        self.before_emit = self.step(state, prefill, cu).state
        self.cu_one = torch.arange(N + 1, device=DEVICE)                            # one token per stream
        self.emit_x = self.token(PREFIX - 1)
        self.emitted = self.step(self.before_emit, self.emit_x, self.cu_one)
        self.before_idle = self.emitted.state
        self.idle_x = self.token(PREFIX)
        self.prefill, self.cu_prefill = prefill, cu

    def decode_cache(self):
        """A DecodeCache of the N streams, handed the PREFIX - 1 token prefixes."""
        cache = kd.DecodeCache(self.kind, N, H, D, block_size=L, stride=S, padding=PADDING, dtype=DTYPE,
                               device=DEVICE)
        cache.add(torch.arange(N, device=DEVICE), kd.last_tokens(self.prefill, self.cu_prefill, L - 1),
                  n_tokens=torch.full((N,), PREFIX - 1, device=DEVICE))
        return cache

    def token(self, t):
        """Token t of every stream, packed: (1, H, N, D), a strided view."""
        return self.x[:, :, t].transpose(0, 1).unsqueeze(0)

    def step(self, state, x, cu):
        return ks.step(self.kind, state, x, cu, *self.params)

    def recompress(self, T):
        """The full pass over the first T tokens of every stream: (N, H, W, D_out)."""
        return getattr(kf, self.kind)(self.x[:, :, :T], *self.params, block_size=L, stride=S, padding=PADDING)

    def check_emitted(self):
        """Check the emitting step against one recompression of the prefix, once."""
        if not getattr(self, "checked", False):
            self.full = self.recompress(PREFIX)          # kept for the fixed step's check
            _check_emitted(self, self.full)
            self.checked = True


_SETUPS: dict[str, Setup] = {}


@pytest.fixture
def setup(kind):
    if kind not in _SETUPS:
        _SETUPS.clear()          # one kind's tokens at a time (0.5 GB in float32)
        _SETUPS[kind] = Setup(kind)
    return _SETUPS[kind]


def _check_emitted(s: Setup, full, y=None):
    """The emitting step's tokens (the streaming step's, or ``y`` (1, H, N,
    D_out)) against the recompression's last windows."""
    if y is None:
        y, cu_y = s.emitted.y, s.emitted.cu_y                   # [1, H, N, D_out], [N+1]
        assert cu_y.tolist() == list(range(N + 1)), "every stream must emit exactly one window"
    last = full[:, :, -1].transpose(0, 1).unsqueeze(0)          # [1, H, N, D_out]
    if kb.get(s.kind, "torch").batch_invariant:
        assert torch.equal(y, last), f"{s.kind}: streamed != recompressed, not bit for bit"
        return
    # within the tolerance model: the last window of every stream is tokens
    # [PREFIX - L, PREFIX), one "valid" window each; both computations are
    # within their bound of the exact value, so they differ by at most 2x it
    x64 = to_numpy(s.x[:, :, PREFIX - L:PREFIX].transpose(0, 1).reshape(1, H, N * L, D))
    case = Case(kind=s.kind, dtype=DTYPE_NAME, B=1, H=H, G=H, T=N * L, D=D, block_size=L, stride=S,
                padding="valid", seqlens=(L,) * N, D_out=D)
    params64 = {"weight": to_numpy(s.params[0]), "bias": None} if s.kind == "linear" else {}
    bound = forward_bound(case, Inputs(x64, params64, None, None, {}, None, None, None)).bound
    err = np.abs(to_numpy(y) - to_numpy(last))
    assert (err <= 2 * bound).all(), f"{s.kind}: worst error / bound {np.max(err / (2 * bound)):.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_decode_step_emit(benchmark, kind, setup):
    setup.check_emitted()
    benchmark.group = f"{kind}: one token for {N} streams"

    def run():
        out = setup.step(setup.before_emit, setup.emit_x, setup.cu_one)
        _sync()
        return out

    out = benchmark(run)
    assert torch.equal(out.y, setup.emitted.y)      # a pure step: the same work every round


@pytest.mark.parametrize("kind", KINDS)
def test_decode_step_idle(benchmark, kind, setup):
    out = setup.step(setup.before_idle, setup.idle_x, setup.cu_one)
    assert out.y.shape[2] == 0 and out.cu_y.tolist() == [0] * (N + 1), "token PREFIX completes no window"
    assert kf.num_windows(PREFIX + 1, L, S, PADDING) == kf.num_windows(PREFIX, L, S, PADDING), \
        "and the full pass has no new window either"
    benchmark.group = f"{kind}: one token for {N} streams"

    def run():
        out = setup.step(setup.before_idle, setup.idle_x, setup.cu_one)
        _sync()
        return out

    benchmark(run)


@pytest.mark.parametrize("kind", KINDS)
def test_recompress_prefix(benchmark, kind, setup):
    setup.check_emitted()
    benchmark.group = f"{kind}: one token for {N} streams"

    def run():
        out = setup.recompress(PREFIX)
        _sync()
        return out

    # each round recompresses N * PREFIX tokens: a few rounds suffice
    full = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert full.shape == (N, H, PREFIX // S, setup.emitted.y.shape[3])


@pytest.mark.parametrize("kind", KINDS)
def test_decode_fixed_step(benchmark, kind, setup):
    cache = setup.decode_cache()
    x_new = setup.x[:, :, PREFIX - 1]                            # [N, H, D]: token PREFIX - 1 of every stream
    y, emitted = kd.decode_step(kind, cache, x_new, *setup.params)
    assert bool(emitted.all()), "token PREFIX - 1 completes a window of every stream"
    setup.check_emitted()
    _check_emitted(setup, setup.full, y.transpose(0, 1).unsqueeze(0))
    benchmark.group = f"{kind}: one token for {N} streams"
    x_next = setup.x[:, :, PREFIX]

    def run():   # the cache's next steps: the fixed step costs the same whether a stream emits or not
        out = kd.decode_step(kind, cache, x_next, *setup.params)
        _sync()
        return out

    benchmark(run)
