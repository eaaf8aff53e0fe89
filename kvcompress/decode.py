"""Decoding with fixed shapes and no host synchronisation (issue 15;
docs/decoding.md).

``kvcompress.streaming`` takes any number of tokens per stream and step, and
pays for that generality on the host: it reads the counters and offsets,
validates their values and allocates a new state every step. A decoding
loop needs less: every active stream receives exactly one token per step.
This module serves that loop with shapes fixed by a maximum number of
streams, so that a step is a fixed sequence of device operations (no
``.item()``, no ``.tolist()``, no branch on a tensor's value): it runs under
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph.

``DecodeCache`` holds, preallocated for N_max streams, a ring of the last L
tokens of each stream (its per-token inputs side by side, like
``StreamState``), the tokens received and windows emitted per stream (int64,
on the device) and which streams are active. ``decode_step`` gathers for
every stream the L tokens of the window that ends at its new token (L - 1
ring slots in order, by index arithmetic on the device, then the new
token), compresses all N_max windows in one ``kvcompress.functional`` call
with ``padding="valid"`` and the full pass's block size and stride, then
writes the new token of every active stream into its ring in place. A stream
completes a window at this token exactly when the full pass has a window
ending there; the step returns the compressed tokens of all streams and a
mask of those that completed one.

Why the window of the ring is the full pass's window: slot ``u mod L`` of a
stream holds its token at (left-padded) position u; with
``padding="left"`` a fresh stream's ring holds the L - S pads the full pass
prepends (each input's pad value: gated_pool's scores -inf). The window
ending at position u is positions u - L + 1 .. u, gathered in that order,
so window position j is the full pass's position j and ``pe[h, j]`` lands
where it does there, pads included.

Shapes: N = N_max streams, H heads, D head dim (per input), L = block_size,
S = stride, D_out output dim.
"""

from __future__ import annotations

import torch

from . import backends as _backends
from . import functional as _functional
from . import kinds as _kinds
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, _is_int, check_choice, check_int, check_pe, check_window_args
from ._windows import _num_windows_tensor
from .streaming import _pad_tokens

__all__ = ["DecodeCache", "decode_step", "last_tokens"]

_CACHE_TENSORS = ("ring", "n_tokens", "n_windows", "active")


class DecodeCache:
    """The in-place decoding state of up to ``max_streams`` streams of one kind.

    kind: one of ``kvcompress.kinds.KINDS``; it fixes the per-token inputs
        kept side by side (gated_pool: x and z) and the value of a left pad.
    max_streams (N >= 1), heads (H >= 1), dim (D >= 1, per input): ints.
    block_size, stride, padding: the windowing, as in kvcompress.functional
        (default padding "valid").
    dtype: the token dtype (default float32). device: default the current
        default device.

    Tensors (allocated once; every method writes them in place, so their
    addresses never change):

    - ring: (N, L, H, n_in * D) in ``dtype``: slot ``u mod L`` of stream k
      holds its token at (left-padded) position u, for the last L positions.
    - n_tokens: (N,) int64, tokens received (pads not counted).
    - n_windows: (N,) int64, windows emitted;
      ``num_windows(n_tokens, L, S, padding)`` for every active stream.
    - active: (N,) bool, the streams that ``decode_step`` advances.

    All streams start inactive. ``add`` starts streams (fresh, or from a
    prefill), ``reset`` starts them over, ``remove`` deactivates them. Each
    takes ``streams`` as an int32/int64 tensor of indices (values trusted,
    not read: capturable), a bool mask (N,) (capturable), or a host list,
    tuple or int of indices (checked).

    Raises TypeError/ValueError naming the argument for a bad kind, size,
    windowing or dtype.
    """

    def __init__(self, kind: str, max_streams: int, heads: int, dim: int, *, block_size: int, stride: int,
                 padding: str = "valid", dtype: torch.dtype = torch.float32, device=None):
        fn = "DecodeCache"
        check_choice(fn, "kind", kind, _kinds.KINDS)
        max_streams, heads, dim = (check_int(fn, name, v, lo) for name, v, lo in (
            ("max_streams", max_streams, 1), ("heads", heads, 1), ("dim", dim, 1)))
        block_size, stride = check_window_args(fn, block_size, stride, padding)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        rec = _kinds.get(kind)
        # load the kind's backends now (kvcompress.backends imports them lazily, on the first look-up):
        # an import inside a step traced by torch.compile(fullgraph=True) is a graph break
        _backends.backends(kind)
        self.kind, self.block_size, self.stride, self.padding = kind, block_size, stride, padding
        self.inputs, self.fill = rec.inputs, rec.pad_fill
        n_in = len(rec.inputs)
        self.ring = torch.zeros(max_streams, block_size, heads, n_in * dim, dtype=dtype, device=device)
        dev = self.ring.device
        self.n_tokens = torch.zeros(max_streams, dtype=torch.int64, device=dev)
        self.n_windows = torch.zeros(max_streams, dtype=torch.int64, device=dev)
        self.active = torch.zeros(max_streams, dtype=torch.bool, device=dev)
        # one pad token: each input's pad value over its D features, side by side
        self._pad = torch.tensor(self.fill, dtype=dtype, device=dev).repeat_interleave(dim)   # [n_in * D]
        self._slots = torch.arange(block_size, device=dev)                                   # [L]
        self._index = torch.arange(max_streams, device=dev)                                  # [N]

    # ------------------------------------------------------------ metadata

    @property
    def max_streams(self) -> int:
        return self.ring.shape[0]

    @property
    def heads(self) -> int:
        return self.ring.shape[2]

    @property
    def dim(self) -> int:
        """D of each per-token input (the ring holds n_in * D features)."""
        return self.ring.shape[3] // len(self.inputs)

    @property
    def dtype(self) -> torch.dtype:
        return self.ring.dtype

    @property
    def device(self) -> torch.device:
        return self.ring.device

    @property
    def pad_tokens(self) -> int:
        """L - S with padding="left" (the pads a fresh stream holds), else 0."""
        return _pad_tokens(self.block_size, self.stride, self.padding)

    def __repr__(self) -> str:
        return (f"DecodeCache({self.kind!r}, max_streams={self.max_streams}, heads={self.heads}, dim={self.dim}, "
                f"block_size={self.block_size}, stride={self.stride}, padding={self.padding!r}, "
                f"dtype={self.dtype}, device={self.device})")

    # ------------------------------------------------------------ streams

    def add(self, streams, *tail, n_tokens=None) -> None:
        """Start ``streams``: fresh (no ``tail``), or continuing a prefill.

        streams: an int32/int64 tensor (n,) of stream indices (values
            trusted: capturable), a bool mask (N,) (capturable; then n = N
            and rows of unchosen streams are ignored), or a host int, list
            or tuple of indices (checked). Indices must be distinct.
        *tail: none, or one tensor per per-token input of the kind (x;
            gated_pool: x, z), each (n, H, T_tail, D) with T_tail >= L - 1,
            the cache's dtype and device, any strides: the prompt's last
            tokens, right-aligned (``tail[i, :, T_tail - 1]`` is the last
            token of stream i's prompt). Columns before the prompt's first
            token are ignored (any finite value; ``last_tokens`` builds
            tails from a packed prefill).
        n_tokens: with a tail, the prompt lengths P: an int32/int64 tensor
            (n,) (values trusted) or a host list of ints >= 0. Without a
            tail, None (P = 0).

        Afterwards each chosen stream is active, has received P tokens and
        emitted num_windows(P) windows (the prefill's full pass emitted
        them), and its ring holds the last L - 1 positions of its
        left-padded prompt (pads: the kind's pad value). Its next token is
        position P. In place; no host synchronisation for tensor arguments.
        Raises TypeError/ValueError naming ``streams``, the tail's inputs
        or ``n_tokens``.
        """
        fn = "DecodeCache.add"
        idx, mask, n = self._streams(fn, streams)
        if tail and len(tail) != len(self.inputs):
            raise TypeError(f"{fn}: {self.kind} takes a tail of each of its inputs {self.inputs}, got {len(tail)}")
        if not tail and n_tokens is not None:
            raise ValueError(f"{fn}: n_tokens (prompt lengths) needs the prompts' last tokens as *tail")
        if tail and n_tokens is None:
            raise ValueError(f"{fn}: a tail needs n_tokens, the prompt lengths (n,)")
        L, H, D = self.block_size, self.heads, self.dim
        for name, t in zip(self.inputs, tail):
            _check_tensor(fn, name, t, self, f"(n={n}, H={H}, T_tail >= L - 1 = {L - 1}, D={D}) (the prompts' "
                          f"last tokens)", lambda t: t.dim() == 4 and t.shape[0] == n and t.shape[1] == H
                          and t.shape[3] == D and t.shape[2] >= L - 1 and t.shape == tail[0].shape)
        P = self._lengths(fn, n_tokens, n)
        T_tail = tail[0].shape[2] if tail else 0
        rows = self._rows(P, torch.cat(tail, 3) if len(tail) > 1 else tail[0] if tail else None, T_tail)
        self._write(idx, mask, rows, P, _num_windows_tensor(P, L, self.stride, self.padding), True)

    def reset(self, streams) -> None:
        """Start ``streams`` over as fresh active streams (``add(streams)``)."""
        self.add(streams)

    def remove(self, streams) -> None:
        """Deactivate ``streams`` (their counters become 0); ``decode_step``
        leaves them untouched and reports no window for them."""
        idx, mask, n = self._streams("DecodeCache.remove", streams)
        zero = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._write(idx, mask, None, zero, zero, False)

    # ------------------------------------------------------------ internals

    def _streams(self, fn, streams):
        """(idx (n,) int64 tensor or None, mask (N,) bool tensor or None, n)."""
        N = self.max_streams
        if isinstance(streams, torch.Tensor):
            if streams.device != self.device:
                raise ValueError(f"{fn}: streams must be on the cache's device {self.device}, got {streams.device}")
            if streams.dtype == torch.bool:
                if tuple(streams.shape) != (N,):
                    raise ValueError(f"{fn}: a boolean streams mask must have shape (N,) = ({N},), "
                                     f"got {tuple(streams.shape)}")
                return None, streams, N
            if streams.dtype not in INDEX_DTYPES or streams.dim() != 1:
                raise TypeError(f"{fn}: streams must be a bool mask (N,) or int32/int64 indices (n,), got dtype "
                                f"{streams.dtype} shape {tuple(streams.shape)}")
            return streams.to(torch.int64), None, streams.shape[0]
        if _is_int(streams):
            streams = [streams]
        if not isinstance(streams, (list, tuple, range)) or not all(_is_int(i) for i in streams):
            raise TypeError(f"{fn}: streams must be a tensor of indices, a bool mask (N,), an int or a list of "
                            f"ints, got {type(streams).__name__} {streams!r}"[:300])
        bad = [i for i in streams if not 0 <= i < N]
        if bad or len(set(streams)) != len(streams):
            raise ValueError(f"{fn}: streams must be distinct indices in [0, N={N}), got {list(streams)[:16]}")
        return torch.tensor([int(i) for i in streams], dtype=torch.int64).to(self.device), None, len(streams)

    def _lengths(self, fn, n_tokens, n) -> torch.Tensor:
        """The prompt lengths P (n,) int64 on the device (zeros without any)."""
        if n_tokens is None:
            return torch.zeros(n, dtype=torch.int64, device=self.device)
        if isinstance(n_tokens, torch.Tensor):
            if n_tokens.dtype not in INDEX_DTYPES or tuple(n_tokens.shape) != (n,):
                raise (TypeError if n_tokens.dtype not in INDEX_DTYPES else ValueError)(
                    f"{fn}: n_tokens must be an int32/int64 tensor of shape (n,) = ({n},), got dtype "
                    f"{n_tokens.dtype} shape {tuple(n_tokens.shape)}")
            if n_tokens.device != self.device:
                raise ValueError(f"{fn}: n_tokens must be on the cache's device {self.device}, got {n_tokens.device}")
            return n_tokens.to(torch.int64)
        if not isinstance(n_tokens, (list, tuple)) or not all(_is_int(v) for v in n_tokens):
            raise TypeError(f"{fn}: n_tokens must be an int tensor or a list of ints, got {n_tokens!r}"[:300])
        if len(n_tokens) != n or any(v < 0 for v in n_tokens):
            raise ValueError(f"{fn}: n_tokens must hold n={n} ints >= 0, got {list(n_tokens)[:16]}")
        return torch.tensor([int(v) for v in n_tokens], dtype=torch.int64).to(self.device)

    def _rows(self, P: torch.Tensor, tail: torch.Tensor | None, T_tail: int) -> torch.Tensor:
        """The rings (n, L, H, n_in*D) of streams whose prompts have P tokens.

        Slot s holds the latest position u <= P + pad - 1 with u = s mod L:
        a pad (the kind's pad value) for 0 <= u < pad, prompt token u - pad
        (tail column T_tail - P + u - pad) for u >= pad, zero for u < 0 (a
        slot no window reads before the stream overwrites it). The oldest
        position, P + pad - L, is overwritten by the next token."""
        L, pad = self.block_size, self.pad_tokens
        n, H, Dt = P.shape[0], self.heads, self.ring.shape[3]
        last = (P + pad - 1)[:, None]                                             # [n, 1]
        u = last - torch.remainder(last - self._slots, L)                          # [n, L] position in slot s
        if tail is None or T_tail == 0:
            vals = self.ring.new_zeros(n, L, H, Dt)
        else:
            col = (u - pad - P[:, None] + T_tail).clamp(0, T_tail - 1)             # [n, L]
            vals = tail.gather(2, col[:, None, :, None].expand(n, H, L, Dt)).transpose(1, 2)   # [n, L, H, Dt]
        vals = torch.where((u < pad)[:, :, None, None], self._pad, vals)
        return torch.where((u < 0)[:, :, None, None], torch.zeros((), dtype=vals.dtype, device=vals.device), vals)

    def _write(self, idx, mask, rows, n_tok, n_win, active: bool) -> None:
        """Write rows (or keep the rings: None), counters and the active flag
        of the chosen streams, in place."""
        flag = torch.full(n_tok.shape, active, dtype=torch.bool, device=self.device)
        if idx is not None:
            if rows is not None:
                self.ring.index_copy_(0, idx, rows)
            self.n_tokens.index_copy_(0, idx, n_tok)
            self.n_windows.index_copy_(0, idx, n_win)
            self.active.index_copy_(0, idx, flag)
            return
        if rows is not None:
            self.ring.copy_(torch.where(mask[:, None, None, None], rows, self.ring))
        self.n_tokens.copy_(torch.where(mask, n_tok, self.n_tokens))
        self.n_windows.copy_(torch.where(mask, n_win, self.n_windows))
        self.active.copy_(torch.where(mask, flag, self.active))


def _check_tensor(fn: str, name: str, t, cache: DecodeCache, shape: str, shape_ok) -> None:
    """A token tensor for ``cache``: a tensor (TypeError), of the described
    ``shape`` (``shape_ok(t)``, else ValueError), of the cache's dtype
    (TypeError) and device (ValueError)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    if not shape_ok(t):
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != cache.dtype:
        raise TypeError(f"{fn}: {name} must have the cache's dtype {cache.dtype}, got {t.dtype}")
    if t.device != cache.device:
        raise ValueError(f"{fn}: {name} must be on the cache's device {cache.device}, got {t.device}")


def last_tokens(x: torch.Tensor, cu_seqlens: torch.Tensor, count: int) -> torch.Tensor:
    """The last ``count`` tokens of each packed sequence, right-aligned: a
    prefill's hand-off to ``DecodeCache.add``.

    x: (1, H, T, D), any strides; cu_seqlens: (N+1,) int32/int64 offsets on
    x's device (values trusted, not read: no host synchronisation); count:
    int >= 0 (``block_size - 1`` for ``add``). Returns (N, H, count, D):
    entry [k, :, count - 1] is sequence k's last token; columns before a
    sequence's first token hold other tokens of x (or zeros when T = 0),
    which ``add`` ignores. Raises TypeError/ValueError naming the argument.
    """
    fn = "last_tokens"
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
        raise (TypeError if not isinstance(x, torch.Tensor) else ValueError)(
            f"{fn}: x must be a torch.Tensor (1, H, T, D) of packed sequences, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"{fn}: cu_seqlens must be an int32/int64 torch.Tensor (N+1,)")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.device != x.device:
        raise ValueError(f"{fn}: cu_seqlens must be 1-D (N+1,) on x's device {x.device}, got shape "
                         f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    count = check_int(fn, "count", count, 0)
    N, (_, H, T, D) = cu_seqlens.shape[0] - 1, x.shape
    if T == 0:
        return x.new_zeros(N, H, count, D)
    end = cu_seqlens[1:].to(torch.int64)[:, None]                                    # [N, 1]
    col = (end - count + torch.arange(count, device=x.device)).clamp(0, T - 1)     # [N, count]
    return x[0][:, col].transpose(0, 1)                                              # [N, H, count, D]


def _check_step_args(fn, kind, cache, new, pe, backend, kind_kwargs) -> None:
    """Everything a step checks: Python-visible metadata only (no tensor value is read)."""
    check_choice(fn, "kind", kind, _kinds.KINDS)
    if not isinstance(cache, DecodeCache):
        raise TypeError(f"{fn}: cache must be a DecodeCache, got {type(cache).__name__}")
    if cache.kind != kind:
        raise ValueError(f"{fn}: cache was made for kind {cache.kind!r} (its pads and inputs), got kind {kind!r}")
    rec = _kinds.get(kind)
    shape = (cache.max_streams, cache.heads, cache.dim)
    for name, t in zip(rec.inputs, new):
        _check_tensor(fn, name, t, cache, f"(N_max, H, D) = {shape} (one new token per stream)",
                      lambda t: tuple(t.shape) == shape)
    # pe checked against a window of the cache (N, H, L, D)
    _check_options(fn, kind, pe, new[0][:, :, None], cache.block_size, backend, kind_kwargs,
                   "; block_size, stride and padding come from the cache")


def _check_options(fn, kind, pe, window, L, backend, kind_kwargs, hint="") -> None:
    """The checks a decoding step shares (this module's and kvcompress.paged's):
    the kind's keyword options, pe (against ``window``, any (N, H, *, D)
    tensor of the tokens' dtype and device) and the backend's name."""
    rec = _kinds.get(kind)
    extra = [k for k in kind_kwargs if k not in rec.option_names]
    if extra:
        raise TypeError(f"{fn}: {kind} takes no keyword arguments {extra} here (allowed: {list(rec.option_names)}"
                        f"{hint})")
    if rec.pe:
        if pe is not None:
            check_pe(fn, pe, window, L)
    elif pe is not None:
        raise TypeError(f"{fn}: {kind} takes no pe (got a {type(pe).__name__})")
    if not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a str, 'auto' or a backend name, got {type(backend).__name__}")
    if backend != "auto":
        _backends.get(kind, backend)


def _emits(u: torch.Tensor, active: torch.Tensor, L: int, S: int) -> torch.Tensor:
    """[N] bool: the active rows whose new token, at left-padded position u
    (N,), ends a window of the full pass (SPEC section 2)."""
    return active & (u >= L - 1) & (torch.remainder(u - (L - 1), S) == 0)


def _compress_rows(kind: str, wins, params, L: int, S: int, pe, backend: str, kind_kwargs: dict) -> torch.Tensor:
    """One window per row: wins, one (N, H, L, D) tensor per per-token input
    -> (N, H, D_out), through kvcompress.functional.

    A backend that promises batch invariance gets the rows as N batch rows
    of one window each, with the full pass's stride (W = 1 for any stride):
    a backend's arithmetic for a window may depend on S (weighted_pool's
    torch path sums chunks of S positions, linear's multiplies chunks of S
    tokens when S | L), so this is what keeps it bit for bit equal to the
    full pass. Any other backend gets them as one sequence (1, H, N*L, D)
    with stride L (``_one_sequence``)."""
    kw = dict(kind_kwargs)
    if _kinds.get(kind).pe:
        kw["pe"] = pe
    f = getattr(_functional, kind)
    b = _resolve(kind, backend, wins[0], (*wins[1:], *params), dict(kw, block_size=L, stride=S, padding="valid"))
    if _one_sequence(b, kind_kwargs):
        H = wins[0].shape[1]
        seq = [w.transpose(0, 1).reshape(1, H, -1, w.shape[3]) for w in wins]     # [1, H, N*L, D]
        return f(*seq, *params, block_size=L, stride=L, padding="valid", backend=b.name, **kw)[0].transpose(0, 1)
    return f(*wins, *params, block_size=L, stride=S, padding="valid", backend=b.name, **kw)[:, :, 0]


def _one_sequence(b, kind_kwargs: dict) -> bool:
    """Whether a step hands its N windows to backend ``b`` as one sequence of
    N*L tokens with stride L (N non-overlapping windows) rather than as N
    batch rows: a kernel then tiles over the streams' windows and reads its
    weights once per tile, not once per stream (the Triton kernels tile
    windows within a row), and the torch backend multiplies each window
    once instead of ceil(L / S) window starts per row. A window's value
    does not depend on the stride (SPEC section 2) except for gated_pool's
    split, which reads feature chunk j // S; a batch-invariant backend's
    bits may depend on it, so both keep the batch rows."""
    return not b.batch_invariant and not kind_kwargs.get("split", False)


def decode_step(kind: str, cache: DecodeCache, x_new: torch.Tensor, *params, pe=None, backend: str = "auto",
                **kind_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every active stream one new token; return what completes.

    kind: the cache's kind. cache: a DecodeCache, updated in place.
    x_new: (N_max, H, D), the cache's dtype and device, any strides: the
        new token of every stream (rows of inactive streams are ignored,
        any values).
    *params: the kind's other per-token inputs (gated_pool's z, shaped like
        x_new), then its parameters, positional as in kvcompress.functional
        (linear: weight, bias; mlp: w1, b1, w2, b2; gated_pool: z, bias).
    pe: (H, L, D) or None; added at window position j as in the full pass
        (left pads included).
    backend: "auto" (default) or a registered backend name.
    **kind_kwargs: the kind's options (mlp's ``activation``, gated_pool's
        ``split``).

    Returns (y, emitted): y (N_max, H, D_out) in x's dtype, emitted (N_max,)
    bool. emitted[k] is True exactly when stream k is active and its new
    token (number t = n_tokens before the step) ends a window of the full
    pass: t = (i+1)*S - 1 with padding "left", t = i*S + L - 1 with "valid";
    y[k] is then that window's compressed token, else exactly 0.
    Afterwards n_tokens and n_windows of active streams have grown by 1 and
    by emitted.

    No host synchronisation and fixed shapes: no tensor value is read on the
    host, so the step runs under ``torch.compile(fullgraph=True)``. It
    compresses a window for every one of the N_max streams (emitting or not).
    Raises, before anything is written: TypeError/ValueError naming
    ``kind``, ``cache``, ``x_new`` (or ``z``), ``pe``, ``backend`` or an
    unexpected keyword; kvcompress.functional checks the parameters.
    """
    fn = "decode_step"
    n_more = len(_kinds.get(kind).inputs) - 1 if kind in _kinds.KINDS else 0
    if len(params) < n_more:
        raise TypeError(f"{fn}: {kind} takes the new tokens of its inputs {_kinds.get(kind).inputs} "
                        f"before its parameters")
    new, params = (x_new, *params[:n_more]), params[n_more:]
    _check_step_args(fn, kind, cache, new, pe, backend, kind_kwargs)
    N, L, S, H = cache.max_streams, cache.block_size, cache.stride, cache.heads
    D = cache.dim
    if _ring_kernels(cache.device):
        return _step_ring_kernels(kind, cache, new, params, pe, backend, kind_kwargs)
    token = torch.cat(new, 2) if n_more else x_new                              # [N, H, n_in*D]
    Dt = token.shape[2]

    u = cache.n_tokens + cache.pad_tokens                                       # [N] position of the new token
    act = cache.active
    emitted = _emits(u, act, L, S)                                              # [N]
    # the window ending at u: positions u - L + 1 .. u - 1 from the ring, in order, then the new token.
    # The ring is written only after the compression, so an error there (a bad parameter, which
    # kvcompress.functional checks) leaves the cache as it was
    order = torch.remainder(u[:, None] - (L - 1) + cache._slots[:L - 1], L)    # [N, L-1]
    prev = cache.ring.gather(1, order[:, :, None, None].expand(N, L - 1, H, Dt))   # [N, L-1, H, n_in*D]
    win = torch.cat([prev, token[:, None]], 1).transpose(1, 2)                 # [N, H, L, n_in*D]
    wins = win.split(D, dim=3) if n_more else (win,)

    y = _compress_rows(kind, wins, params, L, S, pe, backend, kind_kwargs)      # [N, H, D_out]
    y = torch.where(emitted[:, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))

    rows = cache._index
    slot = torch.remainder(u, L)                                                # [N] holds u - L until now
    cache.ring[rows, slot] = torch.where(act[:, None, None], token, cache.ring[rows, slot])
    cache.n_tokens.add_(act.to(torch.int64))
    cache.n_windows.add_(emitted.to(torch.int64))
    return y, emitted


# ---------------------------------------------------------------- the step in Triton kernels

# Whether decode_step moves its data with the Triton ring kernels (kvcompress/ops/_triton/ring.py):
# "auto" on CUDA when Triton is installed (not while torch.compile traces the step: inductor fuses
# the torch formulation itself), "on" also on CPU tensors under TRITON_INTERPRET=1 (tests), "off" never
RING_KERNELS = "auto"


def _ring_kernels(device: torch.device) -> bool:
    """Whether a decoding step on ``device`` moves its data with the Triton kernels (RING_KERNELS)."""
    if RING_KERNELS == "off" or torch.compiler.is_compiling():
        return False
    from ._optional import has_triton
    if not has_triton():
        return False
    from .ops._triton.env import INTERPRET, triton_available
    if not triton_available():
        return False
    return device.type == "cuda" or (RING_KERNELS == "on" and device.type == "cpu" and INTERPRET)


def _resolve(kind: str, backend: str, x: torch.Tensor, args: tuple, kw: dict):
    """The backend kvcompress.functional would run for this call (ValueError if none)."""
    if backend != "auto":
        return _backends.get(kind, backend)
    for b in _backends.backends(kind):
        if b.accepts_auto(x, *args, **kw):
            return b
    raise ValueError(f"{kind}: no registered backend runs on device {x.device.type} with dtype {x.dtype}")


def _compress_buffer(kind: str, buf: torch.Tensor, D: int, params, L: int, S: int, pe, backend: str,
                     kind_kwargs: dict) -> torch.Tensor:
    """The windows gathered into ``buf`` (H, N, L, n_in*D) -> (N, H, D_out),
    through kvcompress.functional: as N batch rows (N, H, L, n_in*D) or, for
    the backends ``_one_sequence`` picks, as one sequence (1, H, N*L,
    n_in*D) with stride L; both are views of buf."""
    H, N, _, Dt = buf.shape
    kw = dict(kind_kwargs)
    if _kinds.get(kind).pe:
        kw["pe"] = pe
    rows = buf.permute(1, 0, 2, 3)                                             # [N, H, L, n_in*D]
    ins = rows.split(D, dim=3) if Dt > D else (rows,)
    b = _resolve(kind, backend, ins[0], (*ins[1:], *params), dict(kw, block_size=L, stride=S, padding="valid"))
    f = getattr(_functional, kind)
    if _one_sequence(b, kind_kwargs):
        seq = buf.view(1, H, N * L, Dt)
        ins = seq.split(D, dim=3) if Dt > D else (seq,)
        return f(*ins, *params, block_size=L, stride=L, padding="valid", backend=b.name, **kw)[0].transpose(0, 1)
    return f(*ins, *params, block_size=L, stride=S, padding="valid", backend=b.name, **kw)[:, :, 0]


def _step_ring_kernels(kind, cache, new, params, pe, backend, kind_kwargs):
    """decode_step with its data movement in two Triton launches around the
    compression (``ring_window``, ``ring_advance``): the same result.

    The windows are gathered into one buffer (H, N, L, n_in*D), which
    ``_compress_buffer`` hands over without a copy.
    """
    from .ops._triton.ring import ring_advance, ring_window
    N, L, S, H, D = cache.max_streams, cache.block_size, cache.stride, cache.heads, cache.dim
    buf = torch.empty(H, N, L, cache.ring.shape[3], dtype=cache.dtype, device=cache.device)
    emitted = torch.empty(N, dtype=torch.bool, device=cache.device)
    ring_window(cache.ring, new, cache.n_tokens, cache.active, buf.permute(1, 0, 2, 3), emitted, stride=S,
                pre=cache.pad_tokens)
    y = _compress_buffer(kind, buf, D, params, L, S, pe, backend, kind_kwargs)
    out = torch.empty(N, H, y.shape[2], dtype=y.dtype, device=y.device)        # [N, H, D_out]
    ring_advance(cache.ring, new, cache.n_tokens, cache.n_windows, cache.active, emitted, y, out,
                 pre=cache.pad_tokens)
    return out, emitted
