"""The registry of implementations: one entry per (kind, backend).

A backend registers its callable with one decorator line::

    @register("linear", "torch", devices=("cpu", "cuda"))
    def linear(x, weight, bias=None, *, block_size, stride, padding, pe, cu_seqlens): ...

The callable has the reference's signature (docs/semantics.md) and receives
arguments that ``kvcompress.functional`` has already validated.
``kvcompress.functional`` dispatches through this registry, and the property
suite parametrizes over every entry, so a registered kernel is verified
without touching the tests.

Backends are found lazily, on the first look-up of their kind (fla's
convention): the built-in ones by importing ``kvcompress.ops.<kind>``,
whose ``__init__`` registers them; another package's through the entry
point group ``kvcompress.backends``, loaded once on the first look-up of
any kind. An entry point names a module (or a callable, then called with
no arguments) that calls ``register``::

    [project.entry-points."kvcompress.backends"]
    my_kernels = "my_package.kvcompress_backends"

A plug-in that fails to load is reported with a warning naming it, and the
built-in backends keep working.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch

from .kinds import KINDS, PRECISION_CLASSES

ENTRY_POINT_GROUP = "kvcompress.backends"
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One registered implementation of one kind.

    kind, name: e.g. ("linear", "torch"). fn: the callable. devices: device
    types it runs on. dtypes: input dtypes it accepts. priority: "auto"
    picks the highest-priority backend that is available and supports the
    call. available: whether it can run here at all (e.g. Triton
    installed). supports: optional per-call predicate on the validated
    arguments (a configuration the kernel does not handle returns False).
    auto_devices: the devices on which "auto" may pick it (default: all of
    ``devices``; Triton runs on the CPU only in its interpreter, for tests,
    and is never picked there automatically).
    batch_invariant: the backend promises that a window's output bits do not
    depend on what else is in the call (other windows, sequences, batch
    rows); the property suite checks the promise, and streaming is then
    bit-exact against the full pass. BLAS-backed paths cannot promise it:
    the library picks its summation order by matrix shape.
    precision: the precision class it meets (SPEC 3c, docs/semantics.md
    "Numerics"): "strict" (only the output and each gradient rounded to the
    input dtype) or "io-intermediates" (also the intermediates SPEC 3c
    names); the property suite holds it to that class's bound.
    lean: whether its extra memory stays of the order of its inputs and
    output. False for a backend that stores a layer the size of mlp's
    hidden layer (B * H * W * F units) between forward and backward;
    ``kvcompress.functional.mlp(memory="lean")`` picks only lean backends.
    prefer: optional per-call predicate, on the same arguments as
    ``supports``, asked by "auto" only: False passes the call on to the
    next backend in priority order (a size at which a lower-priority
    backend is measured faster); a backend named outright ignores it.
    """

    kind: str
    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    priority: int = 0
    available: Callable[[], bool] = field(default=lambda: True)
    supports: Callable[..., bool] | None = None
    auto_devices: tuple[str, ...] | None = None
    batch_invariant: bool = False
    emulated_devices: tuple[str, ...] = ()
    takes_total_windows: bool = False
    precision: str = "strict"
    lean: bool = True
    prefer: Callable[..., bool] | None = None

    def accepts_auto(self, x: torch.Tensor, *args, **kwargs) -> bool:
        """Whether backend="auto" may pick this backend for the call."""
        auto = self.devices if self.auto_devices is None else self.auto_devices
        return (x.device.type in auto and self.accepts(x, *args, **kwargs)
                and (self.prefer is None or bool(self.prefer(x, *args, **kwargs))))

    def accepts(self, x: torch.Tensor, *args, **kwargs) -> bool:
        """Whether this backend runs on x's device and dtype and supports the call."""
        if x.device.type not in self.devices or x.dtype not in self.dtypes or not self.available():
            return False
        return self.supports is None or bool(self.supports(x, *args, **kwargs))


_REGISTRY: dict[str, dict[str, Backend]] = {k: {} for k in KINDS}


def register(kind: str, name: str, *, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...] = ALL_DTYPES,
             priority: int = 0, available: Callable[[], bool] | None = None,
             supports: Callable[..., bool] | None = None,
             auto_devices: tuple[str, ...] | None = None,
             batch_invariant: bool = False,
             emulated_devices: tuple[str, ...] = (),
             precision: str = "strict", lean: bool = True,
             prefer: Callable[..., bool] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as backend ``name`` of ``kind`` (the
    fields of ``Backend``)."""
    if kind not in KINDS:
        raise ValueError(f"register: kind must be one of {KINDS}, got {kind!r}")
    if precision not in PRECISION_CLASSES:
        raise ValueError(f"register: precision must be one of {PRECISION_CLASSES}, got {precision!r}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY[kind]:
            raise ValueError(f"register: backend {name!r} of {kind!r} is already registered")
        _REGISTRY[kind][name] = Backend(kind, name, fn, tuple(devices), tuple(dtypes), priority,
                                        available or (lambda: True), supports,
                                        None if auto_devices is None else tuple(auto_devices), batch_invariant,
                                        tuple(emulated_devices),
                                        "total_windows" in inspect.signature(fn).parameters, precision, bool(lean),
                                        prefer)
        return fn

    return deco


def backends(kind: str) -> list[Backend]:
    """Every backend registered for ``kind``, highest priority first."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _load(kind)
    current = tuple(_REGISTRY[kind].values())
    cached = _SORTED.get(kind)
    # sorted once per state of the registry: the entries themselves are compared (by identity first), so an
    # entry replaced without ``register`` (the test suite's tripwire) is seen too
    if cached is None or cached[0] != current:
        cached = _SORTED[kind] = (current, sorted(current, key=lambda b: -b.priority))
    return list(cached[1])


_SORTED: dict[str, tuple[tuple[Backend, ...], list[Backend]]] = {}


def get(kind: str, name: str) -> Backend:
    """The backend ``name`` of ``kind``; ValueError naming the choices if none."""
    if kind in _LOADED and type(name) is str:     # the registry's own entry, without sorting every backend
        b = _REGISTRY[kind].get(name)
        if b is not None:
            return b
    for b in backends(kind):
        if b.name == name:
            return b
    raise ValueError(f"{kind}: backend must be 'auto' or one of {[b.name for b in backends(kind)]}, got {name!r}")


_LOADED: set[str] = set()


def _load(kind: str) -> None:
    """Register the built-in backends of ``kind`` and, on the first call,
    every plug-in of the entry point group."""
    if kind in _LOADED:
        return
    first = not _LOADED
    importlib.import_module(f"{__package__}.ops.{kind}")   # an error leaves the kind unloaded: raised again next time
    _LOADED.add(kind)
    if first:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if callable(obj):
                    obj()
            except Exception as e:  # a broken plug-in must not take the built-in backends down
                warnings.warn(f"kvcompress: the backend plug-in {ep.name!r} ({ep.value}) of entry point group "
                              f"{ENTRY_POINT_GROUP!r} failed to load: {type(e).__name__}: {e}", stacklevel=3)
