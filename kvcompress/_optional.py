"""Optional dependencies, probed once without importing them."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def has_triton() -> bool:
    """Whether triton is installed (the "triton" extra)."""
    return importlib.util.find_spec("triton") is not None
