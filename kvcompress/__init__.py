"""kvcompress: KV compression for sparse attention (NSA and relatives),
exact against a loop-based reference, and fast.

- ``kvcompress.functional``: mean_pool, weighted_pool, linear, mlp,
  attention_pool on torch tensors (semantics: docs/semantics.md).
- ``kvcompress.backends``: the registry of implementations.
- ``kvcompress.streaming``: compression while tokens arrive (docs/streaming.md).
- ``kvcompress.modules``: ``Compressor`` (one kind with its own weights, on
  x (B, H, T, D)) and drop-in versions of the seed's compress networks
  (``ConvLinearCompress``, ``AttentionPool``, ``GroupedMLP``,
  ``SingleProjection``), also exported here.
"""

from . import backends, functional, modules, streaming
from ._windows import compressed_cu_seqlens, num_windows
from .modules import AttentionPool, Compressor, ConvLinearCompress, GroupedMLP, SingleProjection

__version__ = "0.1.0"

__all__ = ["AttentionPool", "Compressor", "ConvLinearCompress", "GroupedMLP", "SingleProjection", "backends",
           "compressed_cu_seqlens", "functional", "modules", "num_windows", "streaming"]
