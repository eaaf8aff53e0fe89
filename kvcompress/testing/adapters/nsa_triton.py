"""XunhaoLai/native-sparse-attention-triton's compress kernels behind our
signatures (mean_pool, weighted_pool, linear).

The peer (``native_sparse_attention.ops``, not on PyPI: put a checkout on
PYTHONPATH) takes packed tokens and returns its own offsets::

    y, y_cu_seqlens = avgpool_compress(x, None, cu_seqlens, kernel_size, kernel_stride, pe)
    y, y_cu_seqlens = weightedpool_compress(x, w, cu_seqlens, kernel_size, kernel_stride, pe)
    y, y_cu_seqlens = linear_compress(x, w, cu_seqlens, kernel_size, kernel_stride, pe)

x (T, H, D) any strides, cu_seqlens int32 (N+1,), w (H, L) for the pool and
(H, L*D, D) for linear (row j*D + d: token j, feature d, the token-major
flattening of docs/semantics.md), pe (H, L, D) or None; y (W_total, H, D)
in x's dtype. Windows are "valid": W = (n - L) // S + 1 per sequence of n
>= L tokens, else 0, the contract's rule (each call checks the offsets the
peer returns against ``kvcompress.compressed_cu_seqlens``).

What the peer supports, read from its code and confirmed by running it
(the Domain below each says the same):

- float16 and bfloat16 only (it asserts so). linear accumulates in float32
  (``tl.dot``); the pools do not: their forward kernel sums the loaded
  half-precision tokens (and token * weight products) with ``tl.sum``,
  which keeps a float16/bfloat16 sum, below the contract's float32
  accumulation. That is a finding, not a domain limit: the suite reports
  it (errors of about two float16 ulps on 16-token means, over the
  tolerance), and a run keeps it visible with an ``--xfails-file`` rather
  than hiding it behind a narrower domain.
- L in {16, 32, 64, 128} and S dividing L (asserted).
- one weight set per head (w's first dim is H): groups G == H.
- pe is added as a bias after compression (sum_j w_j pe_j, or the mean of
  pe over j): the same value as adding pe to every window, since valid
  windows have no pad tokens. Rounded: the peer rounds y and that bias to
  the input dtype before adding them, one rounding more than the output's.
- linear: D_out == D, no bias, D a multiple of 8 (asserted).
- differentiable: autograd Functions with Triton backward kernels (x and
  w); pe's gradient comes from torch through the bias.
- packed and batched inputs (batched x is packed as B sequences of T
  tokens by the adapter), every layout (the kernels read strides).
- empty inputs: not supported. A call without sequences (B == 0, or
  cu_seqlens == [0]) fails in the peer, which sizes its grid with the max
  of the per-sequence window counts (RuntimeError from ``max()`` of an
  empty tensor; the suite's shrunk case: packed, seqlens=()). Calls whose
  sequences are all shorter than L do run, but the Domain's one ``empty``
  flag covers both. Sequences shorter than L inside a batch are supported.

The kernels build ``tl.make_block_ptr`` pointers, which Triton 3.9
removed: they need Triton 3.8 or older (on 3.9 every call raises
NotImplementedError, which scripts/verify_peers.py reports as "not
runnable").

Under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) the only
accommodation is ``torch.cuda.set_device`` made a no-op for the CPU device
during the call (linear_compress calls it first). The interpreter's
bfloat16 arithmetic is not faithful (the pools return values near 1e32
there), so check float16 on a CPU and bfloat16 on a GPU.
"""

from __future__ import annotations

import torch

from ..domain import declare_domain
from . import check_offsets, from_packed, import_peer, interpreting, no_cuda_set_device, seq_offsets, to_packed

PACKAGE = "XunhaoLai/native-sparse-attention-triton (module native_sparse_attention)"
HOW = ("It is not on PyPI: clone the repository and put its root on PYTHONPATH "
       "(PYTHONPATH=path/to/native-sparse-attention-triton).")
BLOCK_SIZES = (16, 32, 64, 128)

_COMMON = dict(paddings=("valid",), groups="per_head", dtypes=("float16", "bfloat16"), block_sizes=BLOCK_SIZES,
               strides="divides", empty=False)


def _ops():
    return import_peer("native_sparse_attention.ops", package=PACKAGE, how=HOW)


def _call(name, x, w, *, block_size, stride, padding, pe, cu_seqlens):
    """Pack x, call the peer's ``name``, check its offsets, unpack:
    x (B, H, T, D) -> (B, H, W, D_out)."""
    if padding != "valid":
        raise ValueError(f"nsa_triton.{name}: the peer supports padding='valid' only, got {padding!r}")
    fn = getattr(_ops(), name)
    cu = seq_offsets(x, cu_seqlens)                    # [N+1] int32
    tokens = to_packed(x)                              # [T_total, H, D]
    if interpreting(x):
        with no_cuda_set_device():
            y, y_cu = fn(tokens, w, cu, block_size, stride, pe)
    else:
        y, y_cu = fn(tokens, w, cu, block_size, stride, pe)   # [W_total, H, D_out], [N+1]
    check_offsets(f"native_sparse_attention.ops.{name}", y_cu, cu, block_size, stride)
    return from_packed(y, x, cu_seqlens)


def _per_head(name: str, weight: torch.Tensor, H: int) -> torch.Tensor:
    if weight.shape[0] != H:
        raise ValueError(f"nsa_triton.{name}: the peer has one weight set per head (G == H = {H}), "
                         f"got G = {weight.shape[0]}")
    return weight


@declare_domain(**_COMMON)
def mean_pool(x, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """mean_pool through the peer's ``avgpool_compress``.

    x (B, H, T, D) float16/bfloat16 any strides, or packed (1, H, T, D) with
    cu_seqlens (N+1,) int32/int64; block_size in {16, 32, 64, 128}; stride
    dividing it; padding "valid"; pe (H, L, D) or None. Returns
    (B, H, W, D) in x's dtype. Raises ImportError without the peer,
    ValueError for another padding; the peer asserts the rest.
    """
    return _call("avgpool_compress", x, None, block_size=block_size, stride=stride, padding=padding, pe=pe,
                 cu_seqlens=cu_seqlens)


@declare_domain(**_COMMON)
def weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """weighted_pool through the peer's ``weightedpool_compress``.

    weight (G, L) with G == H: the peer's (H, L) as it is. Other arguments
    and errors as :func:`mean_pool` (ValueError also when G != H).
    """
    w = _per_head("weighted_pool", weight, x.shape[1])             # [H, L]
    return _call("weightedpool_compress", x, w, block_size=block_size, stride=stride, padding=padding, pe=pe,
                 cu_seqlens=cu_seqlens)


@declare_domain(**_COMMON, bias=False, d_out_equals_d=True, head_dim_multiple=8)
def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """linear through the peer's ``linear_compress``.

    weight (G, L, D, D) with G == H and D_out == D, reshaped to the peer's
    (H, L*D, D) (token-major rows, a view of a contiguous weight); bias must
    be None (the peer has none); D a multiple of 8. Other arguments and
    errors as :func:`mean_pool` (ValueError also for G != H, D_out != D or
    a bias).
    """
    H, D = x.shape[1], x.shape[3]
    w = _per_head("linear", weight, H)                               # [H, L, D, D_out]
    if bias is not None:
        raise ValueError("nsa_triton.linear: the peer's linear_compress has no bias")
    if w.shape[-1] != D:
        raise ValueError(f"nsa_triton.linear: the peer needs D_out == D = {D}, got {w.shape[-1]}")
    w = w.reshape(H, block_size * D, D)                              # [H, L*D, D]
    return _call("linear_compress", x, w, block_size=block_size, stride=stride, padding=padding, pe=pe,
                 cu_seqlens=cu_seqlens)
