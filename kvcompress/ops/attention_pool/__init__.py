"""attention_pool: its fast paths, registered on import (``kvcompress.backends``
imports this package on the first look-up of the kind): torch_impl
(vectorized torch) always, triton_impl (fused Triton kernels) when triton
is installed (the "triton" extra)."""

from ..._optional import has_triton
from . import torch_impl  # noqa: F401

if has_triton():
    from . import triton_impl  # noqa: F401
