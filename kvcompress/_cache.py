"""The one bounded-cache rule of the host paths (no Triton import): a dict
emptied when full, so a working set of a few shapes stays cached and an
endless stream of new keys (packed calls, drawn test shapes) costs no memory.
Used by the validation fast path (functional._VALID), the fixed-length plans
(ops/_triton/plan._FIXED), the launch-argument caches (launch.cache_put) and
mlp gemm's ones pattern (gemm_impl._ONES)."""

from __future__ import annotations

__all__ = ["bounded_put"]


def bounded_put(cache: dict, key, value, size: int):
    """cache[key] = value, returned; the cache is emptied first when it
    already holds ``size`` entries."""
    if len(cache) >= size:
        cache.clear()
    cache[key] = value
    return value
