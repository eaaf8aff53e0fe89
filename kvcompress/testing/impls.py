"""The implementations under test: every backend in kvcompress's registry,
and contributors' callables given with ``--impl KIND=module:callable``."""

from __future__ import annotations

from ._env import configure as _configure_environment

_configure_environment()   # before kvcompress.ops imports triton

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

import kvcompress.functional as kf  # noqa: E402
from kvcompress import backends as kb  # noqa: E402

from .convert import DTYPES  # noqa: E402
from .domain import FULL, Domain, domain_of  # noqa: E402
from .records import KINDS  # noqa: E402

DTYPE_NAMES = tuple(DTYPES)


# the strategies' size caps for an emulated kernel (Triton's interpreter costs
# per program and per op): B, H <= 2, but H = 4 with G = 2 (the grouping where
# h // (H // G) is not h % G), with one batch row (B * H <= 4)
EMULATED_LIMITS = dict(max_batch=2, max_heads=2, max_grouped_heads=4, max_rows=4)


@dataclass(frozen=True)
class Impl:
    """kind, a display name, the callable (reference signature, torch
    tensors), the device its inputs live on, the dtypes to test, whether
    it is built in, and the domain it declares (kvcompress.testing.Domain)."""

    kind: str
    name: str
    fn: Callable
    device: str
    dtypes: tuple[str, ...]
    builtin: bool = True
    batch_invariant: bool = False     # declared by the backend (kvcompress.backends), checked by the suite
    emulated: bool = False            # runs through an emulator here (Triton's interpreter on the CPU)
    domain: Domain = field(default=FULL)

    @property
    def limits(self) -> dict:
        """Extra arguments for the strategies: the domain, and for an
        emulated kernel (which costs per program and per op) small cases:
        B, H <= 2, but for H = 4 with G = 2 (the grouping where h // (H // G)
        is not h % G), which comes with one batch row (B * H <= 4)."""
        out = dict(domain=self.domain)
        if self.emulated:
            out.update(EMULATED_LIMITS)
        return out

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.name}"


def for_kinds(*kinds: str):
    """Decorator: a test asking for ``impl`` runs only for these kinds."""
    def deco(fn):
        fn.kvcompress_kinds = kinds
        return fn
    return deco


def requires(predicate: Callable[[Domain], bool], what: str):
    """Decorator: a property runs only for implementations whose domain
    satisfies ``predicate`` (it needs, e.g., both paddings); ``what`` says
    what it needs, for the verification matrix. Outside the domain the
    property is not generated at all, never skipped."""
    def deco(fn):
        fn.kvcompress_requires = getattr(fn, "kvcompress_requires", ()) + ((predicate, what),)
        return fn
    return deco


def for_impls(predicate: Callable[[Impl], bool], why: str):
    """Decorator: a property runs only for the implementations under test
    that satisfy ``predicate`` (e.g. not emulated: production shapes are out
    of an interpreter's reach); ``why`` says why, for readers. The others are
    not generated, never skipped."""
    def deco(fn):
        fn.kvcompress_impl_filters = getattr(fn, "kvcompress_impl_filters", ()) + ((predicate, why),)
        return fn
    return deco


def unmet_requirements(fn, domain: Domain) -> list[str]:
    """What ``fn`` needs that ``domain`` lacks (empty: it runs)."""
    return [what for pred, what in getattr(fn, "kvcompress_requires", ()) if not pred(domain)]


def needs_dtype(dtype: str):
    """Decorator: a test asking for ``impl`` runs only for implementations
    that take this dtype (gradcheck needs float64)."""
    def deco(fn):
        fn.kvcompress_needs_dtype = dtype
        return fn
    return deco


class UsageError(ValueError):
    """A malformed --impl/--impl-device/--impl-dtypes value."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


EMULATED_CHOICES = ("exclude", "only", "include")


def emulated_choice() -> str:
    """KVCOMPRESS_EMULATED: whether the suite runs backends that are emulated
    on this device (exclude, the default; only; include)."""
    v = os.environ.get("KVCOMPRESS_EMULATED", "exclude")
    if v not in EMULATED_CHOICES:
        raise UsageError(f"KVCOMPRESS_EMULATED / --emulated must be one of {EMULATED_CHOICES}, got {v!r}")
    return v


def builtin_impls(device: str | None = None) -> list[Impl]:
    """Every registered backend that can run here on ``device``, called
    through the public function (validation included). Emulated backends
    (Triton's interpreter on the CPU) are selected by KVCOMPRESS_EMULATED."""
    device = device or default_device()
    choice = emulated_choice()
    out = []
    for kind in KINDS:
        for b in kb.backends(kind):
            emulated = device in b.emulated_devices
            if (choice == "exclude" and emulated) or (choice == "only" and not emulated):
                continue
            if device in b.devices and b.available():
                dtypes = tuple(n for n in DTYPE_NAMES if DTYPES[n] in b.dtypes)
                # a backend that serves part of the contract declares it on its callable (``__kvcompress_domain__``,
                # e.g. mlp's "gemm": dense inputs, S dividing L); the registry's precision class is the promise
                domain = dataclasses.replace(domain_of(b.fn), precision=b.precision)
                out.append(Impl(kind, b.name, functools.partial(getattr(kf, kind), backend=b.name), device, dtypes,
                                batch_invariant=b.batch_invariant, emulated=emulated, domain=domain))
    return out


def parse_dtypes(value: str | None) -> tuple[str, ...]:
    if not value:
        return DTYPE_NAMES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in DTYPE_NAMES]
    if bad or not names:
        raise UsageError(f"--impl-dtypes takes a comma list of {DTYPE_NAMES}, got {value!r}")
    return names


def parse_device(value: str | None) -> str:
    if value is None:
        return default_device()
    if value not in ("cpu", "cuda"):
        raise UsageError(f"--impl-device must be cpu or cuda, got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise UsageError("--impl-device cuda: no CUDA device is available here")
    return value


def _resolve(option: str, spec: str) -> tuple[str, str, object]:
    """``KIND=package.module:attr`` -> (kind, target, object), or UsageError."""
    what = "callable" if option == "--impl" else "attribute"
    if "=" not in spec:
        raise UsageError(f"{option} takes KIND=module:{what}, got {spec!r}")
    kind, target = (s.strip() for s in spec.split("=", 1))
    if kind not in KINDS:
        raise UsageError(f"{option} {spec!r}: unknown kind {kind!r}; kinds are {KINDS}")
    if ":" not in target:
        raise UsageError(f"{option} {spec!r}: the target must be module:{what}, got {target!r}")
    mod_name, attr = target.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError or an error raised while importing
        raise UsageError(f"{option} {spec!r}: cannot import module {mod_name!r}: {e}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{option} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return kind, target, obj


def load_domains(specs: list[str]) -> dict[str, Domain]:
    """``--domain KIND=module:attribute`` values -> {kind: Domain}."""
    out = {}
    for spec in specs:
        kind, target, obj = _resolve("--domain", spec)
        if isinstance(obj, dict):
            try:
                obj = Domain(**obj)
            except (TypeError, ValueError) as e:
                raise UsageError(f"--domain {spec!r}: {e}") from e
        if not isinstance(obj, Domain):
            raise UsageError(f"--domain {spec!r}: {target!r} is a {type(obj).__name__}, not a "
                             "kvcompress.testing.Domain")
        out[kind] = obj
    return out


def load_impl(spec: str, device: str, dtypes: tuple[str, ...], domains: dict[str, Domain] | None = None) -> Impl:
    """``KIND=package.module:callable`` -> Impl, or UsageError saying what is
    wrong. Its domain: ``domains[kind]`` (from ``--domain``) if given, else the
    one declared on the callable (``declare_domain``), else the full contract;
    the dtypes tested are ``dtypes`` within the domain's."""
    kind, target, fn = _resolve("--impl", spec)
    if not callable(fn):
        raise UsageError(f"--impl {spec!r}: {target!r} is not callable")
    try:
        domain = (domains or {}).get(kind) or domain_of(fn)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--impl {spec!r}: its declared domain is malformed: {e}") from e
    chosen = domain.intersect_dtypes(dtypes)
    if not chosen:
        raise UsageError(f"--impl {spec!r}: none of the dtypes {dtypes} is in its domain's {domain.dtypes}")
    return Impl(kind, target, fn, device, chosen, builtin=False, domain=domain)


TRIPWIRE_MESSAGE = "a backend ran although the arguments were invalid"


def arm_tripwire(monkeypatch) -> None:
    """Replace every registered backend by one that fails the test if it is
    reached: validation errors must come before any computation."""
    import dataclasses

    def boom(*a, **k):
        raise AssertionError(TRIPWIRE_MESSAGE)

    for kind in KINDS:
        for b in kb.backends(kind):
            monkeypatch.setitem(kb._REGISTRY[kind], b.name, dataclasses.replace(b, fn=boom))
