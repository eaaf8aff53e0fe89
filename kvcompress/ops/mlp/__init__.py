"""mlp: its fast paths, registered on import (``kvcompress.backends``
imports this package on the first look-up of the kind): torch_impl
(vectorized torch) and gemm_impl (chunked cuBLAS GEMMs, hidden layer
stored) always, triton_impl (fused Triton kernels) when triton is installed
(the "triton" extra)."""

from ..._optional import has_triton
from . import gemm_impl, torch_impl  # noqa: F401

if has_triton():
    from . import triton_impl  # noqa: F401
