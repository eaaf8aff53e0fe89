"""The suite's view of each kind: the runtime record (kvcompress/kinds.py)
plus what only the suite needs, found by the kind's name.

Nothing here is written per kind. From the runtime record come the
parameters (names, shapes over the Case's dims, fan-in, which are
optional), the per-token inputs after x (gated_pool's z: drawn and placed
like x, at the parameters' scale), the options (a Case field of the same
name) and D_out. By name: ``kvcompress_reference.<kind>`` (the loop
reference) and the tolerance model's entry for the kind
(kvcompress/testing/tolerance.py). The properties, strategies, production
tier, error inputs, benchmarks and GPU scripts read these records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kvcompress_reference as reference

from kvcompress import kinds as _kinds

from . import windows

# y(a x1 + (1 - a) x2) = a y(x1) + (1 - a) y(x2) exactly, with bias and pe
# (they do not depend on x) and with the output's rounding model of
# tolerance.x_rounding_bound: the kinds linear in their windows' tokens
AFFINE_IN_X = ("mean_pool", "weighted_pool", "linear")


@dataclass(frozen=True)
class ParamSpec:
    """A positional tensor after x: its name, shape and fan-in (values are
    N(0, 1) * 2**w_exp / sqrt(fan_in)); ``enabled`` turns an optional one
    off; ``per_token``: a (B, H, T, D) input windowed like x (placed in the
    case's layout, sliced with x's tokens)."""

    name: str
    shape: Callable
    fan_in: Callable
    enabled: Callable | None = None
    per_token: bool = False


def dims(case, kind: _kinds.Kind | None = None) -> dict:
    """The Case's dims by letter, for the runtime record's shapes; with
    ``kind``, D_out as the kind fixes it (its record's ``d_out``), else the
    Case's D_out field."""
    d = {"G": case.G, "L": case.L, "S": case.S, "D": case.D, "D_out": case.D_out, "F": case.F,
         "B": case.B, "H": case.H, "T": case.T}
    if kind is not None and kind.d_out is not None:
        d["D_out"] = kind.d_out(d, {o.name: getattr(case, o.name) for o in kind.options})
    return d


@dataclass(frozen=True)
class KindRecord:
    name: str
    kind: _kinds.Kind
    reference: Callable
    params: tuple[ParamSpec, ...]

    @property
    def affine_in_x(self) -> bool:
        return self.name in AFFINE_IN_X

    @property
    def has_dout(self) -> bool:            # draws D_out
        return "D_out" in self.kind.free_dims

    @property
    def has_hidden(self) -> bool:          # draws F, activation, two biases
        return "F" in self.kind.free_dims

    @property
    def has_bias(self) -> bool:
        return any(p.optional for p in self.kind.params)

    @property
    def zero_pads(self) -> bool:
        """Whether a pad position acts as a zero token (every kind with pe);
        gated_pool's pads have weight 0 instead, so explicit zero tokens
        are not its pads."""
        return self.kind.pe

    def d_out(self, case) -> int:
        return dims(case, self.kind)["D_out"]

    def extra_kwargs(self, case) -> dict:
        """The kind's options, from the Case fields of the same names."""
        return {o.name: getattr(case, o.name) for o in self.kind.options}

    def args(self, inputs, *, torch_side: bool = True) -> list:
        src = inputs.params if torch_side else inputs.params64
        return [src[p.name] for p in self.params]

    def kwargs(self, case, pe, cu) -> dict:
        """The keyword arguments of a call: windowing, cu_seqlens, the
        kind's options and pe (only for a kind that takes pe)."""
        kw = dict(case.window_kwargs(), cu_seqlens=cu, **self.extra_kwargs(case))
        if self.kind.pe:
            kw["pe"] = pe
        return kw

    def call(self, fn, case, inputs, *, x=None, **overrides):
        """Call an implementation with the case's torch inputs."""
        kw = self.kwargs(case, inputs.pe, inputs.cu_seqlens)
        kw.update(overrides)
        return fn(inputs.x if x is None else x, *self.args(inputs), **kw)

    def vectorized(self, case, x64, params64, pe64=None, seqlens=None):
        """The vectorized NumPy formulation (kvcompress/testing/windows.py),
        independent of the loop reference, on float64 tokens x64 (B, H, T,
        D) and parameters ``params64`` (the positional tensors after x, in
        order): ``windows.<kind>_tokens`` if the kind has one (its own
        gathering), else ``windows.<kind>`` on gathered windows."""
        kw = dict(case.window_kwargs(), seqlens=seqlens)
        fn = getattr(windows, f"{self.name}_tokens", None)
        if fn is not None:
            return fn(x64, *params64, **kw, **self.extra_kwargs(case))
        win = windows.gather_windows(x64, pe=pe64, **kw)
        return getattr(windows, self.name)(win, *params64, **self.extra_kwargs(case))

    def call_reference(self, case, inputs):
        """The loop reference on the float64 values: the exact answer (float64)."""
        return self.reference(inputs.x64, *self.args(inputs, torch_side=False),
                              **self.kwargs(case, inputs.pe64, inputs.cu64))


def _specs(kind: _kinds.Kind) -> tuple[ParamSpec, ...]:
    specs = [ParamSpec(name, lambda c: (c.B, c.H, c.T, c.D), lambda c: 1, per_token=True)
             for name in kind.inputs[1:]]
    flags = iter(("bias", "bias2"))          # the Case's switches of the optional parameters, in order
    for p in kind.params:
        flag = next(flags) if p.optional else None
        specs.append(ParamSpec(p.name, lambda c, p=p: kind.shape(p, dims(c, kind)),
                               lambda c, p=p: kind.dim(p.fan_in, dims(c, kind)),
                               enabled=None if flag is None else (lambda c, f=flag: getattr(c, f))))
    return tuple(specs)


RECORDS = {name: KindRecord(name, kind, getattr(reference, name), _specs(kind))
           for name, kind in _kinds.KINDS_BY_NAME.items() if name in _kinds.KINDS}
KINDS = tuple(RECORDS)
assert KINDS == reference.KINDS
