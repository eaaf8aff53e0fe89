"""The loop-based NumPy reference of kvcompress: the definition of the
semantics (SPEC section 4). Slow on purpose, obvious by reading.

Every function takes and returns NumPy arrays (float16, float32, float64, or
bfloat16 through ml_dtypes), computes in float64 with explicit loops over
windows, window positions and features, and returns the input's dtype.
``gated_pool`` is DeepSeek-V4's compressor core (SPEC section 3b).
``reference.streaming`` is the loop definition of streaming compression
(docs/streaming.md). This package imports neither torch nor kvcompress.
"""

from . import streaming
from ._windows import compressed_cu_seqlens, num_windows, window_start
from .attention_pool import attention_pool
from .gated_pool import gated_pool
from .linear import linear
from .mean_pool import mean_pool
from .mlp import ACTIVATIONS, mlp
from .weighted_pool import weighted_pool

KINDS = ("mean_pool", "weighted_pool", "linear", "mlp", "attention_pool", "gated_pool")

__all__ = [
    "ACTIVATIONS", "KINDS", "attention_pool", "compressed_cu_seqlens", "gated_pool", "linear", "mean_pool", "mlp",
    "num_windows", "streaming", "weighted_pool", "window_start",
]
