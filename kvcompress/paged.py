"""Decoding over paged caches (issue 15; docs/decoding.md, "Paged caches").

Serving stacks keep the KV cache in pages: a pool of pages of
``page_size`` token slots, each (page_size, H, D), and per stream a block
table naming the page that holds its tokens [i * page_size, (i+1) *
page_size) (vLLM's and FlashInfer's NHD layout). ``paged_decode_step``
needs no state of its own: after the model has written each stream's new
token into the KV cache, the step reads the L tokens of the window that
ends there straight from the pages, compresses all N windows in one
``kvcompress.functional`` call, and writes each completed window into a
paged compressed cache at its window index. ``write_windows`` stores a
prefill's full pass there, which is the whole hand-off from prefill to
decode.

Like ``kvcompress.decode.decode_step`` it reads no tensor value on the
host and has fixed shapes (CUDA-graph capturable, ``torch.compile``
fullgraph), and it compresses a window for every one of the N rows, whether
it completes one or not.

Shapes: N streams (rows of the block tables), H heads, D head dim (per
input), L = block_size, S = stride, D_out output dim; a KV pool (P,
page_size, H, D), a compressed pool (P_out, out_page_size, H, D_out).
"""

from __future__ import annotations

import torch

from . import backends as _backends
from . import kinds as _kinds
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_window_args
from ._windows import _num_windows_tensor
from .decode import _check_options, _compress_buffer, _compress_rows, _emits, _ring_kernels

__all__ = ["paged_decode_step", "write_windows"]

# every kind's backends, loaded now: kvcompress.backends imports them lazily, on the first look-up, and an
# import inside a step traced by torch.compile(fullgraph=True) is a graph break (DecodeCache loads its
# kind's when it is built; the paged step has no object to do it)
for _kind in _kinds.KINDS:
    _backends.backends(_kind)


def _check_pool(fn: str, name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[1] < 1:
        raise ValueError(f"{fn}: {name} must have shape {what}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must have a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
    if t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
        # slots are addressed as page * page_size + offset in a (P * page_size, ...) view of the pool
        raise ValueError(f"{fn}: {name} must store its pages back to back (stride(0) == page_size * "
                         f"stride(1)), got strides {t.stride()}")


def _check_index(fn: str, name: str, t, rows: int, device, what: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{fn}: {name} must be an int32/int64 torch.Tensor {what}, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dim() != dim or t.shape[0] != rows or (dim == 2 and t.shape[1] < 1):
        raise ValueError(f"{fn}: {name} must have shape {what}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} must be on the caches' device {device}, got {t.device}")


def _slots(table: torch.Tensor, pos: torch.Tensor, page_size: int, n_pages: int) -> torch.Tensor:
    """Flat slot (page * page_size + offset) of token/window ``pos`` (N, k) of
    each row through its block table (N, M); positions < 0 or past the table
    and page numbers outside the pool map to slot 0 (their values are never
    used: reads are masked, writes carry the slot's own value)."""
    col = torch.div(pos.clamp(min=0), page_size, rounding_mode="floor")
    inside = (pos >= 0) & (col < table.shape[1])
    page = table.gather(1, col.clamp(max=table.shape[1] - 1)).to(torch.int64)
    inside = inside & (page >= 0) & (page < n_pages)
    return torch.where(inside, page * page_size + torch.remainder(pos.clamp(min=0), page_size), 0)


def _write_rows(pool: torch.Tensor, slot: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
    """pool.view(-1, H, C)[slot[k]] = y[k] where mask[k], in place, with fixed
    shapes: every row writes, the unmasked ones a value that changes nothing.
    They write the first masked row's value to its slot (or, when no row is
    masked, the current value of their own slot), so every slot written more
    than once gets identical bits and the write is deterministic."""
    flat = pool.flatten(0, 1)                                                  # [P * page, H, C]
    first = torch.argmax(mask.to(torch.int8)).reshape(1)                      # [1] 0 when none
    any_ = mask.index_select(0, first)                                         # [1]
    dest = torch.where(mask, slot, torch.where(any_, slot.index_select(0, first), slot))   # [N]
    keep = torch.where(any_[:, None, None], y.index_select(0, first), flat[slot])          # [N, H, C]
    flat[dest] = torch.where(mask[:, None, None], y, keep)


def paged_decode_step(kind: str, kv_pages, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      out_pages: torch.Tensor, out_block_table: torch.Tensor, *params, block_size: int,
                      stride: int, padding: str = "valid", pe=None, active: torch.Tensor | None = None,
                      backend: str = "auto", **kind_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the window that each stream's newest token completes, reading
    the tokens from a paged KV cache and writing into a paged compressed cache.

    kind: one of ``kvcompress.kinds.KINDS``.
    kv_pages: the KV pool, (P, page_size, H, D), or for a kind with several
        per-token inputs a tuple of pools, one per input in the kind's order
        (gated_pool: x, z), of one shape and dtype.
    block_table: (N, M) int32/int64: page ``block_table[n, i]`` holds tokens
        [i * page_size, (i+1) * page_size) of stream n.
    seq_lens: (N,) int32/int64: tokens of each stream in the KV cache, its
        newest included (token seq_lens[n] - 1, the one this step is for).
    out_pages: the compressed pool, (P_out, out_page_size, H, D_out), the
        KV pool's dtype; out_block_table (N, M_out): page
        ``out_block_table[n, i]`` holds windows [i * out_page_size, ...) of
        stream n.
    *params: the kind's parameters, positional as in kvcompress.functional.
    block_size, stride, padding, pe: as in the full pass (kvcompress.functional).
    active: (N,) bool or None (every row): rows that are streams this step.
    backend, **kind_kwargs: as in ``kvcompress.decode.decode_step``.

    Returns (y, emitted): emitted (N,) bool is True where row n is active and
    its token t = seq_lens[n] - 1 ends a window of the full pass (t = (i+1)*S
    - 1 with padding "left", t = i*S + L - 1 with "valid"); y (N, H, D_out)
    holds that window's compressed token there, exactly 0 elsewhere. The
    token is also written, in place, into ``out_pages`` at window index i =
    num_windows(seq_lens[n]) - 1 of stream n; nothing else there changes.

    Values are trusted, not read (no host synchronisation): the pages a
    window reads and the page its output goes to must be valid entries of
    the block tables (rows of inactive or non-emitting streams may hold
    anything). Positions before a stream's first token are left pads (the
    kind's pad value, as in the full pass). Raises TypeError/ValueError
    naming the argument, before anything is written.
    """
    fn = "paged_decode_step"
    check_choice(fn, "kind", kind, _kinds.KINDS)
    rec = _kinds.get(kind)
    n_in = len(rec.inputs)
    pools = tuple(kv_pages) if isinstance(kv_pages, (tuple, list)) else (kv_pages,)
    if len(pools) != n_in:
        raise TypeError(f"{fn}: {kind} reads {n_in} per-token input(s) {rec.inputs}: kv_pages must be "
                        f"{'one pool' if n_in == 1 else f'a tuple of {n_in} pools'}, got {len(pools)}")
    what = "(P, page_size, H, D)"
    for name, t in zip(rec.inputs, pools):
        _check_pool(fn, f"kv_pages ({name})", t, what)
        if t.shape != pools[0].shape or t.dtype != pools[0].dtype or t.device != pools[0].device:
            raise ValueError(f"{fn}: the pools of {rec.inputs} must agree in shape, dtype and device, got "
                             f"{[(tuple(p.shape), p.dtype, str(p.device)) for p in pools]}")
    P, page_size, H, D = pools[0].shape
    dev, dtype = pools[0].device, pools[0].dtype
    L, S = check_window_args(fn, block_size, stride, padding)
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise (TypeError if not isinstance(block_table, torch.Tensor) else ValueError)(
            f"{fn}: block_table must be a 2-D int tensor (N, M)")
    N = block_table.shape[0]
    _check_index(fn, "block_table", block_table, N, dev, "(N, M)", 2)
    _check_index(fn, "seq_lens", seq_lens, N, dev, f"(N,) = ({N},)", 1)
    _check_pool(fn, "out_pages", out_pages, "(P_out, out_page_size, H, D_out)")
    if out_pages.dtype != dtype or out_pages.device != dev or out_pages.shape[2] != H:
        raise ValueError(f"{fn}: out_pages must have the KV pool's dtype {dtype}, device {dev} and H={H} heads, "
                         f"got {out_pages.dtype} on {out_pages.device}, shape {tuple(out_pages.shape)}")
    _check_index(fn, "out_block_table", out_block_table, N, dev, "(N, M_out)", 2)
    if active is not None:
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
            raise TypeError(f"{fn}: active must be None or a bool tensor (N,)")
        if tuple(active.shape) != (N,) or active.device != dev:
            raise ValueError(f"{fn}: active must have shape (N,) = ({N},) on {dev}, got {tuple(active.shape)} "
                             f"on {active.device}")
    _check_options(fn, kind, pe, pools[0][:1, :1].permute(0, 2, 1, 3), L, backend, kind_kwargs)   # (1, H, 1, D)

    pad = L - S if padding == "left" else 0
    if _ring_kernels(dev) and all(p.stride() == pools[0].stride() for p in pools):
        return _paged_step_kernels(kind, pools, block_table, seq_lens, out_pages, out_block_table, params, L, S,
                                   pad, pe, active, backend, kind_kwargs)
    t = seq_lens.to(torch.int64) - 1                                            # [N] the new token
    act = t >= 0 if active is None else active & (t >= 0)
    u = t + pad                                                                 # left-padded position
    emitted = _emits(u, act, L, S)                                              # [N]

    # the window ending at token t: tokens t - L + 1 .. t (negative: left pads)
    tok = t[:, None] - (L - 1) + torch.arange(L, device=dev)                    # [N, L]
    slot = _slots(block_table, tok, page_size, P)                               # [N, L]
    is_pad = (tok < 0)[:, :, None, None]
    wins = []
    for pool, fill in zip(pools, rec.pad_fill):
        vals = pool.flatten(0, 1)[slot]                                         # [N, L, H, D]
        vals = torch.where(is_pad, torch.full((), fill, dtype=dtype, device=dev), vals)
        wins.append(vals.transpose(1, 2))                                       # [N, H, L, D]
    y = _compress_rows(kind, wins, params, L, S, pe, backend, kind_kwargs)      # [N, H, D_out]
    if tuple(y.shape[:2]) != (N, H) or y.shape[2] != out_pages.shape[3]:
        raise ValueError(f"{fn}: out_pages must hold D_out={y.shape[2]} features (the kind's output), got "
                         f"{out_pages.shape[3]}")
    y = torch.where(emitted[:, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))

    w = _num_windows_tensor(seq_lens.to(torch.int64).clamp(min=0), L, S, padding) - 1   # [N] window index
    dest = _slots(out_block_table, w[:, None], out_pages.shape[1], out_pages.shape[0])[:, 0]
    _write_rows(out_pages, dest, y, emitted)
    return y, emitted


def _paged_step_kernels(kind, pools, block_table, seq_lens, out_pages, out_block_table, params, L, S, pad, pe,
                        active, backend, kind_kwargs):
    """paged_decode_step with its data movement in two Triton launches around
    the compression (kvcompress/ops/_triton/ring.py: ``paged_window`` reads
    the windows through the block table into one buffer, ``paged_advance``
    writes the output rows and the completed windows into the compressed
    pool): the same result. Nothing is written before the compression (and
    its check against out_pages' D_out) has succeeded."""
    from .ops._triton.ring import paged_advance, paged_window
    P, page_size, H, D = pools[0].shape
    N = block_table.shape[0]
    buf = torch.empty(H, N, L, len(pools) * D, dtype=pools[0].dtype, device=pools[0].device)
    emitted = torch.empty(N, dtype=torch.bool, device=buf.device)
    paged_window(pools, _kinds.get(kind).pad_fill, block_table, seq_lens, active, buf.permute(1, 0, 2, 3), emitted,
                 block_size=L, stride=S, pre=pad)
    y = _compress_buffer(kind, buf, D, params, L, S, pe, backend, kind_kwargs)      # [N, H, D_out]
    if y.shape[2] != out_pages.shape[3]:
        raise ValueError(f"paged_decode_step: out_pages must hold D_out={y.shape[2]} features (the kind's output), "
                         f"got {out_pages.shape[3]}")
    out = torch.empty(N, H, y.shape[2], dtype=y.dtype, device=y.device)
    paged_advance(out_pages, out_block_table, seq_lens, emitted, y, out, block_size=L, stride=S, pre=pad)
    return out, emitted


def write_windows(out_pages: torch.Tensor, out_block_table: torch.Tensor, y: torch.Tensor,
                  cu_windows: torch.Tensor) -> None:
    """Store a packed full pass into a paged compressed cache: the prefill's
    hand-off to ``paged_decode_step``.

    out_pages (P_out, out_page_size, H, D_out) and out_block_table (N, M_out)
    as in ``paged_decode_step``; y (1, H, W, D_out): the full pass of N packed
    sequences (``kvcompress.functional`` with ``cu_seqlens``), y's dtype and
    device the pool's; cu_windows (N+1,) int32/int64 on the device: its
    window offsets (``kvcompress.functional.compressed_cu_seqlens``), values
    trusted. Window k of sequence n goes to window index k of stream n, in
    place; no host synchronisation. Raises TypeError/ValueError naming the
    argument.
    """
    fn = "write_windows"
    _check_pool(fn, "out_pages", out_pages, "(P_out, out_page_size, H, D_out)")
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[0] != 1:
        raise (TypeError if not isinstance(y, torch.Tensor) else ValueError)(
            f"{fn}: y must be a torch.Tensor (1, H, W, D_out) of packed windows")
    if y.dtype != out_pages.dtype or y.device != out_pages.device or y.shape[1] != out_pages.shape[2] \
            or y.shape[3] != out_pages.shape[3]:
        raise ValueError(f"{fn}: y {tuple(y.shape)} {y.dtype} on {y.device} must match out_pages "
                         f"{tuple(out_pages.shape)} {out_pages.dtype} on {out_pages.device} in H, D_out, dtype "
                         f"and device")
    if not isinstance(out_block_table, torch.Tensor) or out_block_table.dim() != 2:
        raise (TypeError if not isinstance(out_block_table, torch.Tensor) else ValueError)(
            f"{fn}: out_block_table must be a 2-D int tensor (N, M_out)")
    N = out_block_table.shape[0]
    _check_index(fn, "out_block_table", out_block_table, N, y.device, "(N, M_out)", 2)
    _check_index(fn, "cu_windows", cu_windows, N + 1, y.device, f"(N+1,) = ({N + 1},)", 1)
    W = y.shape[2]
    if W == 0:
        return
    cu = cu_windows.to(torch.int64)
    n_win = cu[1:] - cu[:-1]                                                    # [N]
    seq = torch.repeat_interleave(torch.arange(N, device=y.device), n_win, output_size=W)   # [W]
    k = torch.arange(W, device=y.device) - cu[:-1][seq]                         # [W] index within its stream
    page_size = out_pages.shape[1]
    page = out_block_table[seq, torch.div(k, page_size, rounding_mode="floor")].to(torch.int64)
    out_pages.flatten(0, 1)[page * page_size + torch.remainder(k, page_size)] = \
        y[0].transpose(0, 1)
