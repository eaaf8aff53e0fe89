"""The seed's compress networks (native-sparse-attention-pytorch 0.2.3,
``compress_networks.py``) behind our signatures.

The seed compresses windows, not sequences: ``SparseAttention`` cuts keys
(b, h, n, d) into windows (b, h, w, n, d) with its ``split_compress_window``
(keep the first n // S * S tokens, ZeroPad L - S on the left, Unfold with
kernel L and stride S: our padding "left"), adds its intra-block positions
(h, n, d) (our ``pe``, pad positions included), and calls a network
``kv (b, h, w, n, d) -> (b, h, w, d)``. Each adapter here builds the same
windows with the same torch operations (pad, then unfold; "valid" windows
without the pad), and a packed batch sequence by sequence, its windows
concatenated on w (batch 1), which the window-wise networks cannot tell
from one sequence. The windowing is the adapter's; the network is the
seed's module, called with our parameters converted to its layout through
``torch.func.functional_call``, so gradients reach our tensors.

Adapters (seed network -> our kind, its domain):

- ``linear``: ``ConvLinearCompress(heads=H, dim_head=D, L)`` -> linear with
  G == H, D_out == D; a None bias runs as a zero conv bias; no empty input
  (the seed's conv raises when there is no window).
- ``linear_shared``: ``SingleProjection(dim_head=D, L)`` (heads=1) ->
  linear with G == 1, D_out == D, no bias.
- ``attention_pool``: ``AttentionPool(dim_head=D, L)`` -> attention_pool
  with G == 1; our weight is the seed's Linear weight transposed.
- ``mlp``: ``GroupedMLP(dim_head=D, L, heads=H, expand_factor)`` -> mlp
  with G == H, relu, D_out == D; None biases run as zeros.

The grouped ``SingleProjection`` (heads > 1) applies one (d, d) matrix to
every window position, i.e. a linear whose weight is equal across L: not a
domain of our linear (a domain bounds shapes and options, not tied
values), so it has no adapter. Nor has ``SparseAttention``'s default
``compress_mlp`` (Rearrange, ``nn.Linear(L*D, F)``, ReLU, ``nn.Linear(F, D)``,
shared by the heads): it is not a class of its own, only torch layers
built inside ``SparseAttention``, which cannot be built with dim_head 2
(its rotary embedding divides by dim_head - 2); it computes ``mlp`` with
G == 1, which ``kvcompress.functional.mlp`` covers.

Precision: the seed computes in the input dtype with torch's ops (float32
accumulation inside each matmul or conv), and stores every intermediate in
the input dtype: x + pe, the MLP hidden layer and the attention logits
(SPEC 3c's "io-intermediates" class, the default of a Domain, which these
adapters keep; kvcompress-verify's class column says whether a kernel also
met "strict").
"""

from __future__ import annotations

import functools

import torch

from ..domain import declare_domain
from . import import_peer

PACKAGE = "the PyPI package native-sparse-attention-pytorch (module native_sparse_attention_pytorch)"
HOW = "Install it with `pip install native-sparse-attention-pytorch==0.2.3`."


def _nets():
    return import_peer("native_sparse_attention_pytorch.compress_networks", package=PACKAGE, how=HOW)


def _expand_factor(F: int, dim: int) -> float:
    # the seed builds int(dim * factor) hidden units: aim half a unit above F
    return (F + 0.5) / dim


@functools.lru_cache(maxsize=64)
def _module(name: str, *args):
    with torch.random.fork_rng(devices=[]):
        return getattr(_nets(), name)(*args)


def windows(x, *, block_size, stride, padding, pe, cu_seqlens) -> torch.Tensor:
    """x (B, H, T, D) or packed (1, H, T, D) -> the seed's windows
    (B, H, W, L, D), pe (H, L, D) added to every window as the seed adds its
    intra-block positions (pad positions included)."""
    L, S = block_size, stride
    B, H, T, D = x.shape
    if cu_seqlens is None:
        parts = [_windows_one(x, L, S, padding)]
    else:
        cu = cu_seqlens.tolist()
        parts = [_windows_one(x[:, :, a:b], L, S, padding) for a, b in zip(cu[:-1], cu[1:])]
    kv = torch.cat(parts, dim=2) if parts else x.new_zeros(B, H, 0, L, D)   # [B, H, W, L, D]
    if pe is not None and kv.shape[2] > 0:
        kv = kv + pe[:, None]                                  # the seed's einx.add('b h w n d, h n d')
    return kv


def _windows_one(x, L, S, padding) -> torch.Tensor:
    B, H, T, D = x.shape
    if padding == "left":
        n = T // S * S                                         # the seed keeps the tokens up to a multiple of S
        x = torch.nn.functional.pad(x[:, :, :n], (0, 0, L - S, 0))   # [B, H, L - S + n, D]
    elif padding != "valid":
        raise ValueError(f"seed adapters: padding must be 'valid' or 'left', got {padding!r}")
    if x.shape[2] < L:
        return x.new_zeros(B, H, 0, L, D)
    return x.unfold(2, L, S).transpose(-1, -2)                 # [B, H, W, L, D]


def _call(module, params: dict, kv: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(module, params, (kv,))


def _zeros_if_none(t, shape, like):
    return like.new_zeros(shape) if t is None else t


def _check(name, cond, msg):
    if not cond:
        raise ValueError(f"seed.{name}: {msg}")


@declare_domain(groups="per_head", d_out_equals_d=True, empty=False)
def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """linear through the seed's ``ConvLinearCompress(heads=H, dim_head=D, L)``.

    x (B, H, T, D) any strides, or packed (1, H, T, D) with cu_seqlens;
    weight (H, L, D, D) -> the grouped conv's weight (H*D, D, L) (group g,
    output o, input i, tap j = weight[g, j, i, o]); bias (H, D) or None (a
    zero conv bias). Returns (B, H, W, D) in x's dtype. Raises ImportError
    without the seed, ValueError outside the domain; the seed's conv raises
    RuntimeError when there is no window.
    """
    B, H, T, D = x.shape
    L = block_size
    _check("linear", weight.shape[0] == H and weight.shape[-1] == D, "needs G == H and D_out == D")
    module = _module("ConvLinearCompress", H, D, L)
    kv = windows(x, block_size=L, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
    params = {"conv.weight": weight.permute(0, 3, 2, 1).reshape(H * D, D, L),          # [H*D_out, D, L]
              "conv.bias": _zeros_if_none(bias, (H, D), x).reshape(H * D)}
    return _call(module, params, kv)


@declare_domain(groups="shared", d_out_equals_d=True, bias=False)
def linear_shared(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """linear through the seed's ``SingleProjection(dim_head=D, L)`` (one
    ``nn.Linear(L*D, D, bias=False)`` for every head).

    weight (1, L, D, D) -> the Linear's (D, L*D) (row o, column j*D + i =
    weight[0, j, i, o]); bias must be None. Other arguments as :func:`linear`.
    """
    B, H, T, D = x.shape
    L = block_size
    _check("linear_shared", weight.shape[0] == 1 and weight.shape[-1] == D and bias is None,
           "needs G == 1, D_out == D and no bias")
    module = _module("SingleProjection", D, L)
    kv = windows(x, block_size=L, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
    return _call(module, {"compress.1.weight": weight[0].reshape(L * D, D).T}, kv)


@declare_domain(groups="shared")
def attention_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """attention_pool through the seed's ``AttentionPool(dim_head=D, L)``.

    weight (1, D, D): Z = X @ weight[0], so the seed's Linear weight
    (logits = kv @ W.T) is weight[0].T. Other arguments as :func:`linear`.
    """
    B, H, T, D = x.shape
    _check("attention_pool", weight.shape[0] == 1, "needs G == 1 (one Linear for every head)")
    module = _module("AttentionPool", D, block_size)
    kv = windows(x, block_size=block_size, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
    return _call(module, {"to_attn_logits.weight": weight[0].T}, kv)


@declare_domain(groups="per_head", d_out_equals_d=True, activations=("relu",))
def mlp(x, w1, b1, w2, b2, *, activation="relu", block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """mlp through the seed's ``GroupedMLP(dim_head=D, L, heads=H, expand_factor=F / (L*D))``.

    w1 (H, L*D, F), b1 (H, F) or None, w2 (H, F, D), b2 (H, D) or None (a
    None bias runs as zeros), activation "relu". Other arguments as
    :func:`linear`.
    """
    B, H, T, D = x.shape
    L, F = block_size, w1.shape[-1]
    _check("mlp", w1.shape[0] == H and w2.shape[-1] == D and activation == "relu",
           "needs G == H, D_out == D and activation 'relu'")
    module = _module("GroupedMLP", D, L, H, _expand_factor(F, L * D))
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    params = {"net.0.weight": w1, "net.0.bias": _zeros_if_none(b1, (H, F), x).reshape(shapes["net.0.bias"]),
              "net.2.weight": w2, "net.2.bias": _zeros_if_none(b2, (H, D), x).reshape(shapes["net.2.bias"])}
    kv = windows(x, block_size=L, stride=stride, padding=padding, pe=pe, cu_seqlens=cu_seqlens)
    return _call(module, params, kv)
