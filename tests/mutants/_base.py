"""A plain, explicit torch implementation of the six kinds with bug knobs.

With every knob at its default (``Bugs()``), the functions here are a correct
implementation: windows are gathered by index from x (B, H, T, D) into
(B, H, W, L, D), then each kind is one einsum in the accumulation dtype.
``tests/test_mutants.py`` runs the suite on these defaults as a control:
each mutant then differs from an accepted implementation by exactly one
knob, so a kill is caused by that knob and nothing else.

Knobs imitate the way real kernels go wrong; reads outside a sequence are
zero (a masked load with ``other=0``), so a wrong window start reads zeros or
a neighbour's tokens instead of crashing, as a Triton or CUDA kernel would.
Everything is differentiable, so a gradient property judges a mutant by its
values too, not by an autograd error.

Backward bugs (gradient knobs of ``Bugs``, ``linear``'s ``dx_weight_row_major``,
``gated_pool``'s ``z_grad_chunk``) rewire the graph without changing a value
(``torch.where(m, t, t.detach())``: the same value, no gradient where m is
False); ``backward_only`` returns the bug-free forward bit for bit and sends
the cotangent through the rewired graph, so only a gradient property can see
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Bugs:
    """One field per kind of mistake; the defaults are correct.

    Windowing: ``start_shift`` (tokens added to every window start),
    ``step`` (Callable[[L, S], int], the distance between window starts),
    ``left_pad`` (Callable[[L, S], int], zero tokens before a sequence with
    padding="left"), ``seq_start`` (Callable[[s, S], int], where the windows
    of a sequence starting at token s are anchored), ``count``
    (Callable[[n, L, S, padding], int], windows of a sequence of n tokens),
    ``pad_each_sequence`` (False: packed sequences after the first read
    their predecessor's tokens where pad tokens belong).
    Memory: ``assume_contiguous`` (read x's storage with contiguous strides).
    pe: ``pe_on_pad`` (False: pad tokens stay zero), ``pe_reversed`` (pe[h, L-1-j]),
    ``pe_in_values`` (False, attention_pool: pe only in the logits).
    Groups: ``group_of_head`` (Callable[[h, H, G], int]).
    Numerics: ``half_accumulate`` (sums carried in x's dtype, one rounding per
    term), ``out_in_input_dtype`` (False: return the accumulation dtype).
    Tile boundaries (only production shapes reach them,
    kvcompress/testing/production.py): ``feature_tile`` (features d >= tile
    of x read as feature d mod tile), ``late_windows`` ((block, shift):
    windows from index ``block`` on in a sequence start ``shift`` tokens
    late), ``max_offset`` (tokens at offset >= max_offset in their sequence
    read as zeros).
    Backward only (value-preserving rewirings, used through ``backward_only``):
    ``dx_overlap`` ("last": a token's dx comes only from the last window
    holding it; "double": a token held by several windows gets each of their
    contributions twice), ``dpe_on_pad`` (False: pe's gradient skips pad
    positions), ``dx_feature_tile`` (x's features d >= tile get no gradient),
    ``param_grad`` (a weight's gradient over the windows, ``window_param``:
    "first_half" only from the first half of the B * W windows, "half"
    summed over them in x's dtype, one rounding per window),
    ``param_grad_first_head`` (a group's parameter gradient only from the
    first head of the group).
    """

    start_shift: int = 0
    step: Callable[[int, int], int] = lambda L, S: S
    left_pad: Callable[[int, int], int] = lambda L, S: L - S
    seq_start: Callable[[int, int], int] = lambda s, S: s
    count: Callable[[int, int, int, str], int] | None = None
    pad_each_sequence: bool = True
    assume_contiguous: bool = False
    pe_on_pad: bool = True
    pe_reversed: bool = False
    pe_in_values: bool = True
    group_of_head: Callable[[int, int, int], int] = lambda h, H, G: h // (H // G)
    half_accumulate: bool = False
    out_in_input_dtype: bool = True
    feature_tile: int | None = None
    late_windows: tuple[int, int] | None = None
    max_offset: int | None = None
    dx_overlap: str | None = None
    dpe_on_pad: bool = True
    dx_feature_tile: int | None = None
    param_grad: str | None = None
    param_grad_first_head: bool = False


OK = Bugs()


class _GradFrom(torch.autograd.Function):
    """y's values; the cotangent goes to y_grad's graph (same shape and dtype)."""

    @staticmethod
    def forward(ctx, y, y_grad):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return None, g


def backward_only(fn: Callable, buggy: dict, *args, **kwargs) -> torch.Tensor:
    """fn(*args, **kwargs) bit for bit, with the gradient of
    fn(*args, **kwargs, **buggy) (a backward kernel with a bug under a right
    forward kernel). The buggy graph is built only when a gradient can flow."""
    with torch.no_grad():
        y = fn(*args, **kwargs)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return y
    return _GradFrom.apply(y, fn(*args, **kwargs, **buggy))


def grad_where(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t's values; its gradient only where ``keep`` (broadcast to t) holds."""
    return torch.where(keep, t, t.detach())


class _SumInDtype(torch.autograd.Function):
    """w (H, *P) -> (B, H, W, *P), expanded; its gradient sums the B * W
    window terms one at a time in ``dtype``, rounding at every term."""

    @staticmethod
    def forward(ctx, w, B, W, dtype):
        ctx.dtype = dtype
        return w[None, :, None].expand(B, -1, W, *w.shape[1:]).clone()

    @staticmethod
    def backward(ctx, g):
        acc = torch.zeros(g.shape[1:2] + g.shape[3:], dtype=ctx.dtype, device=g.device)   # [H, *P]
        for b in range(g.shape[0]):
            for w in range(g.shape[2]):
                acc = acc + g[b, :, w].to(ctx.dtype)
        return acc.to(g.dtype), None, None, None


def window_param(wh: torch.Tensor, B: int, W: int, x: torch.Tensor, bugs: Bugs) -> torch.Tensor:
    """A weight of every head, wh (H, *P), as seen by every window: (1, H, 1, *P),
    or (B, H, W, *P) under ``param_grad`` (its gradient is then a sum over
    the windows that goes wrong)."""
    if bugs.param_grad is None:
        return wh[None, :, None]
    if bugs.param_grad == "half":
        return _SumInDtype.apply(wh, B, W, x.dtype)
    assert bugs.param_grad == "first_half", bugs.param_grad
    per = wh[None, :, None].expand(B, -1, W, *wh.shape[1:])
    first = torch.arange(B * W, device=wh.device).reshape(B, 1, W) < -(-B * W // 2)    # [B, 1, W]
    return grad_where(first.reshape(B, 1, W, *[1] * (wh.dim() - 1)), per)


def _overlap_grad(win, idx, valid, T, mode):
    """win (B, H, W, L, D) gathered at tokens idx (W, L): its gradient per
    ``Bugs.dx_overlap``, its values unchanged."""
    t = torch.where(valid, idx, T).to(win.device)                               # [W, L]; T: a pad
    w = torch.arange(idx.shape[0], device=win.device)[:, None].expand_as(t)     # [W, L]
    if mode == "last":
        last = torch.full((T + 1,), -1, dtype=torch.long, device=win.device)
        last = last.scatter_reduce(0, t.flatten(), w.flatten(), reduce="amax")   # last window holding each token
        return grad_where((w == last[t])[..., None], win)
    assert mode == "double", mode
    held = torch.bincount(t.flatten(), minlength=T + 1)                          # windows holding each token
    shared = ((held[t] > 1) & valid.to(win.device))[..., None]                  # [W, L, 1]
    return win + torch.where(shared, win - win.detach(), torch.zeros_like(win))


def num_windows(n: int, L: int, S: int, padding: str) -> int:
    """Windows in a sequence of n tokens (SPEC section 2)."""
    if padding == "left":
        return n // S
    return (n - L) // S + 1 if n >= L else 0


def acc_dtype(x: torch.Tensor, bugs: Bugs) -> torch.dtype:
    """float64 for float64 input, else float32 (SPEC section 3); x's own
    dtype under ``half_accumulate``."""
    if bugs.half_accumulate or x.dtype == torch.float64:
        return x.dtype
    return torch.float32


def sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """[start, end) token range of every sequence."""
    if cu_seqlens is None:
        return [(0, x.shape[2])]
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def window_index(x, *, block_size, stride, padding, cu_seqlens, bugs: Bugs):
    """(idx, valid): (W, L) token index of every window position and whether
    it is a real token of its sequence (else a zero pad token)."""
    L, S = block_size, stride
    P = bugs.left_pad(L, S) if padding == "left" else 0
    count = bugs.count or num_windows
    idx, valid = [], []
    for s, e in sequences(x, cu_seqlens):
        floor = s if bugs.pad_each_sequence else 0
        for i in range(count(e - s, L, S, padding)):
            first = bugs.seq_start(s, S) + i * bugs.step(L, S) - P + bugs.start_shift
            if bugs.late_windows is not None and i >= bugs.late_windows[0]:
                first += bugs.late_windows[1]
            pos = torch.arange(first, first + L)                       # [L]
            idx.append(pos)
            ok = (pos >= floor) & (pos < e)
            if bugs.max_offset is not None:
                ok &= pos - s < bugs.max_offset
            valid.append(ok)
    if not idx:
        return torch.zeros(0, L, dtype=torch.long), torch.zeros(0, L, dtype=torch.bool)
    return torch.stack(idx), torch.stack(valid)


def gather(x, *, block_size, stride, padding, pe, cu_seqlens, bugs: Bugs, with_pe: bool = True):
    """Windows (B, H, W, L, D) in the accumulation dtype, pe added."""
    if bugs.assume_contiguous:
        # what a kernel does when it is handed x.data_ptr() and computes
        # offsets from the logical shape: right only for contiguous x
        strides = torch.empty(x.shape, device="meta").stride()
        x = x.as_strided(x.shape, strides, x.storage_offset())
    B, H, T, D = x.shape
    if bugs.feature_tile is not None and D > bugs.feature_tile:
        # a feature-tile loop whose load pointer never advances past tile 0
        x = x[..., torch.arange(D, device=x.device) % bugs.feature_tile]
    if bugs.dx_feature_tile is not None and D > bugs.dx_feature_tile:
        # a dx kernel whose feature-tile loop stops after the first tile
        x = grad_where(torch.arange(D, device=x.device) < bugs.dx_feature_tile, x)
    acc = acc_dtype(x, bugs)
    idx, valid = window_index(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                              bugs=bugs)
    idx, valid = idx.to(x.device), valid.to(x.device)
    xz = torch.cat([x.to(acc), x.new_zeros(B, H, 1, D, dtype=acc)], dim=2)   # [B, H, T+1, D]; token T is 0
    win = xz[:, :, torch.where(valid, idx, T)]                                 # [B, H, W, L, D]
    if bugs.dx_overlap is not None:
        win = _overlap_grad(win, idx, valid, T, bugs.dx_overlap)
    if pe is not None and with_pe:
        p = pe.to(acc).flip(1) if bugs.pe_reversed else pe.to(acc)             # [H, L, D]
        p = p[None, :, None]                                                   # [1, H, 1, L, D]
        if not bugs.dpe_on_pad:
            p = grad_where(valid[None, None, :, :, None], p)                   # [1, H, W, L, D]
        win = win + (p if bugs.pe_on_pad else p * valid[None, None, :, :, None])
    return win


def heads_of_groups(w: torch.Tensor, H: int, bugs: Bugs) -> torch.Tensor:
    """(G, ...) -> (H, ...): the weight set of every head."""
    G = w.shape[0]
    g = [bugs.group_of_head(h, H, G) for h in range(H)]
    wh = w[torch.tensor(g, dtype=torch.long, device=w.device)]
    if bugs.param_grad_first_head:
        first = torch.tensor([g.index(gh) == h for h, gh in enumerate(g)], device=w.device)   # [H]
        wh = grad_where(first.reshape(H, *[1] * (w.dim() - 1)), wh)
    return wh


def finish(y: torch.Tensor, x: torch.Tensor, bugs: Bugs) -> torch.Tensor:
    """The output (B, H, W, C) in x's dtype (the accumulation dtype under
    ``out_in_input_dtype=False``)."""
    return y.to(x.dtype) if bugs.out_in_input_dtype else y


def dot(a: torch.Tensor, b: torch.Tensor, bugs: Bugs) -> torch.Tensor:
    """sum_k a[..., k, None] * b[..., k, :]: one matmul, or under
    ``half_accumulate`` a running sum rounded to the input dtype at every
    term (a kernel whose accumulator has x's dtype).
    a: [..., K]; b: [..., K, C] broadcastable -> [..., C]."""
    if not bugs.half_accumulate:
        # einsum contracts broadcast dims without expanding them (a matmul
        # would copy b once per window at production shapes)
        return torch.einsum("...k,...kc->...c", a, b)
    y = torch.zeros(torch.broadcast_shapes(a.shape[:-1], b.shape[:-2]) + b.shape[-1:], dtype=a.dtype,
                    device=a.device)
    for k in range(a.shape[-1]):
        y = y + a[..., k, None] * b[..., k, :]
    return y


# ---- the kinds, each with the reference signature plus ``bugs`` ----

def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, bugs: Bugs = OK,
              divide_by_real_tokens: bool = False):
    """x (B, H, T, D) -> (B, H, W, D). ``divide_by_real_tokens``: divide by
    the number of non-pad tokens instead of L."""
    win = gather(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens, bugs=bugs)
    if bugs.half_accumulate:
        y = win[:, :, :, 0]
        for j in range(1, block_size):
            y = y + win[:, :, :, j]                                  # [B, H, W, D], rounded every step
    else:
        y = win.sum(3)                                               # [B, H, W, D]
    if divide_by_real_tokens:
        _, valid = window_index(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                                bugs=bugs)
        n = valid.sum(1).clamp(min=1).to(device=x.device, dtype=y.dtype)   # [W]
        y = y / n[:, None]
    else:
        y = y / block_size
    return finish(y, x, bugs)


def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, bugs: Bugs = OK):
    """x (B, H, T, D), weight (G, L) -> (B, H, W, D)."""
    win = gather(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens, bugs=bugs)
    wh = heads_of_groups(weight.to(win.dtype), x.shape[1], bugs)     # [H, L]
    y = dot(win.transpose(3, 4), wh[None, :, None, None, :, None], bugs)   # [B, H, W, D, 1]
    return finish(y.squeeze(-1), x, bugs)


def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None,
           bugs: Bugs = OK, bias_per_position: bool = False, flip_kernel: bool = False,
           dx_weight_row_major: bool = False):
    """x (B, H, T, D), weight (G, L, D, D_out), bias (G, D_out) or None ->
    (B, H, W, D_out). ``bias_per_position``: bias added once per window
    position; ``flip_kernel``: weight[g, L-1-j] (convolution, not correlation);
    ``dx_weight_row_major`` (backward only): x's gradient multiplies g by
    weight[g, j]'s memory read as a row-major (D_out, D) matrix instead of
    by weight[g, j]^T."""
    win = gather(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens, bugs=bugs)
    B, H, W, L, D = win.shape
    wh = heads_of_groups(weight.to(win.dtype), H, bugs)              # [H, L, D, D_out]
    if flip_kernel:
        wh = wh.flip(1)
    flat = win.reshape(B, H, W, L * D)
    y = dot(flat, window_param(wh.reshape(H, L * D, -1), B, W, x, bugs), bugs)   # [B, H, W, D_out]
    if dx_weight_row_major:
        # same values; x's gradient through W read as (L, D_out, D), W's through the right product
        wv = wh.detach().reshape(H, L, -1, D).transpose(2, 3).reshape(1, H, 1, L * D, -1)
        yv = dot(flat, wv, bugs)
        y = dot(flat.detach(), wh.reshape(1, H, 1, L * D, -1), bugs) + (yv - yv.detach())
    if bias is not None:
        bh = heads_of_groups(bias.to(win.dtype), H, bugs)[None, :, None]         # [1, H, 1, D_out]
        y = y + (L if bias_per_position else 1) * bh
    return finish(y, x, bugs)


def _gelu_tanh(z):
    return F.gelu(z, approximate="tanh")


def _relu_where(z):
    # tl.where(z > 0, z, 0): NaN > 0 is False, so NaN becomes 0
    return torch.where(z > 0, z, torch.zeros_like(z))


ACTIVATIONS = {"relu": F.relu, "gelu": lambda z: F.gelu(z, approximate="none"), "silu": F.silu}
WRONG_ACTIVATIONS = {"gelu_tanh": _gelu_tanh, "relu_where": _relu_where}


def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None,
        bugs: Bugs = OK, feature_major: bool = False, activations: dict | None = None,
        b2_only_with_b1: bool = False):
    """x (B, H, T, D), w1 (G, L*D, F), b1 (G, F) or None, w2 (G, F, D_out),
    b2 (G, D_out) or None -> (B, H, W, D_out). ``feature_major``: flatten the
    window as (d n) instead of (n d); ``activations``: overrides of the
    activation table; ``b2_only_with_b1``: one has-bias flag for both layers."""
    win = gather(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens, bugs=bugs)
    B, H, W, L, D = win.shape
    flat = (win.transpose(3, 4) if feature_major else win).reshape(B, H, W, L * D)   # [B, H, W, L*D]
    acc = win.dtype
    pre = dot(flat, window_param(heads_of_groups(w1.to(acc), H, bugs), B, W, x, bugs), bugs)   # [B, H, W, F]
    if b1 is not None:
        pre = pre + heads_of_groups(b1.to(acc), H, bugs)[None, :, None]
    act = {**ACTIVATIONS, **(activations or {})}[activation]
    y = dot(act(pre), heads_of_groups(w2.to(acc), H, bugs)[None, :, None], bugs)     # [B, H, W, D_out]
    if b2 is not None and (b1 is not None or not b2_only_with_b1):
        y = y + heads_of_groups(b2.to(acc), H, bugs)[None, :, None]
    return finish(y, x, bugs)


def _softmax_shifted(z, dim):
    return torch.softmax(z, dim=dim)


def _softmax_unshifted(z, dim):
    # exp(z) / sum exp(z) as written in the paper, without subtracting the max
    e = torch.exp(z)
    return e / e.sum(dim, keepdim=True)


def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, bugs: Bugs = OK,
                   softmax_dim: int = 3, shift: bool = True, transpose_weight: bool = False):
    """x (B, H, T, D), weight (G, D, D) -> (B, H, W, D). ``softmax_dim``: 3
    (window positions, correct) or 4 (features); ``shift``: subtract the
    max; ``transpose_weight``: Z = X @ weight[g].T (nn.Linear's orientation)."""
    kw = dict(block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens, bugs=bugs)
    win = gather(x, pe=pe, **kw)                                       # [B, H, W, L, D], pe added
    values = win if bugs.pe_in_values else gather(x, pe=pe, with_pe=False, **kw)
    B, H, W = win.shape[:3]
    wh = heads_of_groups(weight.to(win.dtype), H, bugs)               # [H, D, D]
    if transpose_weight:
        wh = wh.transpose(1, 2)
    z = dot(win, window_param(wh, B, W, x, bugs)[:, :, :, None], bugs)   # [B, H, W, L, D]
    p = (_softmax_shifted if shift else _softmax_unshifted)(z, softmax_dim)
    y = (p.to(values.dtype) * values).sum(3)                           # [B, H, W, D]
    return finish(y, x, bugs)


def banded_mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None, bugs: Bugs = OK):
    """mean_pool as one dense matmul: y = A @ x with A (W, T) holding 1/L
    inside each window and 0 elsewhere; pe's mean added per head."""
    B, H, T, D = x.shape
    acc = acc_dtype(x, bugs)
    idx, valid = window_index(x, block_size=block_size, stride=stride, padding=padding, cu_seqlens=cu_seqlens,
                              bugs=bugs)
    A = torch.zeros(idx.shape[0], T + 1, dtype=acc)                     # [W, T+1]; column T collects pads
    A.scatter_add_(1, torch.where(valid, idx, T), torch.full(idx.shape, 1.0 / block_size, dtype=acc))
    y = torch.einsum("wt,bhtd->bhwd", A[:, :T].to(x.device), x.to(acc))  # [B, H, W, D]
    if pe is not None:
        y = y + pe.to(acc).mean(1)[None, :, None]
    return finish(y, x, bugs)



def gated_pool(x, z, bias=None, *, split=False, block_size, stride, padding="valid", cu_seqlens=None,
               bugs: Bugs = OK, pads_weighted: bool = False, chunk_reversed: bool = False, softmax_dim: int = 3,
               bias_per_chunk: bool = True, z_grad_chunk: int | None = None):
    """x, z (B, H, T, Dx), bias (G, L, D_out) or None -> (B, H, W, D_out)
    (SPEC 3b). ``pads_weighted``: a pad is a zero token (score z = 0 plus
    its bias) instead of weight 0; ``chunk_reversed``: with split, position j
    reads chunk C - 1 - j // S; ``softmax_dim``: 3 (positions, correct) or
    4 (features); ``bias_per_chunk``: False reads bias[g, j mod S] (the
    first chunk's positions) for every chunk; ``z_grad_chunk`` (backward
    only): with split, the positions of this chunk (mod C) send no gradient
    to z."""
    L, S = block_size, stride
    kw = dict(block_size=L, stride=S, padding=padding, pe=None, cu_seqlens=cu_seqlens, bugs=bugs)
    v, s = gather(x, **kw), gather(z, **kw)                            # [B, H, W, L, Dx]
    _, valid = window_index(x, block_size=L, stride=S, padding=padding, cu_seqlens=cu_seqlens, bugs=bugs)
    B, H, W, _, Dx = v.shape
    if split:
        C = L // S
        c = torch.arange(L) // S                                       # [L] chunk of each position
        if chunk_reversed:
            c = C - 1 - c
        j = torch.arange(L)
        v = v.reshape(B, H, W, L, C, Dx // C)[:, :, :, j, c]           # [B, H, W, L, D_out]
        s = s.reshape(B, H, W, L, C, Dx // C)[:, :, :, j, c]
        if z_grad_chunk is not None:
            s = grad_where((c != z_grad_chunk % C).to(s.device)[:, None], s)
    if bias is not None:
        bh = heads_of_groups(bias.to(s.dtype), H, bugs)                # [H, L, D_out]
        if not bias_per_chunk:
            bh = bh[:, torch.arange(L) % S]
        s = s + bh[None, :, None]
    if not pads_weighted:
        s = s.masked_fill(~valid.to(x.device)[None, None, :, :, None], float("-inf"))
    p = torch.softmax(s, dim=softmax_dim)
    y = dot(p.transpose(3, 4), v.transpose(3, 4)[..., None], bugs).squeeze(-1)   # [B, H, W, D_out]
    return finish(y, x, bugs)
