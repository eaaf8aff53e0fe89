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
- ``kvcompress.testing``: the property suite, its pytest plugin and
  ``assert_matches_reference``, for verifying any implementation (the
  ``test`` extra; docs/verifying.md).

Submodules and names load on first use (PEP 562): ``import kvcompress``
alone imports nothing heavy, so the pytest plugin that ships in this package
costs nothing in a test session that does not use it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("backends", "decode", "functional", "modules", "streaming", "testing")
_NAMES = {"compressed_cu_seqlens": "_windows", "num_windows": "_windows", "AttentionPool": "modules",
          "Compressor": "modules", "ConvLinearCompress": "modules", "GroupedMLP": "modules",
          "SingleProjection": "modules"}

__all__ = ["AttentionPool", "Compressor", "ConvLinearCompress", "GroupedMLP", "SingleProjection", "backends",
           "compressed_cu_seqlens", "decode", "functional", "modules", "num_windows", "streaming"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))
