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

from .launch import Direct, jit_kernel, kernel_args, next_pow2

__all__ = ["paged_advance", "paged_window", "ring_advance", "ring_window"]

MAX_BLOCK_D = 128   # features per tile (a window tile is L x this)


def _window_warps(L: int, block_d: int) -> int:
    """Warps for a window tile of next_pow2(L) x block_d: 8 from 4096
    elements (L = 32, D >= 128: at 4 warps the paged kernel spills at D = 192,
    two inputs, compiled for sm_90), else 4."""
    return 8 if next_pow2(L) * block_d >= 4096 else 4


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


@triton.jit
def _output_row(y, out, n, h, e0, em, syn, syh, syd, son, soh, sod, DO: tl.constexpr, BLOCK_DO: tl.constexpr):
    """out[n, h, e0:e0 + BLOCK_DO] = y's features there if the row emitted
    (em = 1), else exactly 0; returns (the values, their feature indices, the
    mask of the features that exist where the row emitted)."""
    e = e0 + tl.arange(0, BLOCK_DO)
    em_ = e < DO
    # the flag broadcast explicitly (Triton's interpreter rejects a mask of block & scalar)
    emit = tl.zeros([BLOCK_DO], tl.int32) + em != 0
    v = tl.load(y + n * syn + h * syh + e * syd, mask=em_ & emit, other=0.0)
    # where, not a product: a NaN of a row that did not emit must not reach the output
    v = tl.where(emit, v, 0.0)
    tl.store(out + n * son + h * soh + e * sod, v.to(out.dtype.element_ty), mask=em_)
    return v, e, em_ & emit


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
            _output_row(y, out, n, h, e0, em, syn, syh, syd, son, soh, sod, DO, BLOCK_DO)
    tl.store(n_tokens + n, cnt + act.to(tl.int64))
    tl.store(n_windows + n, tl.load(n_windows + n) + em.to(tl.int64))


def _token_args(tokens: tuple[torch.Tensor, ...]) -> dict:
    t0 = tokens[0]
    t1 = tokens[1] if len(tokens) > 1 else t0
    return dict(tok0=t0, tok1=t1, st0n=t0.stride(0), st0h=t0.stride(1), st0d=t0.stride(2),
                st1n=t1.stride(0), st1h=t1.stride(1), st1d=t1.stride(2))


# decode steps launch these once each (eager, or once in a CUDA graph's capture): through the direct launch, no
# JITFunction.run once a specialisation has run
_RING_WINDOW, _RING_ADVANCE = Direct(ring_window_kernel), Direct(ring_advance_kernel)


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
    block_d = min(MAX_BLOCK_D, next_pow2(D))
    _RING_WINDOW((N, H), *kernel_args(ring_window_kernel, **args), D=D, N_IN=len(tokens), BLOCK_L=next_pow2(L),
                 BLOCK_D=block_d, num_warps=_window_warps(L, block_d))


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
    _RING_ADVANCE((N,), *kernel_args(ring_advance_kernel, **args), D=D, DO=DO, N_IN=len(tokens),
                  BLOCK_D=min(MAX_BLOCK_D, next_pow2(D)), BLOCK_DO=min(MAX_BLOCK_D, next_pow2(DO)), num_warps=1)



# --------------------------------------------------------------------------- paged caches (kvcompress.paged)


@triton.jit
def _page_slot(table, n, pos, stn, stm, M, P, PAGE):
    """Flat slot (page * PAGE + offset) of position(s) ``pos`` of row n
    through its block table (N, M); 0 for a position < 0, past the table, or
    on a page outside the pool (kvcompress.paged._slots: such reads are
    masked or unused)."""
    p = tl.maximum(pos, 0)
    col = p // PAGE
    inside = (pos >= 0) & (col < M)
    page = tl.load(table + n * stn + tl.minimum(col, M - 1) * stm).to(tl.int64)
    inside = inside & (page >= 0) & (page < P)
    return tl.where(inside, page * PAGE + p % PAGE, 0)


@triton.jit
def _paged_input(pool, win, n, h, j, slot, is_pad, FILL, sps, sph, spd, swn, swh, swl, swd,
                 OFF: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One per-token input of window (n, h) from its pool (P * page_size
    slots, H, D), lanes j < 0 not stored: pads (positions before the
    stream's first token) take FILL."""
    for d0 in tl.static_range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        vals = tl.load(pool + slot[:, None] * sps + h * sph + d[None, :] * spd, mask=dm[None, :], other=0.0)
        vals = tl.where(is_pad[:, None], FILL, vals)
        tl.store(win + n * swn + h * swh + j[:, None] * swl + (OFF + d)[None, :] * swd,
                 vals.to(win.dtype.element_ty), mask=(j >= 0)[:, None] & dm[None, :])


@jit_kernel
def paged_window_kernel(pool0, pool1, table, seq_lens, active, win, emitted, L, S, PRE, M, P, PAGE,
                        FILL0, FILL1, sps, sph, spd, stn, stm, swn, swh, swl, swd,
                        D: tl.constexpr, N_IN: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """Program (n, h): win[n, h, j] = token t - L + 1 + j of stream n (t =
    seq_lens[n] - 1, its newest) read through the block table, the kind's
    pad value before its first token; program (n, 0) writes emitted[n]."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.load(seq_lens + n).to(tl.int64) - 1
    j = tl.arange(0, BLOCK_L)
    jj = tl.where(j < L, j, -1)                                          # -1: a lane past the window
    tok = t - L + 1 + j
    slot = _page_slot(table, n, tok, stn, stm, M, P, PAGE)
    is_pad = tok < 0
    _paged_input(pool0, win, n, h, jj, slot, is_pad, FILL0, sps, sph, spd, swn, swh, swl, swd, 0, D, BLOCK_D)
    if N_IN == 2:
        _paged_input(pool1, win, n, h, jj, slot, is_pad, FILL1, sps, sph, spd, swn, swh, swl, swd, D, D, BLOCK_D)
    if h == 0:
        act = (t >= 0).to(tl.int32)
        if HAS_ACTIVE:
            act = act * tl.load(active + n).to(tl.int32)
        u = t + PRE
        ends = ((u >= L - 1) & ((u - (L - 1)) % S == 0)).to(tl.int32)
        tl.store(emitted + n, (act * ends).to(tl.int1))


@jit_kernel
def paged_advance_kernel(out_pool, out_table, seq_lens, emitted, y, out, H, L, S, PRE, M, P, PAGE,
                         sos, soh, sod, stn, stm, syn, syh, syd, son, soh2, sod2,
                         DO: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Program n: out[n] = y[n] where emitted else 0; an emitting row also
    stores y[n] into the compressed pool at its window index (u - (L - 1)) / S
    through its block table. Rows that do not emit write nothing there."""
    n = tl.program_id(0)
    em = tl.load(emitted + n).to(tl.int32)
    u = tl.load(seq_lens + n).to(tl.int64) - 1 + PRE
    w = tl.maximum(u - (L - 1), 0) // S                                  # the window that ends at u
    slot = _page_slot(out_table, n, w, stn, stm, M, P, PAGE)
    for h in range(0, H):
        for e0 in tl.static_range(0, DO, BLOCK_DO):
            v, e, m = _output_row(y, out, n, h, e0, em, syn, syh, syd, son, soh2, sod2, DO, BLOCK_DO)
            tl.store(out_pool + slot * sos + h * soh + e * sod, v.to(out_pool.dtype.element_ty), mask=m)


_PAGED_WINDOW, _PAGED_ADVANCE = Direct(paged_window_kernel), Direct(paged_advance_kernel)


def paged_window(pools: tuple[torch.Tensor, ...], fills: tuple[float, ...], block_table: torch.Tensor,
                 seq_lens: torch.Tensor, active: torch.Tensor | None, win: torch.Tensor, emitted: torch.Tensor,
                 *, block_size: int, stride: int, pre: int) -> None:
    """Every row's window ending at its newest token, read from the KV pool(s)
    through the block table, into ``win``; whether it completes one into
    ``emitted``. Nothing else is written.

    pools: n_in pools (P, page_size, H, D), pages back to back, one dtype;
    fills: each input's pad value; block_table (N, M), seq_lens (N,)
    int32/int64; active (N,) bool or None; win (N, H, L, n_in*D), any
    strides, the pools' dtype (written); emitted (N,) bool (written). One
    launch, no host synchronisation.
    """
    P, page, H, D = pools[0].shape
    N = block_table.shape[0]
    p1 = pools[1] if len(pools) > 1 else pools[0]
    flat = pools[0].flatten(0, 1)
    _PAGED_WINDOW(
        (N, H), pools[0], p1, block_table, seq_lens, active if active is not None else emitted, win, emitted,
        block_size, stride, pre, block_table.shape[1], P, page, float(fills[0]), float(fills[-1]),
        flat.stride(0), flat.stride(1), flat.stride(2), block_table.stride(0), block_table.stride(1),
        win.stride(0), win.stride(1), win.stride(2), win.stride(3),
        D=D, N_IN=len(pools), HAS_ACTIVE=active is not None, BLOCK_L=next_pow2(block_size),
        BLOCK_D=min(MAX_BLOCK_D, next_pow2(D)), num_warps=_window_warps(block_size, min(MAX_BLOCK_D, next_pow2(D))))


def paged_advance(out_pages: torch.Tensor, out_block_table: torch.Tensor, seq_lens: torch.Tensor,
                  emitted: torch.Tensor, y: torch.Tensor, out: torch.Tensor, *, block_size: int, stride: int,
                  pre: int) -> None:
    """The step's output and its store: out (N, H, D_out) = y where emitted,
    else exactly 0; each emitting row's y also goes into ``out_pages`` (P_out,
    out_page_size, H, D_out) at its window index through ``out_block_table``
    (N, M_out). y: (N, H, D_out), any strides. One launch, no host
    synchronisation."""
    P, page, H, DO = out_pages.shape
    N = out_block_table.shape[0]
    flat = out_pages.flatten(0, 1)
    _PAGED_ADVANCE(
        (N,), out_pages, out_block_table, seq_lens, emitted, y, out, H, block_size, stride, pre,
        out_block_table.shape[1], P, page, flat.stride(0), flat.stride(1), flat.stride(2),
        out_block_table.stride(0), out_block_table.stride(1), y.stride(0), y.stride(1), y.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        DO=DO, BLOCK_DO=min(MAX_BLOCK_D, next_pow2(DO)), num_warps=1)
