"""Adapters: public KV-compression kernels behind kvcompress's reference
signature, each with the Domain its kernel supports (docs/verifying.md).

An adapter converts our inputs (x (B, H, T, D) with any strides, or packed
(1, H, T, D) with ``cu_seqlens``; weights in our layouts, docs/semantics.md)
to the peer's calling convention, calls the peer, and converts its output
back to (B, H, W, D_out) in x's dtype. It computes nothing itself: every
value of the output comes from the peer. The peer is imported inside the
call, so importing an adapter needs none of the peers' packages, and a
missing one raises ImportError naming what to install.

- ``nsa_triton``: XunhaoLai/native-sparse-attention-triton's
  ``avgpool_compress``, ``weightedpool_compress``, ``linear_compress``
  (Triton; packed (T, H, D) tokens).
- ``fla``: fla-core's ``mean_pooling`` (Triton; non-overlapping chunks).
- ``seed``: native-sparse-attention-pytorch's compress networks (torch
  modules on (b, h, w, n, d) windows).

Verify one with::

    pytest --pyargs kvcompress.testing.properties \\
        --impl weighted_pool=kvcompress.testing.adapters.nsa_triton:weighted_pool

``scripts/verify_peers.py`` runs all of them and writes a Markdown report.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

__all__ = ["ADAPTERS", "import_peer"]

# every adapter: (kind, "module:callable"), the --impl values of scripts/verify_peers.py
ADAPTERS = {
    "nsa_triton": (("mean_pool", "kvcompress.testing.adapters.nsa_triton:mean_pool"),
                   ("weighted_pool", "kvcompress.testing.adapters.nsa_triton:weighted_pool"),
                   ("linear", "kvcompress.testing.adapters.nsa_triton:linear")),
    "fla": (("mean_pool", "kvcompress.testing.adapters.fla:mean_pool"),),
    "seed": (("linear", "kvcompress.testing.adapters.seed:linear"),
             ("linear", "kvcompress.testing.adapters.seed:linear_shared"),
             ("attention_pool", "kvcompress.testing.adapters.seed:attention_pool"),
             ("mlp", "kvcompress.testing.adapters.seed:mlp")),
}


def import_peer(module: str, *, package: str, how: str):
    """Import ``module`` of a peer, or raise ImportError naming the package.

    package: what provides it (a PyPI name or a repository); how: one line
    saying how to make it importable. The original error is chained."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"kvcompress adapter: cannot import {module!r}, which is provided by {package}. "
                          f"{how} (original error: {e})") from e


def interpreting(x: torch.Tensor) -> bool:
    """Whether a Triton peer called on ``x`` runs in Triton's interpreter
    (TRITON_INTERPRET=1 and a CPU tensor: how this machine and CI run
    Triton code without a GPU)."""
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def no_cuda_set_device():
    """For a peer run in Triton's interpreter on CPU tensors only: make
    ``torch.cuda.set_device(cpu_device)`` a no-op for the call (some peers
    select the input's CUDA device first, which raises for a CPU tensor and
    has no meaning in the interpreter). Never used on a GPU."""
    original = torch.cuda.set_device

    def set_device(device):
        if isinstance(device, torch.device) and device.type == "cpu":
            return None
        return original(device)

    torch.cuda.set_device = set_device
    try:
        yield
    finally:
        torch.cuda.set_device = original


def seq_offsets(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """int32 (N+1,) offsets of the sequences in the packed token stream a
    peer reads: ``cu_seqlens`` itself, or for batched x (B, H, T, D) the B
    rows of T tokens each, [0, T, 2T, ..., B*T]."""
    if cu_seqlens is not None:
        return cu_seqlens.to(torch.int32)
    B, _, T, _ = x.shape
    return torch.arange(B + 1, dtype=torch.int32, device=x.device) * T


def to_packed(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) -> tokens (B*T, H, D), the packed layout of the Triton
    NSA kernels; a view where x's strides allow (a (B, T, H, D) tensor seen
    through transpose(1, 2) is one), else a copy."""
    B, H, T, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B * T, H, D)


def from_packed(y: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """A peer's packed output y (W_total, H, D_out) -> (B, H, W, D_out): for
    batched x every row has the same W = W_total / B; packed: (1, H, W_total, D_out)."""
    Wt, H, Do = y.shape
    if cu_seqlens is not None:
        return y.permute(1, 0, 2).unsqueeze(0)
    B = x.shape[0]
    W = Wt // B if B else 0
    return y.reshape(B, W, H, Do).permute(0, 2, 1, 3)


def check_offsets(peer: str, got: torch.Tensor, cu: torch.Tensor, block_size: int, stride: int) -> None:
    """The peer's own output offsets must be ours (valid padding): a
    different window-count rule is a finding, reported as such."""
    from kvcompress import compressed_cu_seqlens

    want = compressed_cu_seqlens(cu.to(torch.int64), block_size, stride, "valid")
    if got.shape != want.shape or not torch.equal(got.to(torch.int64).cpu(), want.cpu()):
        raise AssertionError(f"{peer}: its output offsets {got.tolist()} differ from the contract's "
                             f"{want.tolist()} (cu_seqlens {cu.tolist()}, L={block_size}, S={stride}, valid padding)")
