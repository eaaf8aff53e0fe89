"""The decoding step's data movement in two Triton kernels
(``kvcompress.decode``; docs/decoding.md, "The Triton step").

A step of ``decode_step`` written in torch is some twenty small operations
(index arithmetic, a gather, a concatenation, a masked ring write, counter
updates, the output's mask): replayed from a CUDA graph they cost more than
the compression itself. Here they are two launches around it:

- ``ring_window``: for every stream n and head h, the window that ends at
  the new token (L - 1 ring slots in order, then the new token) written to
  ``win`` (any strides; the features of every per-token input side by
  side), and per stream whether the new token ends a window of the full
  pass (``emitted``). Nothing of the cache is written, so an error in the
  compression leaves the cache as it was.
- ``ring_advance``: after the compression, per stream, the new token
  written into its ring slot (active streams), the counters advanced, and
  the output row: the compressed token where the stream emitted, else 0.

Shapes: N streams, H heads, L = block_size, D per input, n_in inputs (1 or
2), ring (N, L, H, n_in * D) contiguous, counters (N,) int64, active and
emitted (N,) bool. Positions are left-padded: the new token of stream n is
position u = n_tokens[n] + PRE (PRE = L - S with padding "left", else 0),
held in slot u mod L once written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import jit_kernel, next_pow2

__all__ = ["ring_advance", "ring_window"]

MAX_BLOCK_D = 128   # features per tile (a window tile is L x this)


@triton.jit
def _window_input(ring, tok, win, n, h, j, slot, L, srn, srl, srh, stn, sth, std, swn, swh, swl, swd,
                  OFF: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One per-token input (features OFF .. OFF + D - 1 of the ring and of
    win) of window (n, h): ring slots for j < L - 1, the new token at j = L - 1."""
    from_ring = j < L - 1
    is_new = j == L - 1
    for d0 in tl.static_range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        vals = tl.load(ring + n * srn + slot[:, None] * srl + h * srh + (OFF + d)[None, :],
                       mask=from_ring[:, None] & dm[None, :], other=0.0)
        new = tl.load(tok + n * stn + h * sth + d * std, mask=dm, other=0.0)
        vals = tl.where(is_new[:, None], new[None, :].to(vals.dtype), vals)
        tl.store(win + n * swn + h * swh + j[:, None] * swl + (OFF + d)[None, :] * swd, vals,
                 mask=(j < L)[:, None] & dm[None, :])


@triton.jit
def _advance_input(ring, tok, n, h, slot, act, srn, srl, srh, stn, sth, std, OFF: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One per-token input of stream n, head h: the new token into its ring
    slot, where the stream is active."""
    for d0 in tl.static_range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        # the flag broadcast explicitly: Triton's interpreter rejects a mask of block & scalar
        m = dm & (tl.zeros([BLOCK_D], tl.int32) + act != 0)
        new = tl.load(tok + n * stn + h * sth + d * std, mask=m, other=0.0)
        tl.store(ring + n * srn + slot * srl + h * srh + OFF + d, new.to(ring.dtype.element_ty), mask=m)


@jit_kernel
def ring_window_kernel(ring, tok0, tok1, n_tokens, active, win, emitted, L, S, PRE,
                       srn, srl, srh, st0n, st0h, st0d, st1n, st1h, st1d, swn, swh, swl, swd,
                       D: tl.constexpr, N_IN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (n, h): win[n, h, j, i*D + d] = position u - L + 1 + j of
    input i (j < L - 1 from the ring, j = L - 1 the new token); program
    (n, 0) also writes emitted[n]."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    u = tl.load(n_tokens + n) + PRE                                     # int64, >= 0
    j = tl.arange(0, BLOCK_L)
    # slot of position u - L + 1 + j: (u + 1 + j) mod L, the same residue, and never negative
    slot = (u + 1 + j) % L
    _window_input(ring, tok0, win, n, h, j, slot, L, srn, srl, srh, st0n, st0h, st0d, swn, swh, swl, swd,
                  0, D, BLOCK_D)
    if N_IN == 2:
        _window_input(ring, tok1, win, n, h, j, slot, L, srn, srl, srh, st1n, st1h, st1d, swn, swh, swl, swd,
                      D, D, BLOCK_D)
    if h == 0:
        act = tl.load(active + n).to(tl.int32)
        # u - (L - 1) may be negative; the remainder is then not read (u >= L - 1 fails)
        ends = ((u >= L - 1) & ((u - (L - 1)) % S == 0)).to(tl.int32)
        tl.store(emitted + n, (act * ends).to(tl.int1))


@jit_kernel
def ring_advance_kernel(ring, tok0, tok1, n_tokens, n_windows, active, emitted, y, out, H, L, PRE,
                        srn, srl, srh, st0n, st0h, st0d, st1n, st1h, st1d, syn, syh, syd, son, soh, sod,
                        D: tl.constexpr, DO: tl.constexpr, N_IN: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr):
    """Program n: the new token into slot u mod L (active streams only),
    out[n] = y[n] where emitted else 0, then n_tokens[n] += active and
    n_windows[n] += emitted. One program per stream: it reads the counters
    before it writes them."""
    n = tl.program_id(0)
    cnt = tl.load(n_tokens + n)
    u = cnt + PRE
    act = tl.load(active + n).to(tl.int32)                              # 0 or 1
    em = tl.load(emitted + n).to(tl.int32)
    slot = u % L
    for h in range(0, H):
        _advance_input(ring, tok0, n, h, slot, act, srn, srl, srh, st0n, st0h, st0d, 0, D, BLOCK_D)
        if N_IN == 2:
            _advance_input(ring, tok1, n, h, slot, act, srn, srl, srh, st1n, st1h, st1d, D, D, BLOCK_D)
        for e0 in tl.static_range(0, DO, BLOCK_DO):
            e = e0 + tl.arange(0, BLOCK_DO)
            em_ = e < DO
            emit = tl.zeros([BLOCK_DO], tl.int32) + em != 0
            v = tl.load(y + n * syn + h * syh + e * syd, mask=em_ & emit, other=0.0)
            # where, not a product: a NaN of a row that did not emit must not reach the output
            v = tl.where(emit, v, 0.0)
            tl.store(out + n * son + h * soh + e * sod, v.to(out.dtype.element_ty), mask=em_)
    tl.store(n_tokens + n, cnt + act.to(tl.int64))
    tl.store(n_windows + n, tl.load(n_windows + n) + em.to(tl.int64))


def _token_args(tokens: tuple[torch.Tensor, ...]) -> dict:
    t0 = tokens[0]
    t1 = tokens[1] if len(tokens) > 1 else t0
    return dict(tok0=t0, tok1=t1, st0n=t0.stride(0), st0h=t0.stride(1), st0d=t0.stride(2),
                st1n=t1.stride(0), st1h=t1.stride(1), st1d=t1.stride(2))


def ring_window(ring: torch.Tensor, tokens: tuple[torch.Tensor, ...], n_tokens: torch.Tensor,
                active: torch.Tensor, win: torch.Tensor, emitted: torch.Tensor, *, stride: int, pre: int) -> None:
    """Write every stream's window ending at its new token into ``win`` and
    whether it completes one into ``emitted``; the cache is only read.

    ring: (N, L, H, n_in*D) contiguous; tokens: n_in tensors (N, H, D), any
    strides, the ring's dtype; n_tokens: (N,) int64; active: (N,) bool;
    win: (N, H, L, n_in*D), any strides, the ring's dtype (written);
    emitted: (N,) bool (written). stride: S; pre: L - S with padding "left",
    else 0. One launch, no host synchronisation.
    """
    N, L, H, Dt = ring.shape
    D = tokens[0].shape[2]
    args = dict(ring=ring, n_tokens=n_tokens, active=active, win=win, emitted=emitted, L=L, S=stride, PRE=pre,
                srn=ring.stride(0), srl=ring.stride(1), srh=ring.stride(2),
                swn=win.stride(0), swh=win.stride(1), swl=win.stride(2), swd=win.stride(3), **_token_args(tokens))
    ring_window_kernel[(N, H)](**args, D=D, N_IN=len(tokens), BLOCK_L=next_pow2(L),
                               BLOCK_D=min(MAX_BLOCK_D, next_pow2(D)), num_warps=4)


def ring_advance(ring: torch.Tensor, tokens: tuple[torch.Tensor, ...], n_tokens: torch.Tensor,
                 n_windows: torch.Tensor, active: torch.Tensor, emitted: torch.Tensor, y: torch.Tensor,
                 out: torch.Tensor, *, pre: int) -> None:
    """Advance every active stream by its new token, in place, and write
    the step's output.

    ring, tokens, n_tokens, active, emitted: as for ``ring_window`` (ring,
    n_tokens and n_windows written); y: (N, H, D_out), any strides, the
    compressed token of every stream's window; out: (N, H, D_out) (written):
    y where emitted, else exactly 0. One launch, no host synchronisation.
    """
    N, L, H, Dt = ring.shape
    D, DO = tokens[0].shape[2], y.shape[2]
    args = dict(ring=ring, n_tokens=n_tokens, n_windows=n_windows, active=active, emitted=emitted, y=y, out=out,
                H=H, L=L, PRE=pre, srn=ring.stride(0), srl=ring.stride(1), srh=ring.stride(2),
                syn=y.stride(0), syh=y.stride(1), syd=y.stride(2),
                son=out.stride(0), soh=out.stride(1), sod=out.stride(2), **_token_args(tokens))
    ring_advance_kernel[(N,)](**args, D=D, DO=DO, N_IN=len(tokens), BLOCK_D=min(MAX_BLOCK_D, next_pow2(D)),
                              BLOCK_DO=min(MAX_BLOCK_D, next_pow2(DO)), num_warps=1)

