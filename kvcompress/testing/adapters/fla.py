"""fla-core's ``mean_pooling`` behind our ``mean_pool`` signature.

The peer (``pip install fla-core``; module ``fla.ops.utils.pooling``)::

    o = mean_pooling(x, chunk_size, cu_seqlens=None)

x (B, T, H, D) (made contiguous by the peer), or (1, T, H, D) with
cu_seqlens (N+1,); o (B, ceil(T / chunk_size), H, D), or packed
(1, sum_n ceil(n / chunk_size), H, D), in x's dtype. Chunks do not
overlap (S == L), and the last chunk of a sequence may be partial: it is
averaged over the tokens it has.

Our contract has no partial windows ("valid": W = n // L per sequence when
S == L), so the adapter drops each sequence's partial last chunk from the
peer's output and keeps its n // L full chunks. It cannot be avoided by a
domain: a domain bounds L, S and the paddings, not n mod L, and packed
sequences of every length are part of the contract. Dropping an output
(rather than calling the peer on truncated input) keeps the partial chunk
inside the peer's computation, so the locality and independence properties
still see whether it disturbs the full ones; its gradient is zero, as it
should be for tokens that belong to no window.

What the peer supports, read from its code and confirmed by running it
(the Domain below says the same):

- padding "valid", S == L; L a power of two (the chunk is a ``tl.arange``
  range), bounded here by 256 (one chunk is one register tile).
- float32, float16, bfloat16: accumulation in float32. float64 runs but is
  also accumulated in float32, below the contract's float64 accumulation,
  so it is outside the domain: given float64 (``--domain``), the suite
  fails it on its smallest case, one token and L = 1, whose mean comes back
  rounded to float32 (4.6e-9 off, 3e7 times the float64 tolerance).
- no pe, no weights; batched and packed inputs; every layout (the peer
  copies x contiguous); empty inputs; differentiable (Triton backward).

Under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) the peer's
autotuner cannot time its configs (there is no GPU driver), so the adapter
pins each of its two kernels to the autotuner's first config (BD = 16, a
tile width; masks make every tile width compute the same values). On a GPU
the peer runs untouched.
"""

from __future__ import annotations

import torch

from ..domain import declare_domain
from . import import_peer, interpreting

PACKAGE = "the PyPI package fla-core (module fla)"
HOW = "Install it with `pip install fla-core` (it needs torch and triton)."
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _pooling():
    return import_peer("fla.ops.utils.pooling", package=PACKAGE, how=HOW)


def _pin_first_config(mod) -> None:
    """Interpreter only: one config per autotuned kernel, so it is not timed."""
    for name in ("mean_pooling_fwd_kernel", "mean_pooling_bwd_kernel"):
        k = getattr(mod, name, None)
        while k is not None and not hasattr(k, "configs"):   # through @triton.heuristics to the autotuner
            k = getattr(k, "fn", None)
        if k is not None and len(k.configs) > 1:
            k.configs = k.configs[:1]


def _full_chunks(cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    """Indices (W,) of the full chunks among the peer's packed output chunks:
    sequence k of n tokens owns ceil(n / L) chunks, the first n // L full."""
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)            # [N]
    owned = (n + L - 1) // L
    first = torch.cumsum(owned, 0) - owned                             # [N] first chunk of each sequence
    full = n // L
    seq = torch.repeat_interleave(torch.arange(len(n), device=n.device), full)
    within = torch.arange(int(full.sum()), device=n.device) - torch.repeat_interleave(torch.cumsum(full, 0) - full,
                                                                                      full)
    return first[seq] + within


@declare_domain(paddings=("valid",), strides="equal", block_sizes=BLOCK_SIZES, pe=False,
                dtypes=("float32", "float16", "bfloat16"))
def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """mean_pool through fla's ``mean_pooling`` (chunk_size = block_size).

    x (B, H, T, D) float32/float16/bfloat16 any strides, or packed
    (1, H, T, D) with cu_seqlens (N+1,) int32/int64; block_size a power of
    two up to 256; stride == block_size; padding "valid"; pe None. Returns
    (B, H, W, D) in x's dtype, W = T // L (per sequence when packed).
    Raises ImportError without fla-core, ValueError for an argument outside
    the peer's domain.
    """
    if padding != "valid" or stride != block_size or pe is not None:
        raise ValueError("fla.mean_pool: the peer pools non-overlapping chunks (padding='valid', "
                         f"stride == block_size) without pe; got padding={padding!r}, stride={stride}, "
                         f"block_size={block_size}, pe={'given' if pe is not None else None}")
    mod = _pooling()
    if interpreting(x):
        _pin_first_config(mod)
    L = block_size
    xt = x.transpose(1, 2)                                             # [B, T, H, D]
    o = mod.mean_pooling(xt, L, cu_seqlens=cu_seqlens)                 # [B, NT, H, D], partial chunks included
    if cu_seqlens is None:
        o = o[:, : x.shape[2] // L]                                    # [B, W, H, D]
    else:
        o = o[:, _full_chunks(cu_seqlens, L)]                          # [1, W, H, D]
    return o.transpose(1, 2)                                           # [B, H, W, D]
