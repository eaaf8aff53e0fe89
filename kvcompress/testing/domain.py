"""What an implementation supports: its declared domain.

A kernel that handles only part of the contract (valid padding only, one
weight set per head, block sizes 16/32/64, no position embedding, forward
only, ...) states so, and the property suite then draws only inside that
domain: the strategies never generate a case outside it (no filtering after
the fact), properties that need something outside it are not run for it, and
``kvcompress-verify`` prints the domain next to the verdict.

Declare it on the callable::

    from kvcompress.testing import Domain, declare_domain

    @declare_domain(paddings=("valid",), groups="per_head", pe=False, block_sizes=(16, 32, 64))
    def my_weighted_pool(x, weight, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None): ...

or give it on the command line, ``--domain weighted_pool=my_pkg.adapters:DOMAIN``.
This module imports neither torch nor Hypothesis (the pytest plugin loads it
at start-up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvcompress.kinds import ACTIVATIONS, PADDINGS, PRECISION_CLASSES  # noqa: F401  (stdlib only: no torch at start-up)

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")
LAYOUTS = ("contiguous", "bthd", "sliced")
GROUPS = ("any", "per_head", "shared")
STRIDES = ("any", "divides", "equal")
INPUTS = ("batched", "packed")

ATTRIBUTE = "__kvcompress_domain__"


@dataclass(frozen=True)
class Domain:
    """The part of the contract (docs/semantics.md) an implementation supports.

    Every field defaults to "all the contract allows", so ``Domain()`` is a
    full implementation. Keyword-only.

    - paddings: subset of ("valid", "left").
    - inputs: subset of ("batched", "packed"): x (B, H, T, D) without
      cu_seqlens, and packed sequences (1, H, T, D) with cu_seqlens.
    - groups: "any" (any G dividing H), "per_head" (G == H) or "shared" (G == 1).
    - bias: linear's ``bias`` and mlp's ``b1`` may be given (else always None).
    - bias2: mlp's ``b2`` may be given.
    - d_out_equals_d: linear and mlp only with D_out == D.
    - dtypes: subset of ("float64", "float32", "float16", "bfloat16").
    - block_sizes: the block sizes L supported (any iterable of ints, e.g.
      ``(16, 32, 64)`` or ``range(1, 129)``); None: any.
    - strides: "any" (1 <= S <= L), "divides" (S divides L) or "equal" (S == L).
    - head_dim_multiple: D (and D_out) must be a multiple of it.
    - pe: position embeddings supported.
    - activations: mlp activations supported.
    - layouts: memory layouts of x supported ("contiguous", "bthd": a
      (B, T, H, D) tensor seen through transpose(1, 2), "sliced": a strided view).
    - empty: empty inputs (B == 0, T == 0, sequences shorter than a window,
      so zero windows) supported.
    - differentiable: the outputs support autograd (gradients are checked);
      False: forward only, no gradient property runs.
    - max_batch, max_heads, max_tokens, max_dim, max_hidden: size caps (None: none).
    - precision: the precision class promised (SPEC 3c, docs/semantics.md
      "Numerics"): "io-intermediates" (the default, the loosest the
      contract allows: x + pe, the MLP hidden layer, attention logits and
      probabilities, their gradients and each window's share of a gradient
      may each be rounded once to the input dtype) or "strict" (only the
      output and each gradient). The properties hold the
      implementation to its class's bound; the matrix reports the tightest
      class it met.
    """

    paddings: tuple[str, ...] = PADDINGS
    inputs: tuple[str, ...] = INPUTS
    groups: str = "any"
    bias: bool = True
    bias2: bool = True
    d_out_equals_d: bool = False
    dtypes: tuple[str, ...] = DTYPE_NAMES
    block_sizes: tuple[int, ...] | None = None
    strides: str = "any"
    head_dim_multiple: int = 1
    pe: bool = True
    activations: tuple[str, ...] = ACTIVATIONS
    layouts: tuple[str, ...] = LAYOUTS
    empty: bool = True
    differentiable: bool = True
    max_batch: int | None = None
    max_heads: int | None = None
    max_tokens: int | None = None
    max_dim: int | None = None
    max_hidden: int | None = None
    precision: str = "io-intermediates"

    def __post_init__(self):
        def subset(name, allowed):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, Iterable):
                raise TypeError(f"Domain.{name} must be a tuple of {allowed}, got {v!r}")
            v = tuple(v)
            bad = [e for e in v if e not in allowed]
            if bad or not v:
                raise ValueError(f"Domain.{name} must be a non-empty subset of {allowed}, got {v!r}")
            object.__setattr__(self, name, v)

        for name, allowed in (("paddings", PADDINGS), ("inputs", INPUTS), ("dtypes", DTYPE_NAMES),
                              ("activations", ACTIVATIONS), ("layouts", LAYOUTS)):
            subset(name, allowed)
        if "contiguous" not in self.layouts:
            raise ValueError("Domain.layouts must include 'contiguous'")
        for name, allowed in (("groups", GROUPS), ("strides", STRIDES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Domain.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.block_sizes is not None:
            sizes = tuple(sorted(set(self.block_sizes)))
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"Domain.block_sizes must hold integers >= 1, got {self.block_sizes!r}")
            object.__setattr__(self, "block_sizes", sizes)
        if not isinstance(self.head_dim_multiple, int) or self.head_dim_multiple < 1:
            raise ValueError(f"Domain.head_dim_multiple must be an integer >= 1, got {self.head_dim_multiple!r}")
        for name in ("max_batch", "max_heads", "max_tokens", "max_dim", "max_hidden"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Domain.{name} must be None or an integer >= 1, got {v!r}")
        if self.precision not in PRECISION_CLASSES:
            raise ValueError(f"Domain.precision must be one of {PRECISION_CLASSES}, got {self.precision!r}")
        if self.max_dim is not None and self.max_dim < self.head_dim_multiple:
            raise ValueError(f"Domain.max_dim={self.max_dim} is below head_dim_multiple={self.head_dim_multiple}")

    # -- questions the strategies and properties ask ---------------------

    def block_size_options(self, upper: int) -> tuple[int, ...] | None:
        """The supported block sizes up to ``upper`` (None: every size 1..upper);
        () when none is."""
        if self.block_sizes is None:
            return None
        return tuple(s for s in self.block_sizes if s <= upper)

    def stride_options(self, L: int) -> list[int]:
        """The strides S allowed with block size L."""
        if self.strides == "equal":
            return [L]
        if self.strides == "divides":
            return [s for s in range(1, L + 1) if L % s == 0]
        return list(range(1, L + 1))

    def group_count_ok(self, G: int, H: int) -> bool:
        return self.groups == "any" or (self.groups == "per_head" and G == H) or (self.groups == "shared" and G == 1)

    def allows(self, case) -> bool:
        """Whether a drawn Case (kvcompress.testing.cases.Case) lies inside."""
        packed = case.seqlens is not None
        return (case.padding in self.paddings
                and ("packed" if packed else "batched") in self.inputs
                and self.group_count_ok(case.G, case.H)
                and (self.bias or not case.bias) and (self.bias2 or not case.bias2)
                and case.dtype in self.dtypes
                and (self.block_sizes is None or case.L in self.block_sizes)
                and case.S in self.stride_options(case.L)
                and case.D % self.head_dim_multiple == 0
                and (self.pe or not case.use_pe)
                and (case.kind != "mlp" or case.activation in self.activations)
                and case.layout in self.layouts
                and (self.empty or case.W > 0 and case.B > 0)
                and (self.max_batch is None or case.B <= self.max_batch)
                and (self.max_heads is None or case.H <= self.max_heads)
                and (self.max_tokens is None or case.T <= self.max_tokens)
                and (self.max_dim is None or case.D <= self.max_dim))

    @property
    def full(self) -> bool:
        """Whether this is the whole contract."""
        return self == Domain()

    def describe(self) -> str:
        """One line for the verification matrix: what differs from the full contract."""
        if self.full:
            return "full"
        d = Domain()
        parts = []
        for f in dataclasses.fields(self):
            v, default = getattr(self, f.name), getattr(d, f.name)
            if v == default:
                continue
            if f.name in ("bias", "bias2", "pe", "empty", "differentiable") and v is False:
                parts.append({"bias": "no bias", "bias2": "no b2", "pe": "no pe", "empty": "no empty inputs",
                              "differentiable": "forward only"}[f.name])
            elif f.name == "d_out_equals_d":
                parts.append("D_out=D")
            elif f.name == "head_dim_multiple":
                parts.append(f"D%{v}=0")
            elif f.name == "block_sizes":
                parts.append("L in {" + ",".join(map(str, v)) + "}")
            elif f.name == "strides":
                parts.append({"divides": "S|L", "equal": "S=L"}[v])
            elif f.name == "groups":
                parts.append({"per_head": "G=H", "shared": "G=1"}[v])
            elif isinstance(v, tuple):
                parts.append(f"{f.name}={'/'.join(v)}")
            else:
                parts.append(f"{f.name}={v}")
        return "; ".join(parts)

    def intersect_dtypes(self, dtypes: Iterable[str]) -> tuple[str, ...]:
        return tuple(d for d in dtypes if d in self.dtypes)


FULL = Domain()


def declare_domain(domain: Domain | None = None, /, **fields) -> Callable[[Callable], Callable]:
    """Decorator: attach a Domain to an implementation (``fn.__kvcompress_domain__``).

    Give a Domain, or its fields as keywords. Returns the function unchanged."""
    if domain is not None and fields:
        raise TypeError("declare_domain: give a Domain or keyword fields, not both")
    d = domain if domain is not None else Domain(**fields)
    if not isinstance(d, Domain):
        raise TypeError(f"declare_domain: expected a kvcompress.testing.Domain, got {type(d).__name__}")

    def deco(fn: Callable) -> Callable:
        try:
            setattr(fn, ATTRIBUTE, d)
        except AttributeError:   # a builtin or a bound method: wrap it
            import functools

            @functools.wraps(fn)
            def wrapper(*a, **k):
                return fn(*a, **k)

            setattr(wrapper, ATTRIBUTE, d)
            return wrapper
        return fn

    return deco


def domain_of(fn: Callable) -> Domain:
    """The Domain declared on ``fn``, or the full contract."""
    d = getattr(fn, ATTRIBUTE, None)
    if d is None:
        return FULL
    if isinstance(d, dict):
        return Domain(**d)
    if not isinstance(d, Domain):
        raise TypeError(f"{ATTRIBUTE} of {fn!r} must be a kvcompress.testing.Domain, got {type(d).__name__}")
    return d
