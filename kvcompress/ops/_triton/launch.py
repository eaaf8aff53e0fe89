"""Launching kernels: specialisation, autotuning, interpreter tiles, keyword
arguments, and the size arithmetic of grids.

- ``jit_kernel``: ``triton.jit`` leaving the problem sizes (``SIZE_ARGS``)
  unspecialised.
- ``Launcher``: one kernel, autotuned on a GPU, run with fixed tiles in the
  interpreter (autotuning there would only be slow).
- ``kernel_args(kernel, **named)``, ``strides(prefix, t, axes)``: launches
  written by parameter name, handed to a Launcher in the kernel's order.
- ``small_tiles()``, ``interpret_block``: the interpreter's tile sizes.
- ``only_config(launcher, pick)``: one launcher's launches run one of the
  configurations its prune keeps (tests of each configuration).
- ``LAUNCHERS``, ``tuned_keys()``, ``picks_since(keys)``: every Launcher,
  and the autotuner's picks made since a snapshot (kvcompress-bench records
  them per benchmark).
- ``cdiv``, ``next_pow2``, ``size_class``, ``fill_factor``.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton

from ..._cache import bounded_put
from .env import INTERPRET

__all__ = ["AUTOTUNE", "Direct", "FAST_LAUNCH", "LAUNCHERS", "LAUNCH_CACHE_SIZE", "Launcher", "cache_put", "SIZE_ARGS",
           "cdiv", "fill_factor", "first_config", "interpret_block", "jit_kernel", "kernel_args", "next_pow2",
           "only_config", "picks_since", "size_class", "small_tiles", "small_tiles_active", "strides", "tile_configs",
           "tuned_keys"]

# Problem sizes and counts among the kernels' arguments. Triton specialises an
# int argument on == 1 and on divisibility by 16 unless told not to, so every
# combination of those properties that the calls bring compiles a kernel
# variant of its own: a new sequence length or head count could mean a new
# compilation (the property suite on the GPU drew hundreds). The kernels use
# these only in masks, loop bounds and index arithmetic, so they stay runtime
# values. Strides and the feature sizes (D, DO, F) keep their specialisation:
# it is what lets the compiler vectorise along the contiguous axis. So do B
# and the heads per group (HG...): the weight-gradient kernels split each row
# index into (b, head, window) by dividing by them, which a specialised 1
# removes (unspecialised, linear's dW kernel took 149 instead of 110 us at the
# NSA size on an H100, GPU run 11).
SIZE_ARGS = frozenset({"H", "N", "N_STEPS", "T", "W", "NQ", "L", "S", "PRE", "C", "P", "K", "M", "NSLOT",
                       "ROWS_PER_SPLIT", "R_PER", "WORK"})


def jit_kernel(fn):
    """``triton.jit`` for a launched kernel, with the ``SIZE_ARGS`` among its
    (non-constexpr) parameters left unspecialised; the kernel's
    ``unspecialized`` attribute names them, its ``runtime_args`` names all
    its non-constexpr parameters in order (``kernel_args``)."""
    runtime = tuple(n for n, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation))
    names = tuple(n for n in runtime if n in SIZE_ARGS)
    kernel = triton.jit(fn, do_not_specialize=names)
    kernel.unspecialized = names
    kernel.runtime_args = runtime
    return kernel


LAUNCH_CACHE_SIZE = 256   # entries of a per-kernel launch-argument cache before it is emptied


def cache_put(cache: dict, key, value):
    """cache[key] = value, returned; the cache is emptied first when it holds
    LAUNCH_CACHE_SIZE entries (bounded: packed calls key on their window
    counts). For the wrappers' caches of launch arguments built once per
    (shapes, strides, dtypes, plan sizes) key."""
    return bounded_put(cache, key, value, LAUNCH_CACHE_SIZE)


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def size_class(n: int) -> int:
    """log2 size class of a problem (bit length of n, >= 1): an autotuning key,
    so that a tiny problem does not choose the tiles of a large one."""
    return max(int(n), 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fill_factor(programs: int, sms: int, waves: int = 1) -> int:
    """How many times ``programs`` fit into ``waves`` waves of one program per
    SM, at least 1: the factor by which a grid that would leave SMs idle can
    be split (F splits, phase groups, window splits)."""
    return max(1, (waves * sms) // max(programs, 1))


def kernel_args(kernel, /, **named) -> tuple:
    """The runtime (non-constexpr) arguments of a ``jit_kernel``, given by
    parameter name, as a tuple in the kernel's parameter order: a launch is
    written by name, and a ``Launcher`` (and whatever wraps one) still
    receives the positional arguments it keys and reports on. Constexprs are
    passed to the launch as keywords.

    Raises TypeError for a name the kernel lacks or a parameter left out.
    """
    params = kernel.runtime_args
    if len(named) == len(params):      # then every parameter found means no unknown name either
        try:
            return tuple([named[n] for n in params])
        except KeyError:
            pass
    unknown = named.keys() - set(params)
    missing = [n for n in params if n not in named]
    raise TypeError(f"{kernel.__name__}: unknown arguments {sorted(unknown)}, missing {missing}")


def strides(prefix: str, t: torch.Tensor | None, axes: str) -> dict:
    """{prefix + axis: stride} for each letter of ``axes`` (one per dimension
    of t), all 0 when t is None (an absent optional tensor): e.g.
    ``strides("sx", x, "bhtd")`` gives sxb, sxh, sxt, sxd."""
    names = _STRIDE_NAMES.get((prefix, axes))
    if names is None:
        names = _STRIDE_NAMES[prefix, axes] = tuple(prefix + a for a in axes)
    values = t.stride() if t is not None else (0,) * len(axes)
    if len(values) != len(axes):
        raise ValueError(f"strides: {prefix} names {len(axes)} axes, the tensor has {len(values)}")
    return dict(zip(names, values))


_STRIDE_NAMES: dict[tuple[str, str], tuple[str, ...]] = {}    # (prefix, axes) -> the parameter names


_SMALL_TILES = False


def small_tiles_active() -> bool:
    """Whether a ``small_tiles()`` block is running (read at call time)."""
    return _SMALL_TILES


class small_tiles:
    """Context manager: interpreter launches use the smallest tiles (several
    tiles per row and several feature blocks even for test-sized inputs),
    so tests reach the multi-tile code paths. The default, large tiles,
    keeps the interpreter fast (its cost is per program and per op)."""

    def __enter__(self):
        global _SMALL_TILES
        self._old, _SMALL_TILES = _SMALL_TILES, True
        return self

    def __exit__(self, *exc):
        global _SMALL_TILES
        _SMALL_TILES = self._old


def interpret_block(n: int, cap: int, small: int = 8) -> int:
    """An interpreter tile size for a dimension of n: ``small`` inside
    ``small_tiles()``, else next_pow2(n) clamped to [small, cap]."""
    return small if _SMALL_TILES else min(cap, max(small, next_pow2(n)))


def tile_configs(names, rows):
    """Autotuning configurations from rows (tile_1, tile_2, tile_3, warps,
    stages), the tiles named by ``names``."""
    return [triton.Config(dict(zip(names, r[:3])), num_warps=r[3], num_stages=r[4]) for r in rows]


def _autotune_setting() -> bool:
    value = os.environ.get("KVCOMPRESS_TRITON_AUTOTUNE", "1").lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"KVCOMPRESS_TRITON_AUTOTUNE must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on")


# KVCOMPRESS_TRITON_AUTOTUNE=0 (read once at import): on a GPU, every launch takes the first
# configuration its prune keeps that launches, instead of benchmarking them all for each new
# autotuning key. For correctness runs (the property suite on a GPU draws a new key almost every
# example, and autotuning then costs ~35 s per property: GPU run 4, docs/gpu-runs.md); never for timing.
AUTOTUNE = _autotune_setting()


def _fast_launch_setting() -> bool:
    value = os.environ.get("KVCOMPRESS_TRITON_FAST_LAUNCH", "1").lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"KVCOMPRESS_TRITON_FAST_LAUNCH must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on")


def _triton_version() -> tuple[int, int]:
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


# Versions whose JITFunction.run hands the compiled kernel's launcher every parameter of the kernel, constexprs
# included, in signature order (read in the sources of 3.6, the GPU runs' version, and 3.9); the direct launch
# below does the same. Other versions launch through JITFunction.run.
FAST_LAUNCH_VERSIONS = ((3, 6), (3, 9))

# KVCOMPRESS_TRITON_FAST_LAUNCH=0 (read once at import) turns the direct launch off (see Launcher).
FAST_LAUNCH = (_fast_launch_setting() and not INTERPRET
               and FAST_LAUNCH_VERSIONS[0] <= _triton_version() <= FAST_LAUNCH_VERSIONS[1])


_Tensor = torch.Tensor


def _direct_lookup(direct: dict, args: tuple, kwargs: dict):
    """(key, cached entry or None) of a call for the direct launch (see
    ``Launcher.launch``); key None when the call has none: a keyword tensor
    (it would be keyed by identity) or an unhashable argument. The key is
    what JITFunction.run specialises on: the current device, the keywords,
    a tensor's dtype and 16-byte alignment, any other value itself (an
    int's == 1 and divisibility by 16 follow from it); built inline, as a
    function call per argument would double its cost (~5 us for 50
    arguments on a 2-core Xeon)."""
    for v in kwargs.values():
        if isinstance(v, _Tensor):
            return None, None
    key = (torch.cuda.current_device(), *kwargs.items(),
           *[a if a.__class__ is int else (a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor) else a
             for a in args])
    try:
        return key, direct.get(key)
    except TypeError:
        return None, None


def _run_direct(hit, grid, args: tuple, names) -> None:
    """Launch a cached compiled kernel (``_capture``'s entry) on ``args``,
    the call's grid evaluated on the constexprs (on every parameter if the
    grid reads another one)."""
    compiled, tail, meta = hit
    if callable(grid):
        try:
            g = grid(meta)                                  # the grids of kvcompress read only constexprs
        except KeyError:
            g = grid(dict(zip(names, (*args, *tail))))
    else:
        g = grid
    compiled[(*g, 1, 1)[:3]](*args, *tail)


def _capture(direct: dict, kernel, defaults: dict, key, compiled, args: tuple, kwargs: dict) -> None:
    """Cache ``compiled`` (what ``kernel[grid](*args, **kwargs)`` returned)
    under ``key``, with the constexpr values that follow the positional
    arguments (from kwargs, else the kernel's defaults); nothing when the key
    is None, the launch returned no compiled kernel, or a parameter was
    given some other way."""
    if key is None or not hasattr(compiled, "__getitem__"):
        return
    names = kernel.arg_names
    try:
        tail = tuple([kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]])
    except KeyError:
        return
    cache_put(direct, key, (compiled, tail, dict(zip(names[len(args):], tail))))


def _defaults(kernel) -> dict:
    """A JIT kernel's parameters with defaults: {name: default}."""
    return {p.name: p.default for p in getattr(kernel, "params", ()) if p.default is not inspect.Parameter.empty}


class Direct:
    """A kernel launched without autotuning, through the direct launch of
    ``Launcher.launch``: ``Direct(kernel)(grid, *args, **kwargs)`` is
    ``kernel[grid](*args, **kwargs)`` (grid a tuple, or grid(meta) ->
    tuple), the compiled kernel's own launcher from the second call of a
    specialisation on. Runtime arguments positional (``kernel_args``), the
    constexprs and options as keywords; a keyword tensor launches through
    JITFunction.run every time."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._direct: dict | None = {} if FAST_LAUNCH else None
        self._defaults = _defaults(kernel)

    def __call__(self, grid, *args, **kwargs):
        direct = self._direct
        if direct is None:
            self.kernel[grid](*args, **kwargs)
            return
        key, hit = _direct_lookup(direct, args, kwargs)
        if hit is not None:
            _run_direct(hit, grid, args, self.kernel.arg_names)
            return
        _capture(direct, self.kernel, self._defaults, key, self.kernel[grid](*args, **kwargs), args, kwargs)


def first_config(configs, prune, named):
    """The configurations to try in order without autotuning: those ``prune``
    keeps (all when it keeps none, as the autotuner does), first first."""
    kept = prune(configs, named) if prune is not None else list(configs)
    return list(kept) or list(configs[:1])


LAUNCHERS: list = []     # every Launcher made (module-level singletons of the kinds' wrappers), in order


class Launcher:
    """One kernel, autotuned over ``configs`` on a GPU; in the interpreter it
    runs once with ``interpret_meta(named_args) -> dict`` of block sizes.
    With KVCOMPRESS_TRITON_AUTOTUNE=0 a GPU launch takes the first kept
    configuration that fits the device (``first_config``), untimed.

    Call as ``launcher(grid, *args, **kwargs)`` with ``grid(meta) -> tuple``.
    ``prune(configs, named_args) -> configs`` drops configurations that do
    not fit the call; both see every argument by its kernel name.
    """

    def __init__(self, kernel, *, configs, key, interpret_meta, prune=None):
        self.kernel = kernel
        # the direct launch: (device, keywords, argument specialisations) -> (compiled kernel, the constexpr values
        # after the positional arguments, those as a dict for the grid function); None when off
        self._direct: dict | None = {} if FAST_LAUNCH else None
        self._defaults = _defaults(kernel)
        self.interpret_meta = interpret_meta
        self.configs, self.prune = list(configs), prune
        self.tuned = None
        self._key_pos = [(kernel.arg_names.index(k), k) for k in key]
        self.best: dict[tuple, triton.Config] = {}   # tuning key -> the autotuner's pick
        self._picked: dict[tuple, dict] = {}          # tuning key -> its pick's launch keywords
        self._only = None                             # only_config's (pick, runs) while it is active
        LAUNCHERS.append(self)
        if not INTERPRET:
            early = None
            if prune is not None:
                def early(configs, named_args, **kwargs):
                    kept = prune(configs, {**named_args, **kwargs})
                    return kept or configs[:1]
            self.tuned = triton.autotune(configs=configs, key=key,
                                         prune_configs_by={"early_config_prune": early} if early else None,
                                         )(kernel)

    def __call__(self, grid, *args, **kwargs):
        if self._only is not None and self._launch_only(grid, args, kwargs):
            return
        if self.tuned is None:
            named = dict(zip(self.kernel.arg_names, args))
            named.update(kwargs)
            meta = self.interpret_meta(named)
            named.update(meta)
            self.kernel[grid(named)](*args, **kwargs, **meta)
            return
        direct, dkey = self._direct, None
        if direct is not None:
            dkey, hit = _direct_lookup(direct, args, kwargs)
            if hit is not None:
                _run_direct(hit, grid, args, self.kernel.arg_names)
                return
        if AUTOTUNE:
            # Once a key is tuned, launch its pick directly: triton's Autotuner.run rebuilds its key
            # from every argument on each call, ~15-25 us of host time per launch (GPU run 11, cProfile)
            key = self.tuning_key(args, kwargs)
            picked = self._picked.get(key)
            if picked is None:
                self.tuned[grid](*args, **kwargs)          # tunes this key (once), then launches its pick
                self.best[key] = self.tuned.best_config
                self._picked[key] = self.tuned.best_config.all_kwargs()   # built once, not per launch
            else:
                self.launch(grid, args, {**kwargs, **picked}, dkey)
        else:
            named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            tried = first_config(self.configs, self.prune, named)
            for i, cfg in enumerate(tried):
                try:
                    self.launch(grid, args, {**kwargs, **cfg.kwargs, "num_warps": cfg.num_warps,
                                             "num_stages": cfg.num_stages}, dkey)
                    return
                except triton.runtime.errors.OutOfResources:   # as the autotuner skips it: the next one
                    if i == len(tried) - 1:
                        raise

    def _launch_only(self, grid, args: tuple, kwargs: dict) -> bool:
        """A launch inside ``only_config``: the configuration its pick takes
        from those the prune keeps for this call, untuned and not through
        the direct launch (whose cache could hold another configuration's
        kernel); in the interpreter its keywords are the tiles. False (and
        nothing launched) when the pick takes none."""
        pick, runs = self._only
        named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
        cfg = pick(self.prune(self.configs, named) if self.prune is not None else list(self.configs))
        if cfg is None:
            return False
        runs.append(cfg)
        if self.tuned is None:
            meta = dict(cfg.kwargs)
            self.kernel[grid({**named, **meta})](*args, **kwargs, **meta)
        else:
            self.kernel[grid](*args, **kwargs, **cfg.all_kwargs())
        return True

    def launch(self, grid, args: tuple, kwargs: dict, key=None):
        """``self.kernel[grid](*args, **kwargs)`` (kwargs: constexprs and
        compile options, the configuration's included), then, with
        FAST_LAUNCH, the compiled kernel's own launcher cached under ``key``
        (that of the caller's call in ``__call__``), where the next call with
        that key goes straight, before any tuning key or configuration is
        looked up. Triton's JITFunction.run binds and specialises every
        argument and rebuilds its cache key on each call (~33 native calls,
        about half of a small forward's host time, GPU run 56; the direct
        launch took a mean_pool forward from 161 to 71 us of host time, run
        65). The key is everything that run specialises on: the current
        device, the caller's keywords (which with the arguments fix the
        configuration), each tensor's dtype and 16-byte alignment and every
        other argument's value; a call that differs in any of them goes
        through JITFunction.run (compiling if need be), and its kernel is
        cached in turn. The grid is not in the key (it does not change the
        compiled kernel; several wrappers build a new grid function a call):
        each call evaluates its own grid function on the constexprs (on
        every parameter if it reads another one). Launch hooks (e.g.
        Proton) still see every launch: the compiled kernel's launcher calls
        them."""
        compiled = self.kernel[grid](*args, **kwargs)
        if self._direct is not None:
            _capture(self._direct, self.kernel, self._defaults, key, compiled, args, kwargs)

    def tuning_key(self, args, kwargs) -> tuple:
        """The autotuner's key of a call: the values of the ``key`` arguments
        and the dtypes of the tensor arguments (as triton's Autotuner keys)."""
        n = len(args)
        return (*[args[i] if i < n else kwargs[name] for i, name in self._key_pos],
                *[a.dtype for a in args if isinstance(a, torch.Tensor)],
                *[v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor)])


@contextlib.contextmanager
def only_config(launcher: Launcher, pick):
    """Inside the block each launch of ``launcher`` runs ``pick(kept)``, kept
    being the configurations its prune keeps for that call (those the
    autotuner would time, in order; all of them without a prune): on a GPU
    that configuration as compiled, untuned, not through the direct launch;
    in the interpreter its keywords as the tiles. A launch for which pick
    returns None goes as usual. Yields the list of the configurations run.
    For tests of each configuration the autotuner may pick (it times them
    and checks none of their results)."""
    runs: list = []
    old, launcher._only = launcher._only, (pick, runs)
    try:
        yield runs
    finally:
        launcher._only = old


def tuned_keys() -> list[set]:
    """A snapshot, per Launcher (``LAUNCHERS`` order), of the tuning keys the
    autotuner has picked a configuration for."""
    return [set(lau.best) for lau in LAUNCHERS]


def picks_since(keys: list[set]) -> dict[str, list[str]]:
    """The autotuner's picks made since the snapshot ``keys`` (``tuned_keys``):
    {kernel name: [its configuration as text, ...]}, one entry per newly
    tuned key (empty in the interpreter and without autotuning)."""
    out: dict[str, list[str]] = {}
    for i, lau in enumerate(LAUNCHERS):
        old = keys[i] if i < len(keys) else set()
        for k, cfg in lau.best.items():
            if k not in old:
                out.setdefault(lau.kernel.__name__, []).append(str(cfg))
    return out
