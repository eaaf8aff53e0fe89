"""torch <-> NumPy, bfloat16 included (through ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
NUMPY_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def to_numpy(t: torch.Tensor | None, dtype: str | None = None):
    """A tensor's values as a NumPy array, float64 unless ``dtype`` names
    another (exact: every dtype here widens exactly to float64)."""
    if t is None:
        return None
    a = t.detach().to("cpu", torch.float64).numpy()
    return a if dtype is None else a.astype(NUMPY_DTYPES[dtype])


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (via torch, round to nearest even)
    and return them as float64 again."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(DTYPES[dtype]).double().numpy()
