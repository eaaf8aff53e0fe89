"""One drawn configuration (``Case``) and the inputs it describes.

A Case is plain data: every field is printed when a property fails, and
``Case(...)`` pasted from that message rebuilds the same inputs, because
values come from a seeded NumPy generator (Hypothesis shrinks the shape, the
seed keeps the values reproducible).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import kvcompress_reference as reference
import numpy as np
import torch

from .convert import DTYPES, round_to

LAYOUTS = ("contiguous", "bthd", "sliced")


@dataclass(frozen=True)
class Case:
    kind: str
    dtype: str = "float32"
    B: int = 1
    H: int = 1
    G: int = 1
    T: int = 0
    D: int = 1
    block_size: int = 1
    stride: int = 1
    padding: str = "valid"
    seqlens: tuple[int, ...] | None = None   # packed sequences (then B == 1, T == sum)
    cu_dtype: str = "int32"
    use_pe: bool = False
    D_out: int = 1          # linear, mlp
    F: int = 1              # mlp hidden
    bias: bool = False      # linear bias / mlp b1
    bias2: bool = False     # mlp b2
    activation: str = "relu"
    split: bool = False     # gated_pool: position j reads feature chunk j // S
    layout: str = "contiguous"
    params_contiguous: bool = True
    seed: int = 0
    x_exp: int = 0          # values are N(0, 1) * 2**x_exp
    w_exp: int = 0          # weights are N(0, 1) * 2**w_exp / sqrt(fan_in)

    @property
    def L(self) -> int:
        return self.block_size

    @property
    def S(self) -> int:
        return self.stride

    @property
    def W(self) -> int:
        seqs = [self.T] if self.seqlens is None else self.seqlens
        return sum(reference.num_windows(n, self.L, self.S, self.padding) for n in seqs)

    def replace(self, **kw) -> Case:
        return dataclasses.replace(self, **kw)

    def window_kwargs(self) -> dict:
        return dict(block_size=self.block_size, stride=self.stride, padding=self.padding)


@dataclass
class Inputs:
    """float64 NumPy values (exactly representable in the case's dtype) and
    the torch tensors holding them in the case's dtype, layout and device."""

    x64: np.ndarray
    params64: dict            # name -> float64 array or None, in signature order
    pe64: np.ndarray | None
    x: torch.Tensor
    params: dict              # name -> tensor or None
    pe: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    cu64: np.ndarray | None


def place(values: np.ndarray, dtype: torch.dtype, device: str, layout: str) -> torch.Tensor:
    """A (B, H, T, D) tensor holding ``values`` in the given memory layout.

    contiguous: plain. bthd: a (B, T, H, D) tensor seen through
    transpose(1, 2). sliced: every other token of a larger NaN-filled tensor,
    offset by one feature, so reading outside the view poisons the result.
    """
    v = torch.from_numpy(values).to(dtype)
    if layout == "contiguous":
        return v.to(device).contiguous()
    if layout == "bthd":
        return v.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    if layout == "sliced":
        B, H, T, D = v.shape
        base = torch.full((B, H, 2 * T + 1, D + 2), float("nan"), dtype=dtype)
        base[:, :, 1::2, 1:D + 1] = v
        return base.to(device)[:, :, 1::2, 1:D + 1]
    raise ValueError(f"unknown layout {layout!r}")


def _param_tensor(a: np.ndarray, dtype, device, contiguous: bool) -> torch.Tensor:
    t = torch.from_numpy(a).to(dtype).to(device)
    if not contiguous and t.dim() >= 2:
        t = t.mT.contiguous().mT   # same values, column-major strides
    return t


def make_inputs(case: Case, record, device: str = "cpu") -> Inputs:
    """Draw the case's values from its seed, rounded to its dtype."""
    rng = np.random.default_rng(case.seed)
    dt = DTYPES[case.dtype]
    x64 = round_to(rng.standard_normal((case.B, case.H, case.T, case.D)) * 2.0 ** case.x_exp, case.dtype)
    pe64 = None
    if case.use_pe:
        pe64 = round_to(rng.standard_normal((case.H, case.L, case.D)) * 2.0 ** case.x_exp, case.dtype)
    params64 = {}
    for spec in record.params:
        if spec.enabled is not None and not spec.enabled(case):
            params64[spec.name] = None
            continue
        scale = 2.0 ** case.w_exp / np.sqrt(spec.fan_in(case))
        params64[spec.name] = round_to(rng.standard_normal(spec.shape(case)) * scale, case.dtype)
    x = place(x64, dt, device, case.layout)
    params = {k: None if v is None else _param_tensor(v, dt, device, case.params_contiguous)
              for k, v in params64.items()}
    for spec in record.params:   # per-token inputs (gated_pool's z) are laid out like x
        if spec.per_token:
            params[spec.name] = place(params64[spec.name], dt, device, case.layout)
    pe = None if pe64 is None else torch.from_numpy(pe64).to(dt).to(device)
    cu = cu64 = None
    if case.seqlens is not None:
        cu64 = np.concatenate([[0], np.cumsum(case.seqlens, dtype=np.int64)])
        cu = torch.tensor(cu64, dtype=getattr(torch, case.cu_dtype), device=device)
    return Inputs(x64, params64, pe64, x, params, pe, cu, cu64)


def with_x(case: Case, inputs: Inputs, x64: np.ndarray, device: str = "cpu", *, tokens=None) -> Inputs:
    """The same parameters with other token values (and the case's seqlens):
    x64 float64 (B, H, T, D), rounded to the case's dtype and placed in its layout.

    tokens: None (the kind's other per-token inputs, gated_pool's z, keep
    their values), or a function applied to each of them, (B, H, T, D) ->
    (B', H', T', D), when x64 is x's tokens rearranged the same way (a slice,
    a padding): x and z then stay token for token together."""
    x64 = round_to(x64, case.dtype) if np.isfinite(x64).all() else x64
    x = place(x64, DTYPES[case.dtype], device, case.layout)
    from .records import RECORDS
    per_token = [p.name for p in RECORDS[case.kind].params if p.per_token]
    if per_token:
        params64, params = dict(inputs.params64), dict(inputs.params)
        for k in per_token:
            v64 = params64[k] if tokens is None else tokens(params64[k])
            params64[k], params[k] = v64, place(v64, DTYPES[case.dtype], device, case.layout)
        inputs = dataclasses.replace(inputs, params64=params64, params=params)
    cu = cu64 = None
    if case.seqlens is not None:
        cu64 = np.concatenate([[0], np.cumsum(case.seqlens, dtype=np.int64)])
        cu = torch.tensor(cu64, dtype=getattr(torch, case.cu_dtype), device=device)
    return dataclasses.replace(inputs, x64=x64, x=x, cu_seqlens=cu, cu64=cu64)
