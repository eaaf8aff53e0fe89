"""What every Triton kernel of kvcompress shares (docs/triton.md explains the design).

Host side:

- ``INTERPRET``, ``DEVICES``, ``DTYPES``, ``triton_available()``: where the
  backend runs. Under ``TRITON_INTERPRET=1`` (how CI runs kernels on CPU
  tensors) it also accepts CPU tensors; ``auto_devices=("cuda",)`` in each
  registration keeps backend="auto" from ever picking the interpreter.
- ``empty(shape, dtype=, device=)``: every kernel output is allocated here; it
  is NaN-filled when ``KVCOMPRESS_POISON=1`` so an element a kernel never
  writes fails the tests (fla's conftest does the same for ``torch.empty``).
- ``seq_plan(...)`` -> ``SeqPlan``: the windowing of one call (fixed length or
  packed with ``cu_seqlens``) as the integers and device tensors the kernels
  take, computed without a host synchronisation except the one documented
  read of the packed output size.
- ``Launcher``: one kernel, autotuned on a GPU, run with fixed tiles in the
  interpreter (autotuning there would only be slow).
- ``supports_call``: the registry predicate (B*H fits a grid axis).
- ``eager_call(x)``: whether a call may run the kind's ``autograd.Function``
  directly instead of its ``torch.library`` op (nothing traces).
- ``tf32_intermediate(dtype)``: float16 keeps an intermediate that feeds a
  second dot in float32 rounded to tf32 (``round_tf32``), not in float16.
- ``head_gemv(...)``: out[h, m] = sum_k vec[h, k] * mat[g, k, m] (+ bias[g, m])
  in float32 without tensor cores: folds ``pe`` through the linear parts
  (a pad token is 0 + pe[h, j], so pe's share is one constant per head).
- ``windows_or_dynamic(...)``: the output's window count for fake tensors.

Device side (``@triton.jit`` helpers, fla naming: ``i_`` program ids, ``o_``
offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values):

- ``search_sorted``: per-row binary search in an offsets array.
- ``window_rows``: for window ids, the token of window position 0 and the
  first token of the window's sequence (left-pad positions lie before it).
- ``chunk_rows``: the "chunk" rows every gather-style kernel tiles over: each
  sequence, left-padded, is cut into chunks of S tokens, so chunk q holds
  position j = c*S + r of window q - c (c = 0 .. C-1, C = ceil(L/S)).

Index arithmetic that multiplies a row by a stride is done in int64, so
tensors past 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._windows import compressed_cu_seqlens, num_windows

__all__ = [
    "DEVICES", "DTYPES", "INTERPRET", "Launcher", "SeqPlan", "cdiv",
    "SIZE_ARGS", "chunk_rows", "dot_f32", "eager_call", "empty", "empty_like", "head_gemv", "interpret_block",
    "fill_factor", "jit_kernel", "next_pow2",
    "num_sms",
    "round_tf32", "search_sorted", "seq_plan", "size_class", "small_tiles",
    "supports_call", "tf32_intermediate", "tile_configs", "total_windows_arg", "triton_available", "window_gemm",
    "window_rows",
    "windows_or_dynamic",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
DEVICES = ("cpu", "cuda") if INTERPRET else ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# computed once: dynamo traces a function returning a constant without a graph break
_AVAILABLE = INTERPRET or torch.cuda.is_available()

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
    ``unspecialized`` attribute names them."""
    names = tuple(n for n, p in inspect.signature(fn).parameters.items()
                  if n in SIZE_ARGS and "constexpr" not in str(p.annotation))
    kernel = triton.jit(fn, do_not_specialize=names)
    kernel.unspecialized = names
    return kernel


def triton_available() -> bool:
    """Whether Triton kernels can run here: a CUDA device, or the interpreter."""
    return _AVAILABLE


MAX_GRID_YZ = 65535   # CUDA's limit on grid axes 1 and 2; the kernels put B*H on axis 2


def supports_call(x: torch.Tensor, *args, **kwargs) -> bool:
    """The registry's per-call predicate: the kernels handle B*H <= 65535
    (backend="auto" falls back to torch beyond; backend="triton" raises)."""
    return x.shape[0] * x.shape[1] <= MAX_GRID_YZ


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


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to float32.

    Triton 3.9's interpreter returns garbage for bfloat16 ``tl.dot`` (errors
    ~1e10; tests/test_triton.py::test_interpreter_bf16_dot_defect watches
    it). A bfloat16 product is exact in float32, so upcasting computes the
    same value the GPU's native bfloat16 dot (float32 accumulation) does.
    """
    return INTERPRET and dtype == torch.bfloat16


_SMS: dict = {}


def num_sms(device: torch.device, cpu: int = 4) -> int:
    """Streaming multiprocessors of a CUDA ``device``, cached per device (the
    property query costs host time on every call); ``cpu`` on the CPU (the
    interpreter), where it only shapes how tests split work."""
    if device.type != "cuda":
        return cpu
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_call(x: torch.Tensor) -> bool:
    """Whether a call may skip the ``torch.library`` custom op and run the
    kind's ``autograd.Function`` directly (same kernels, same bits): x is a
    plain tensor and nothing traces (torch.compile, torch.export, make_fx,
    fake tensors all go through the op, which they see as one node). The
    op's dispatch costs tens of microseconds of host time per call.
    ``torch.compiler.is_compiling()`` comes first: dynamo folds it to True."""
    return not torch.compiler.is_compiling() and type(x) in _PLAIN and _get_current_dispatch_mode() is None


def tf32_intermediate(dtype: torch.dtype) -> bool:
    """Whether a kernel keeps an intermediate that feeds a second tensor-core
    dot (the MLP hidden layer, attention_pool's logit gradient) in float32
    rounded to tf32 (``round_tf32``) rather than in the input dtype.

    True for float16: its unit roundoff is tf32's (2**-11), but its range is
    not: an intermediate of size 2**-14 or less would be rounded into
    float16's subnormals, an absolute error of up to 2**-25 that the tolerance
    model (relative to the intermediate's magnitude) does not allow. tf32 has
    float32's exponent range, and a tf32 x float16 product is exact in
    float32, so the dot runs on tensor cores (input_precision="tf32") at the
    error the model grants the input dtype. bfloat16 shares float32's
    exponent range: its intermediates are stored as bfloat16.
    """
    return dtype == torch.float16


def poison_enabled() -> bool:
    return os.environ.get("KVCOMPRESS_POISON", "0") == "1"


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


# --------------------------------------------------------------------------- windowing plan


@dataclass(frozen=True)
class SeqPlan:
    """The windowing of one call, as kernel arguments.

    B, H, T, D: x's shape. L, S: block_size, stride. PRE: left-pad tokens per
    sequence (L - S for padding="left", else 0). C = ceil(L / S) chunks per
    window; C_PAD = next_pow2(C). varlen: cu_seqlens given.

    Fixed length (varlen False): every (b, h) row is one sequence of T
    tokens; W windows and NQ = ceil((PRE + T) / S) chunk rows per row.
    Packed (varlen True, B == 1): N sequences; W = total windows (the output
    size); NQ = an upper bound of the total chunk rows, from shapes only.
    cu (N+1,) token offsets (x's int dtype), ccu (N+1,) int64 window offsets,
    cq (N+1,) int64 chunk-row offsets; N_STEPS = ceil(log2 N) binary search
    steps. In fixed mode cu/ccu/cq are placeholders never read.
    """

    B: int
    H: int
    T: int
    D: int
    L: int
    S: int
    PRE: int
    C: int
    C_PAD: int
    varlen: bool
    N: int
    W: int
    NQ: int
    N_STEPS: int
    cu: torch.Tensor
    ccu: torch.Tensor
    cq: torch.Tensor

    def seq_args(self) -> tuple:
        """(cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE): the sequence arguments
        every kernel takes, in this order."""
        return (self.cu, self.ccu, self.cq, self.N, self.N_STEPS, self.T, self.W, self.NQ, self.L, self.S,
                self.PRE)


def seq_plan(x: torch.Tensor, *, block_size: int, stride: int, padding: str, cu_seqlens: torch.Tensor | None,
             total_windows: int = -1) -> SeqPlan:
    """The SeqPlan of x (B, H, T, D) for already-validated window arguments.

    total_windows: with cu_seqlens, the packed output size W if the caller
    knows it (int >= 0), else -1: then it is read from the device once (a
    host synchronisation; the fixed-length path never synchronises). When
    given, it is checked on the device (``torch._assert_async``), without a
    synchronisation.
    """
    B, H, T, D = x.shape
    L, S = block_size, stride
    PRE = L - S if padding == "left" else 0
    C = cdiv(L, S)
    if cu_seqlens is None:
        W = num_windows(T, L, S, padding)
        NQ = cdiv(PRE + T, S) if T > 0 else 0
        # placeholders: the IS_VARLEN=False branches never read them
        return SeqPlan(B, H, T, D, L, S, PRE, C, next_pow2(C), False, B, W, NQ, 0, x, x, x)
    N = cu_seqlens.shape[0] - 1
    cu64 = cu_seqlens.to(torch.int64)
    ccu = compressed_cu_seqlens(cu64, L, S, padding)                       # [N+1] window offsets
    lengths = cu64[1:] - cu64[:-1]                                         # [N]
    nq = torch.where(lengths > 0, torch.div(PRE + lengths + S - 1, S, rounding_mode="floor"),
                     torch.zeros_like(lengths))                            # [N] chunk rows per sequence
    cq = torch.cat([cu64.new_zeros(1), torch.cumsum(nq, 0)])               # [N+1]
    if total_windows is None or total_windows < 0:
        W = int(ccu[-1])                                                   # the one documented device read
    else:
        W = int(total_windows)
        torch._assert_async(ccu[-1] == W, "kvcompress: total_windows differs from compressed_cu_seqlens(...)[-1]")
    NQ = (T + N * (PRE + S - 1)) // S                                      # >= sum(nq), from shapes
    return SeqPlan(B, H, T, D, L, S, PRE, C, next_pow2(C), True, N, W, NQ, max(N - 1, 0).bit_length(),
                   cu_seqlens, ccu, cq)


def total_windows_arg(fn: str, total_windows, cu_seqlens) -> int:
    """Validate the optional ``total_windows`` of a packed call -> int (-1: unknown).

    Raises TypeError unless it is None or an int, ValueError if it is
    negative or given without cu_seqlens.
    """
    if total_windows is None:
        return -1
    if not isinstance(total_windows, int) or isinstance(total_windows, bool):
        raise TypeError(f"{fn}: total_windows must be None or an int, got {type(total_windows).__name__}")
    if cu_seqlens is None:
        raise ValueError(f"{fn}: total_windows is the packed output size and needs cu_seqlens")
    if total_windows < 0:
        raise ValueError(f"{fn}: total_windows must be >= 0, got {total_windows}")
    return total_windows


def windows_or_dynamic(x: torch.Tensor, cu_seqlens, block_size: int, stride: int, padding: str,
                       total_windows: int):
    """The output's window count for a fake (meta) implementation: known from
    shapes without cu_seqlens, from total_windows when given, else a new
    data-dependent size."""
    if cu_seqlens is None:
        T = x.shape[2]
        if padding == "valid":
            return (T - block_size) // stride + 1 if T >= block_size else 0
        return T // stride
    if total_windows >= 0:
        return total_windows
    return torch.library.get_ctx().new_dynamic_size()


# --------------------------------------------------------------------------- launching


_SMALL_TILES = False


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


def first_config(configs, prune, named):
    """The configurations to try in order without autotuning: those ``prune``
    keeps (all when it keeps none, as the autotuner does), first first."""
    kept = prune(configs, named) if prune is not None else list(configs)
    return list(kept) or list(configs[:1])


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
        self.interpret_meta = interpret_meta
        self.configs, self.prune = list(configs), prune
        self.tuned = None
        self._key_pos = [(kernel.arg_names.index(k), k) for k in key]
        self.best: dict[tuple, triton.Config] = {}   # tuning key -> the autotuner's pick
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
        if self.tuned is None:
            named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            meta = self.interpret_meta(named)
            self.kernel[grid({**named, **meta})](*args, **kwargs, **meta)
        elif AUTOTUNE:
            # Once a key is tuned, launch its pick directly: triton's Autotuner.run rebuilds its key
            # from every argument on each call, ~15-25 us of host time per launch (GPU run 11, cProfile)
            key = self.tuning_key(args, kwargs)
            cfg = self.best.get(key)
            if cfg is None:
                self.tuned[grid](*args, **kwargs)          # tunes this key (once), then launches its pick
                self.best[key] = self.tuned.best_config
            else:
                self.kernel[grid](*args, **kwargs, **cfg.all_kwargs())
        else:
            named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            tried = first_config(self.configs, self.prune, named)
            for i, cfg in enumerate(tried):
                try:
                    self.kernel[grid({**named, **cfg.kwargs})](*args, **kwargs, **cfg.kwargs,
                                                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    return
                except triton.runtime.errors.OutOfResources:   # as the autotuner skips it: the next one
                    if i == len(tried) - 1:
                        raise

    def tuning_key(self, args, kwargs) -> tuple:
        """The autotuner's key of a call: the values of the ``key`` arguments
        and the dtypes of the tensor arguments (as triton's Autotuner keys)."""
        vals = tuple(args[i] if i < len(args) else kwargs[name] for i, name in self._key_pos)
        return vals + tuple(a.dtype for a in args if isinstance(a, torch.Tensor)) \
            + tuple(v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------- device helpers


@triton.jit
def search_sorted(p_off, n, o, N_STEPS):
    """Per element of ``o``: the largest i in [0, n) with off[i] <= o, for
    non-decreasing off (n+1 entries) and off[0] <= o < off[n]. Repeated
    offsets (empty sequences) are skipped: the answer is a non-empty segment.
    Runs ceil(log2 n) steps; every load stays inside off."""
    lo = tl.zeros_like(o)
    hi = tl.zeros_like(o) + n
    for _ in range(N_STEPS):
        active = hi - lo > 1
        mid = (lo + hi) // 2
        v = tl.load(p_off + mid)
        up = active & (v <= o)
        lo = tl.where(up, mid, lo)
        hi = tl.where(active & ~up, mid, hi)
    return lo


@triton.jit
def window_rows(o_w, cu, ccu, N, N_STEPS, W, S, PRE, IS_VARLEN: tl.constexpr):
    """Windows ``o_w`` [BLOCK] (row ids in one (b, h) row, or packed ids) ->
    (t0, bos, m): t0 int64 token of window position 0 (t0 + j < bos is a
    left-pad token), bos int64 first token of the window's sequence, m
    whether the window exists. Window positions never reach past their
    sequence's end."""
    m = o_w < W
    if IS_VARLEN:
        o = tl.where(m, o_w, 0).to(tl.int64)
        i_n = search_sorted(ccu, N, o, N_STEPS)
        bos = tl.load(cu + i_n).to(tl.int64)
        t0 = bos - PRE + (o - tl.load(ccu + i_n)) * S
    else:
        bos = tl.zeros_like(o_w).to(tl.int64)
        t0 = o_w.to(tl.int64) * S - PRE
    return t0, bos, m


@triton.jit
def window_gemm(acc, p_rows, t0, bos, m_w, sxt, sxd, p_cols, swj, swd, m_cols, L, D,
                BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """The implicit GEMM of a tile of windows: acc + sum over window
    positions j < L and D blocks of X_j [BLOCK_W, BLOCK_D] @ B_j [BLOCK_D,
    BLOCK_N], in float32 (linear's forward; mlp's first layer).

    X_j's rows are the tokens t0 + j (``window_rows``) at ``p_rows`` (a
    scalar or [BLOCK_W, 1] pointer: one (b, h) row or one per window), left
    pad tokens (t < bos) and missing windows (~m_w) masked to 0. B_j's
    element (d, n) is at p_cols + j * swj + d * swd, ``p_cols`` a [1,
    BLOCK_N] pointer holding the column offsets, columns ~m_cols masked.
    Positions j and j + S read the same rows shifted by one window, so x
    comes from device memory about once, the re-read from L2."""
    o_d = tl.arange(0, BLOCK_D)
    ND = tl.cdiv(D, BLOCK_D)
    for it in range(0, L * ND):
        j = it // ND
        o_dd = (it - j * ND) * BLOCK_D + o_d                                              # [BLOCK_D]
        m_dd = o_dd < D
        t = t0 + j
        m_t = m_w & (t >= bos)
        b_x = tl.load(p_rows + t[:, None] * sxt + o_dd[None, :] * sxd, mask=m_t[:, None] & m_dd[None, :],
                      other=0.)                                                           # [BLOCK_W, BLOCK_D]
        b_b = tl.load(p_cols + j * swj + o_dd[:, None] * swd, mask=m_dd[:, None] & m_cols[None, :],
                      other=0.)                                                           # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            b_x, b_b = b_x.to(tl.float32), b_b.to(tl.float32)
        acc = tl.dot(b_x, b_b, acc, input_precision="ieee")
    return acc


@triton.jit
def chunk_rows(o_q, cu, ccu, cq, N, N_STEPS, T, W, NQ, S, PRE, IS_VARLEN: tl.constexpr):
    """Chunk rows ``o_q`` [BLOCK] -> (t_base, bos, eos, q, n_win, win_base, m).

    A sequence [bos, eos), preceded by PRE pad tokens, is cut into chunks of
    S tokens; chunk q starts at token t_base = bos - PRE + q*S (chunk q, phase
    r is token t_base + r, real if bos <= t < eos). Window i of the sequence
    is chunks i .. i+C-1, so chunk q holds position c*S + r of window q - c.
    The sequence has n_win windows; its window i is output row win_base + i.
    m: the row exists. All int64 except m.
    """
    if IS_VARLEN:
        m = o_q < tl.load(cq + N)
        o = tl.where(m, o_q, 0).to(tl.int64)
        i_n = search_sorted(cq, N, o, N_STEPS)
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        q = o - tl.load(cq + i_n)
        win_base = tl.load(ccu + i_n)
        n_win = tl.load(ccu + i_n + 1) - win_base
    else:
        m = o_q < NQ
        q = o_q.to(tl.int64)
        bos = tl.zeros_like(q)
        eos = bos + T
        win_base = bos
        n_win = bos + W
    t_base = bos - PRE + q * S
    return t_base, bos, eos, q, n_win, win_base, m


@triton.jit
def round_tf32(v):
    """float32 v rounded to tf32 (10 mantissa bits; to nearest, ties away from
    zero), kept as float32: the same value on a GPU and in the interpreter,
    and exact when a tensor core converts it to tf32. inf stays inf, NaN
    stays NaN (the bit trick alone would turn 0x7FFFFFFF, CUDA's NaN, into
    -0.0 by overflow; hence the where), the largest finite floats round to inf."""
    u = v.to(tl.uint32, bitcast=True)
    r = ((u + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(v == v, r, v)


# --------------------------------------------------------------------------- pe folding


@jit_kernel
def head_gemv_kernel(vec, mat, bias, out, K, K2, M, M2, HG_V, HG_M, HG_B, DIV,
                     s_vh, s_vk1, s_vk2, s_mg, s_mk1, s_mk2, s_mm1, s_mm2, s_bg, s_bm,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[h, m] = (sum_k vec[h // HG_V, k] * mat[h // HG_M, k, m]) / DIV
    + bias[h // HG_B, m], float32, plain multiply-adds (no tf32). k and m
    are two-level indices (k // K2, k % K2) so e.g. (j, d) of a (G, L, D, D_out)
    weight is one index without needing mergeable strides."""
    i_h, i_m = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    p_m = mat + (i_h // HG_M).to(tl.int64) * s_mg + (o_m // M2) * s_mm1 + (o_m % M2) * s_mm2     # [BLOCK_M]
    p_v = vec + (i_h // HG_V).to(tl.int64) * s_vh
    b_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_v = tl.load(p_v + (o_k // K2) * s_vk1 + (o_k % K2) * s_vk2, mask=m_k, other=0.).to(tl.float32)
        b_mat = tl.load(p_m[None, :] + ((o_k // K2) * s_mk1 + (o_k % K2) * s_mk2)[:, None],
                        mask=m_k[:, None] & m_m[None, :], other=0.).to(tl.float32)            # [BLOCK_K, BLOCK_M]
        b_acc += tl.sum(tl.where(m_k[:, None], b_v[:, None] * b_mat, 0.), axis=0)
    b_acc = b_acc / DIV
    if HAS_BIAS:
        b_acc += tl.load(bias + (i_h // HG_B).to(tl.int64) * s_bg + o_m * s_bm, mask=m_m, other=0.).to(tl.float32)
    tl.store(out + i_h.to(tl.int64) * M + o_m, b_acc, mask=m_m)


def head_gemv(H: int, vec: torch.Tensor, vec_strides, hg_v: int, mat: torch.Tensor, mat_strides, hg_m: int,
              K: int, K2: int, M: int, M2: int, *, bias: torch.Tensor | None = None, bias_strides=(0, 0),
              hg_b: int = 1, div: float = 1.0) -> torch.Tensor:
    """Per-head constants (H, M) float32 (docs/triton.md, "pe").

    out[h, m] = (sum_k vec[h // hg_v, k] * mat[h // hg_m, k, m]) / div
    + bias[h // hg_b, m]. Indices k, m are split as (k // K2, k % K2) and
    (m // M2, m % M2); vec_strides = (per head, k1, k2), mat_strides = (per
    group, k1, k2, m1, m2), bias_strides = (per group, m). Deterministic.
    """
    out = empty((H, M), dtype=torch.float32, device=mat.device)
    if H == 0 or M == 0:
        return out
    if INTERPRET:
        BLOCK_M, BLOCK_K = min(128, max(16, next_pow2(M))), 16
    else:
        # mat is read once, so this is a copy of mat's bytes: about four programs per SM keep enough
        # loads in flight (one program per SM, BLOCK_M = 128, read mlp's (4096, 4096) w1 at ~1 TB/s,
        # 130 us, GPU run 11); a tile of at most 8192 elements
        BLOCK_M = min(128, max(16, next_pow2(cdiv(H * M, 4 * num_sms(mat.device)))))
        BLOCK_K = max(16, min(256, 8192 // BLOCK_M))
    head_gemv_kernel[(H, cdiv(M, BLOCK_M))](
        vec, mat, bias if bias is not None else mat, out, K, max(K2, 1), M, max(M2, 1), hg_v, hg_m, hg_b, div,
        *vec_strides, *mat_strides, *bias_strides, HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M)
    return out

