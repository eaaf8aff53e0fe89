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

``nsa_arguments``: the GPU scripts' inputs (scripts/gpu_check.py,
scripts/gpu_perf.py), one weight set per head, without a harness Case.
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

    def _tokens(self, seed: int, scale: float) -> torch.Tensor:
        """(B, H, T, D) in the case's layout: the first head_tokens from their
        own generator (the same for every T), the rest from one keyed by T."""
        c = self.case
        head = self._randn((c.B, self.head_tokens, c.H, c.D), seed, scale)               # [B, T_head, H, D]
        body = self._randn((c.B, c.T - self.head_tokens, c.H, c.D), seed + 1 + c.T, scale)
        x = torch.cat([head, body], dim=1).transpose(1, 2)                               # [B, H, T, D]
        return x.contiguous() if c.layout == "contiguous" else x

    def _draw(self, rec, seed: int) -> None:
        c = self.case
        x = self._tokens(seed, 2.0 ** c.x_exp)                                         # [B, H, T, D]
        params = {}
        for k, spec in enumerate(rec.params):
            if spec.enabled is not None and not spec.enabled(c):
                params[spec.name] = None
                continue
            scale = 2.0 ** c.w_exp / math.sqrt(spec.fan_in(c))
            # a per-token input (gated_pool's z) like x: its head the same for every T
            params[spec.name] = (self._tokens(seed + 100 + k, scale) if spec.per_token
                                 else self._randn(spec.shape(c), seed + 100 + k, scale))
        pe = self._randn((c.H, c.L, c.D), seed + 99, 2.0 ** c.x_exp) if c.use_pe else None    # [H, L, D]
        g = self._randn((c.B, c.H, c.W, self.d_out), seed + 98)                          # [B, H, W, D_out]
        self.x.append(x)
        self.params.append(params)
        self.pe.append(pe)
        self.g.append(g)


def nsa_arguments(kind: str, *, B: int, H: int, T: int, D: int, L: int, S: int, dtype: torch.dtype, device: str,
                  layout: str = "bhtd", pe: bool = False, bias: bool = False, grad: bool = False, seed: int = 0,
                  expand: float = 1.0):
    """(x, params, pe) for one call of ``kind`` (mean_pool, weighted_pool,
    linear, mlp, attention_pool or gated_pool, split off) with G = H, as the GPU scripts time and
    check it.

    x: (B, H, T, D), contiguous for layout "bhtd", a (B, T, H, D) tensor seen
    through transpose(1, 2) for "bthd". params: the kind's parameters in
    signature order, weights N(0, 1) / sqrt(fan in) (weighted_pool 1 / L),
    biases N(0, 1) when ``bias`` else None; mlp's hidden size is F =
    int(expand * L * D) (expand 1: the seed's GroupedMLP). pe: (H, L, D)
    N(0, 1), or None unless ``pe``. Drawn in float32 on ``device`` by one
    generator seeded with ``seed`` (x, the parameters, pe, in that order),
    then rounded to ``dtype``; every tensor requires grad when ``grad``
    (x a leaf with x's strides). Raises KeyError for an unknown kind,
    ValueError for an unknown layout."""
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    x = rnd(B, T, H, D).transpose(1, 2) if layout == "bthd" else rnd(B, H, T, D)
    F = int(expand * L * D)
    params = {"mean_pool": lambda: [], "weighted_pool": lambda: [rnd(H, L, scale=1 / L)],
              "linear": lambda: [rnd(H, L, D, D, scale=(L * D) ** -0.5), rnd(H, D) if bias else None],
              "mlp": lambda: [rnd(H, L * D, F, scale=(L * D) ** -0.5), rnd(H, F) if bias else None,
                              rnd(H, F, D, scale=F ** -0.5), rnd(H, D) if bias else None],
              "attention_pool": lambda: [rnd(H, D, D, scale=D ** -0.5)],
              # gated_pool (split off): z like x, bias (G, L, D) or None
              "gated_pool": lambda: [rnd(B, T, H, D).transpose(1, 2) if layout == "bthd" else rnd(B, H, T, D),
                                     rnd(H, L, D) if bias else None]}[kind]()
    pe_t = rnd(H, L, D) if pe else None
    if grad:
        for t in [x, *params, pe_t]:
            if t is not None:
                t.requires_grad_(True)
    return x, params, pe_t
