"""The environment the suite runs kernels in; set before anything imports triton."""

from __future__ import annotations

import os


def configure() -> None:
    """Without a GPU, Triton kernels run in its interpreter on CPU tensors
    (that is how CI exercises the built-in Triton backend); float32 dots are
    IEEE unless a test is about tf32 (STYLE.md); Triton outputs start as NaN
    (kvcompress/ops/_triton/alloc.py), so an element a kernel never writes
    fails. Existing values are kept."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    os.environ.setdefault("KVCOMPRESS_POISON", "1")
