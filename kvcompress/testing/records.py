"""One declarative record per kind (PyTorch's OpInfo, kept small).

A record says how to build the kind's parameters from a Case, how to call
the reference and an implementation, and which invariants apply. The
property suite and the benchmarks read these records; adding a kind is one
entry here plus its reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kvcompress_reference as reference

from . import windows


@dataclass(frozen=True)
class ParamSpec:
    """A positional parameter after x: its name, shape and fan-in (values are
    N(0, 1) * 2**w_exp / sqrt(fan_in)); ``enabled`` turns an optional one off."""

    name: str
    shape: Callable
    fan_in: Callable
    enabled: Callable | None = None


@dataclass(frozen=True)
class KindRecord:
    name: str
    reference: Callable
    oracle: Callable                      # vectorized NumPy on gathered windows
    params: tuple[ParamSpec, ...]
    d_out: Callable                       # Case -> D_out
    extra_kwargs: Callable = lambda case: {}
    affine_in_x: bool = False             # y(a x1 + (1 - a) x2) = a y(x1) + (1 - a) y(x2)
    has_dout: bool = False                # draws D_out
    has_hidden: bool = False              # draws F, activation, two biases
    has_bias: bool = False

    def args(self, inputs, *, torch_side: bool = True) -> list:
        src = inputs.params if torch_side else inputs.params64
        return [src[p.name] for p in self.params]

    def call(self, fn, case, inputs, *, x=None, **overrides):
        """Call an implementation with the case's torch inputs."""
        kw = dict(case.window_kwargs(), pe=inputs.pe, cu_seqlens=inputs.cu_seqlens, **self.extra_kwargs(case))
        kw.update(overrides)
        return fn(inputs.x if x is None else x, *self.args(inputs), **kw)

    def call_reference(self, case, inputs):
        """The loop reference on the float64 values: the exact answer (float64)."""
        kw = dict(case.window_kwargs(), pe=inputs.pe64, cu_seqlens=inputs.cu64, **self.extra_kwargs(case))
        return self.reference(inputs.x64, *self.args(inputs, torch_side=False), **kw)


def _L(c):
    return c.block_size


RECORDS = {
    "mean_pool": KindRecord(
        "mean_pool", reference.mean_pool, windows.mean_pool, params=(), d_out=lambda c: c.D, affine_in_x=True),
    "weighted_pool": KindRecord(
        "weighted_pool", reference.weighted_pool, windows.weighted_pool,
        params=(ParamSpec("weight", lambda c: (c.G, c.L), lambda c: c.L),),
        d_out=lambda c: c.D, affine_in_x=True),
    "linear": KindRecord(
        "linear", reference.linear, windows.linear,
        params=(ParamSpec("weight", lambda c: (c.G, c.L, c.D, c.D_out), lambda c: c.L * c.D),
                ParamSpec("bias", lambda c: (c.G, c.D_out), lambda c: 1, enabled=lambda c: c.bias)),
        d_out=lambda c: c.D_out, affine_in_x=True, has_dout=True, has_bias=True),
    "mlp": KindRecord(
        "mlp", reference.mlp, windows.mlp,
        params=(ParamSpec("w1", lambda c: (c.G, c.L * c.D, c.F), lambda c: c.L * c.D),
                ParamSpec("b1", lambda c: (c.G, c.F), lambda c: 1, enabled=lambda c: c.bias),
                ParamSpec("w2", lambda c: (c.G, c.F, c.D_out), lambda c: c.F),
                ParamSpec("b2", lambda c: (c.G, c.D_out), lambda c: 1, enabled=lambda c: c.bias2)),
        d_out=lambda c: c.D_out, extra_kwargs=lambda c: {"activation": c.activation},
        has_dout=True, has_hidden=True, has_bias=True),
    "attention_pool": KindRecord(
        "attention_pool", reference.attention_pool, windows.attention_pool,
        params=(ParamSpec("weight", lambda c: (c.G, c.D, c.D), lambda c: c.D),),
        d_out=lambda c: c.D),
}
KINDS = tuple(RECORDS)
assert KINDS == reference.KINDS
