"""The arguments every entrant of a configuration is timed on.

Values follow the harness's ``make_inputs`` (x and pe ~ N(0, 1) * 2**x_exp,
each parameter ~ N(0, 1) * 2**w_exp / sqrt(fan_in) with the shapes of the
kind's record) but are drawn by torch on the device: at T = 131072 a
NumPy draw would take longer than the benchmark. They are drawn in float32
and rounded once to the case's dtype, so the float64 values the checks read
back are exactly what every entrant computes on.

The first ``head_tokens`` tokens of x come from their own generator, so the
head of x, pe and the parameters are the same for every T: the head checks
(benchmarks/checks.py) are computed once per configuration without T.
"""

from __future__ import annotations

import math

import torch

from kvcompress.testing.convert import DTYPES
from kvcompress.testing.records import RECORDS

from . import timing


class ArgumentSets:
    """``n`` argument sets of one Case on one device, for rotation.

    Attributes (lists of length n): ``x`` (B, H, T, D) tensors in the case's
    layout ("bthd": views of (B, T, H, D) storage); ``params`` dicts
    name -> tensor or None in record order; ``pe`` (H, L, D) or None;
    ``g`` cotangents (B, H, W, D_out). ``itemsize`` of the dtype.
    """

    def __init__(self, case, device: str, *, head_tokens: int, max_sets: int = 16):
        """case: the harness Case; device: "cpu" or "cuda"; head_tokens: how
        many leading tokens come from their own generator (T >= head_tokens,
        else ValueError); max_sets: at most this many sets (1 when nothing
        is timed)."""
        if case.T < head_tokens:
            raise ValueError(f"T={case.T} is shorter than the {head_tokens} tokens the checks read")
        if case.layout not in ("contiguous", "bthd"):
            raise ValueError(f"layout must be 'contiguous' or 'bthd', got {case.layout!r}")
        self.case, self.device = case, device
        self.dtype = DTYPES[case.dtype]
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        rec = RECORDS[case.kind]
        self.d_out = rec.d_out(case)
        self.head_tokens = head_tokens
        elements = (case.B * case.H * case.T * case.D + case.B * case.H * case.W * self.d_out
                    + (case.H * case.L * case.D if case.use_pe else 0)
                    + sum(math.prod(s.shape(case)) for s in rec.params if s.enabled is None or s.enabled(case)))
        self.n = timing.rotation_sets(elements * self.itemsize, device, max_sets=max_sets)
        self.x, self.params, self.pe, self.g = [], [], [], []
        for i in range(self.n):
            self._draw(rec, case.seed + 7919 * i)

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def _randn(self, shape, seed: int, scale: float = 1.0) -> torch.Tensor:
        v = torch.randn(shape, generator=self._gen(seed), device=self.device, dtype=torch.float32)
        return (v * scale).to(self.dtype)

    def _draw(self, rec, seed: int) -> None:
        c = self.case
        xs = 2.0 ** c.x_exp
        head = self._randn((c.B, self.head_tokens, c.H, c.D), seed, xs)                  # [B, T_head, H, D]
        body = self._randn((c.B, c.T - self.head_tokens, c.H, c.D), seed + 1 + c.T, xs)
        x = torch.cat([head, body], dim=1).transpose(1, 2)                               # [B, H, T, D]
        if c.layout == "contiguous":
            x = x.contiguous()
        params = {}
        for k, spec in enumerate(rec.params):
            if spec.enabled is not None and not spec.enabled(c):
                params[spec.name] = None
                continue
            params[spec.name] = self._randn(spec.shape(c), seed + 100 + k, 2.0 ** c.w_exp / math.sqrt(spec.fan_in(c)))
        pe = self._randn((c.H, c.L, c.D), seed + 99, xs) if c.use_pe else None           # [H, L, D]
        g = self._randn((c.B, c.H, c.W, self.d_out), seed + 98)                          # [B, H, W, D_out]
        self.x.append(x)
        self.params.append(params)
        self.pe.append(pe)
        self.g.append(g)
