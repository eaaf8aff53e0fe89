"""Every Triton output is allocated here: NaN-filled when the environment has
``KVCOMPRESS_POISON=1``, so an element a kernel never writes fails the tests
(fla's conftest does the same for ``torch.empty``)."""

from __future__ import annotations

import os

import torch

__all__ = ["empty", "empty_like", "poison_enabled"]


# CPython's os.environ keeps the variables encoded in ``_data``; reading it there skips Mapping.get's
# layers (encode, __getitem__, KeyError, decode): 0.07 instead of 0.75 us, paid on every allocation
_POISON_KEY = os.environ.encodekey("KVCOMPRESS_POISON") if type(os.environ) is os._Environ else None
_POISON_ON = os.environ.encodevalue("1") if _POISON_KEY is not None else None


def poison_enabled() -> bool:
    """Whether KVCOMPRESS_POISON=1 (read on every allocation: tests set it)."""
    env = os.environ
    if _POISON_KEY is not None and type(env) is os._Environ:
        return env._data.get(_POISON_KEY) == _POISON_ON
    return env.get("KVCOMPRESS_POISON", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, NaN-filled when the environment has KVCOMPRESS_POISON=1.

    Every Triton output goes through here, so a test run with the variable
    set fails on any element a kernel forgot to write.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if poison_enabled() else t


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` keeping x's strides when x is dense (so the x-gradient
    of a (B, T, H, D) tensor seen as (B, H, T, D) has x's layout); NaN-filled
    under KVCOMPRESS_POISON=1."""
    t = torch.empty_like(x, memory_format=torch.preserve_format)
    return t.fill_(float("nan")) if poison_enabled() else t
