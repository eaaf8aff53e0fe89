"""kvcompress: KV compression for sparse attention (NSA and relatives),
exact against a loop-based reference, and fast.

- ``kvcompress.functional``: mean_pool, weighted_pool, linear, mlp,
  attention_pool on torch tensors (see SPEC in docs/semantics.md).
- ``kvcompress.backends``: the registry of implementations.
"""

from . import backends, functional
from ._windows import compressed_cu_seqlens, num_windows

__version__ = "0.1.0"

__all__ = ["backends", "compressed_cu_seqlens", "functional", "num_windows"]
