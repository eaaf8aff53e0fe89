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
- ``pool_fwd`` / ``pool_bwd``: the kernel bodies of mean_pool and
  weighted_pool (they differ only in their weights).

Index arithmetic that multiplies a row by a stride is done in int64, so
tensors past 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._windows import compressed_cu_seqlens, num_windows

__all__ = [
    "DEVICES", "DTYPES", "INTERPRET", "POOL_BWD_CONFIGS", "POOL_FWD_CONFIGS", "Launcher", "SeqPlan", "cdiv",
    "chunk_rows", "dot_f32", "eager_call", "empty", "empty_like", "head_gemv", "interpret_block", "next_pow2",
    "num_sms",
    "pool_backward", "pool_bwd", "pool_forward", "pool_fwd", "round_tf32", "search_sorted", "seq_plan", "small_tiles",
    "supports_call", "tf32_intermediate", "tile_configs", "total_windows_arg", "triton_available", "window_gemm",
    "window_rows",
    "windows_or_dynamic",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
DEVICES = ("cpu", "cuda") if INTERPRET else ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# computed once: dynamo traces a function returning a constant without a graph break
_AVAILABLE = INTERPRET or torch.cuda.is_available()


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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
            self.tuned[grid](*args, **kwargs)
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


@triton.jit
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
    BLOCK_M = min(128, max(16, next_pow2(M)))
    BLOCK_K = 16 if INTERPRET else 64
    head_gemv_kernel[(H, cdiv(M, BLOCK_M))](
        vec, mat, bias if bias is not None else mat, out, K, max(K2, 1), M, max(M2, 1), hg_v, hg_m, hg_b, div,
        *vec_strides, *mat_strides, *bias_strides, HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M)
    return out


# --------------------------------------------------------------------------- pooling bodies


@triton.jit
def pool_fwd(x, wt, cst, y, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
             sxb, sxh, sxt, sxd, syb, syh, syw, syd, swg, swl, H, HG, D, C,
             C_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
             UNIT: tl.constexpr, HAS_CONST: tl.constexpr, STAGES: tl.constexpr):
    """y[w] = sum_j a_j X_w[j] (+ cst[h]) for a tile of windows; a_j = 1/L
    (UNIT, mean_pool) or wt[g, j]. Grid (tiles, D blocks, B*H).

    The tile's chunk rows are loaded once, phase by phase: chunk q, phase r
    (token t_base + r) is position c*S + r of window q - c, so
    acc[c, q] += a_{c*S+r} * x[t] for c < C; then y[q] = sum_c acc[c, q + c]
    (a shift by c rows: tl.gather). A tile of BLOCK_K rows completes its first
    BLOCK_K - C + 1 windows; neighbouring tiles overlap by C - 1 chunks.
    """
    i_t, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    BW = BLOCK_K - C + 1                                   # windows completed per tile
    o_k = tl.arange(0, BLOCK_K)
    o_c = tl.arange(0, C_PAD)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BW + o_k, cu, ccu, cq, N, N_STEPS, T, W, NQ,
                                                           S, PRE, IS_VARLEN)
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh + o_d[None, :].to(tl.int64) * sxd   # [1, BLOCK_D]
    b_acc = tl.zeros([C_PAD, BLOCK_K, BLOCK_D], dtype=tl.float32)
    # STAGES > 1 software-pipelines the phase loads (more bytes in flight; an autotuning choice)
    for r in tl.range(0, S, num_stages=STAGES):
        t = t_base + r                                                                # [BLOCK_K]
        m_t = m_q & (t >= bos) & (t < eos)
        b_x = tl.load(p_x + t[:, None] * sxt, mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
        o_j = o_c * S + r                                                             # [C_PAD] window position
        m_j = (o_c < C) & (o_j < L)
        if UNIT:
            b_a = tl.where(m_j, 1.0, 0.0)
        else:
            b_a = tl.load(wt + i_g.to(tl.int64) * swg + o_j * swl, mask=m_j, other=0.).to(tl.float32)
        # where, not a zero weight: 0 * NaN would leak a NaN into a window that lacks the token
        b_acc += tl.where(m_j[:, None, None], b_a[:, None, None] * b_x[None, :, :], 0.)  # [C_PAD, BLOCK_K, BLOCK_D]
    o_src = o_c[:, None, None] * BLOCK_K + tl.minimum(o_k[None, :, None] + o_c[:, None, None], BLOCK_K - 1) \
        + 0 * o_d[None, None, :]                                                      # [C_PAD, BLOCK_K, BLOCK_D]
    b_sh = tl.gather(tl.reshape(b_acc, (C_PAD * BLOCK_K, BLOCK_D)), tl.reshape(o_src, (C_PAD * BLOCK_K, BLOCK_D)), 0)
    b_y = tl.sum(tl.reshape(b_sh, (C_PAD, BLOCK_K, BLOCK_D)), axis=0)                 # [BLOCK_K, BLOCK_D]
    if UNIT:
        b_y = b_y / L
    if HAS_CONST:
        b_y += tl.load(cst + i_h.to(tl.int64) * D + o_d, mask=m_d, other=0.)[None, :]
    m_y = m_q & (o_k < BW) & (q < n_win)
    p_y = y + i_b.to(tl.int64) * syb + i_h.to(tl.int64) * syh + (win_base + q)[:, None] * syw \
        + o_d[None, :].to(tl.int64) * syd
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_y[:, None] & m_d[None, :])


@triton.jit
def pool_bwd(dy, x, wt, dx, pw, cu, ccu, cq, N, N_STEPS, T, W, NQ, L, S, PRE,
             sdb, sdh, sdw, sdd, sxb, sxh, sxt, sxd, sgb, sgh, sgt, sgd, swg, swl, H, HG, D, C,
             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, UNIT: tl.constexpr,
             NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, STAGES: tl.constexpr):
    """The x-gradient by gathering, and per-program partial weight gradients.

    Token t = chunk q, phase r is position j = c*S + r of window q - c, so
    dx[t] = sum_c a_j dy[q - c] over the windows that exist: no atomics, each
    token written once (zero when no window holds it). With NEED_DW, the
    program also writes pw[program, j] = sum over its rows of dy[q - c] . x[t]
    (the partial dL/da_j, reduced over programs by torch: deterministic).
    Grid (row tiles, D blocks, B*H); a tile owns BLOCK_K chunk rows.
    """
    i_t, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // HG
    o_k = tl.arange(0, BLOCK_K)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    t_base, bos, eos, q, n_win, win_base, m_q = chunk_rows(i_t * BLOCK_K + o_k, cu, ccu, cq, N, N_STEPS, T, W, NQ,
                                                           S, PRE, IS_VARLEN)
    p_dy = dy + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + o_d[None, :].to(tl.int64) * sdd
    p_x = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh + o_d[None, :].to(tl.int64) * sxd
    p_dx = dx + i_b.to(tl.int64) * sgb + i_h.to(tl.int64) * sgh + o_d[None, :].to(tl.int64) * sgd
    # partial gradients of this program: pw[((i_bh * tiles + i_t) * d_blocks + i_d) * L + j]
    p_pw = pw + ((i_bh.to(tl.int64) * tl.num_programs(0) + i_t) * tl.num_programs(1) + i_d) * L
    for r in tl.range(0, S, num_stages=STAGES):
        t = t_base + r                                                                # [BLOCK_K]
        m_t = m_q & (t >= bos) & (t < eos)
        if NEED_DW:
            b_x = tl.load(p_x + t[:, None] * sxt, mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_dx = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        # phase r is position c*S + r < L of the window c chunks back: cdiv(L - r, S) of them
        for c in range(0, tl.cdiv(L - r, S)):
            j = c * S + r
            q_w = q - c                                                               # window holding t at j
            m_w = m_q & (q_w >= 0) & (q_w < n_win)
            b_dy = tl.load(p_dy + (win_base + q_w)[:, None] * sdw, mask=m_w[:, None] & m_d[None, :],
                           other=0.).to(tl.float32)                                   # [BLOCK_K, BLOCK_D]
            if UNIT:
                b_dx += b_dy
            else:
                b_dx += tl.load(wt + i_g.to(tl.int64) * swg + j * swl).to(tl.float32) * b_dy
            if NEED_DW:
                tl.store(p_pw + j, tl.sum(tl.sum(tl.where(m_w[:, None], b_dy * b_x, 0.), axis=1), axis=0))
        if NEED_DX:
            if UNIT:
                b_dx = b_dx / L
            tl.store(p_dx + t[:, None] * sgt, b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


# --------------------------------------------------------------------------- pooling hosts


def _pool_fwd_prune(configs, kw):
    """Tiles whose C_PAD partial sums fit 16384 float32 registers per program
    and complete at least half their rows (BLOCK_K >= 2 C_PAD); when C is so
    large (S << L) that none does, one tile built to fit."""
    C_PAD, D = kw["C_PAD"], kw["D"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] >= 2 * C_PAD
            and C_PAD * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_D"] <= 16384
            and c.kwargs["BLOCK_D"] <= max(32, next_pow2(D))]
    if not kept:
        rows = 2 * C_PAD
        kept = [triton.Config({"BLOCK_K": rows, "BLOCK_D": max(8, next_pow2(16384 // (C_PAD * rows) + 1) // 2),
                               "STAGES": 1}, num_warps=4)]
    return kept


POOL_FWD_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd, "STAGES": st}, num_warps=nw)
                    for bk, bd, nw, st in [(64, 64, 4, 1), (64, 64, 4, 3), (64, 128, 8, 1), (32, 128, 4, 3),
                                           (128, 64, 8, 1), (32, 64, 4, 1), (16, 64, 4, 1), (16, 32, 4, 1)]]
POOL_FWD_KEY = ["D", "C_PAD", "IS_VARLEN", "HAS_CONST"]


POOL_BWD_CONFIGS = [triton.Config({"STAGES": st}, num_warps=nw) for nw, st in ((4, 1), (8, 1), (4, 2), (8, 2))]
POOL_BWD_KEY = ["D", "IS_VARLEN", "NEED_DX", "NEED_DW"]


def pool_fwd_interpret_meta(kw):
    rows = max(8, 2 * kw["C_PAD"])
    return {"BLOCK_K": rows if _SMALL_TILES else max(rows, 32), "BLOCK_D": interpret_block(kw["D"], 64),
            "STAGES": 1}


def pool_bwd_interpret_meta(kw):
    return {"STAGES": 1}


def pool_fwd_grid(plan: SeqPlan):
    """Fixed length: tiles over each row's W windows; packed: over the bound
    of all chunk rows (rows that start no window store nothing)."""
    rows = plan.NQ if plan.varlen else plan.W

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_K"] - plan.C + 1), cdiv(plan.D, meta["BLOCK_D"]), plan.B * plan.H)
    return grid


def pool_bwd_blocks(plan: SeqPlan, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) of the pooling backward: fixed on the host, because the
    partial weight gradients are laid out by program. float32 gets half the
    feature block (128 spills registers on sm_90 with 4 warps)."""
    if INTERPRET:
        return interpret_block(plan.NQ, 32), interpret_block(plan.D, 64)
    return 64, min(64 if dtype == torch.float32 else 128, max(32, next_pow2(plan.D)))


def pool_forward(launcher: Launcher, x: torch.Tensor, weight: torch.Tensor | None, pe: torch.Tensor | None,
                 plan: SeqPlan) -> torch.Tensor:
    """Run a pooling forward kernel (mean_pool if weight is None) for ``plan``."""
    B, H, T, D = x.shape
    y = empty((B, H, plan.W, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    G = 1 if weight is None else weight.shape[0]
    cst = None
    if pe is not None:
        if weight is None:  # mean_j pe[h, j, :]
            one = torch.ones(1, dtype=torch.float32, device=x.device)
            cst = head_gemv(H, one, (0, 0, 0), H, pe, (pe.stride(0), 0, pe.stride(1), 0, pe.stride(2)), 1,
                            plan.L, plan.L, D, D, div=float(plan.L))
        else:               # sum_j wt[g, j] pe[h, j, :]
            cst = head_gemv(H, weight, (weight.stride(0), 0, weight.stride(1)), H // G,
                            pe, (pe.stride(0), 0, pe.stride(1), 0, pe.stride(2)), 1, plan.L, plan.L, D, D)
    wt = weight if weight is not None else x
    launcher(pool_fwd_grid(plan), x, wt, cst if cst is not None else x, y, *plan.seq_args(),
             *x.stride(), *y.stride(), *(weight.stride() if weight is not None else (0, 0)),
             H, H // G, D, plan.C, C_PAD=plan.C_PAD, IS_VARLEN=plan.varlen, HAS_CONST=cst is not None)
    return y


def pool_backward(launcher: Launcher, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                  pe: torch.Tensor | None, plan: SeqPlan, need_x: bool, need_w: bool, need_pe: bool):
    """Gradients (dx, dweight, dpe) of a pooling kind; empty (0,) tensors for
    the ones not needed. weight None: mean_pool."""
    B, H, T, D = x.shape
    L = plan.L
    G = 1 if weight is None else weight.shape[0]
    HG = H // G
    # a gradient not asked for is a fresh empty tensor (custom op outputs may not alias)
    dx = empty_like(x) if need_x else x.new_empty(0)
    dw = x.new_empty(0)
    colsum = None
    if need_pe or (need_w and pe is not None):
        colsum = dy.sum(dim=(0, 2), dtype=torch.float32)                            # [H, D]
    BK, BD = pool_bwd_blocks(plan, x.dtype)
    tiles, dblocks = cdiv(plan.NQ, BK), cdiv(D, BD)
    run = (need_x or need_w) and B * H * T * D > 0
    pw = empty((B * H * tiles * dblocks * L,), dtype=torch.float32, device=x.device) if need_w and run else x
    if run:
        wt = weight if weight is not None else x
        launcher(lambda meta: (tiles, dblocks, B * H), dy, x, wt, dx if need_x else x, pw, *plan.seq_args(),
                 *dy.stride(), *x.stride(), *(dx.stride() if need_x else x.stride()),
                 *(weight.stride() if weight is not None else (0, 0)), H, HG, D, plan.C,
                 BLOCK_K=BK, BLOCK_D=BD, IS_VARLEN=plan.varlen, NEED_DX=need_x, NEED_DW=need_w)
    if need_w:
        if run:
            g = pw.view(B, G, HG, tiles * dblocks, L).sum(dim=(0, 2, 3))            # [G, L]
        else:
            g = torch.zeros((G, L), dtype=torch.float32, device=x.device)
        if pe is not None:   # d/dwt[g, j] of sum_w dy_w . pe[h, j] = colsum[h] . pe[h, j]
            g = g + (colsum[:, None, :] * pe.float()).sum(-1).view(G, HG, L).sum(1)
        dw = g.to(x.dtype)
    dpe = x.new_empty(0)
    if need_pe:
        if weight is None:
            dpe = (colsum / L)[:, None, :].expand(H, L, D).to(x.dtype).contiguous()
        else:                # dpe[h, j, :] = wt[g, j] colsum[h, :]
            wh = weight.float().repeat_interleave(HG, dim=0)                         # [H, L]
            dpe = (wh[:, :, None] * colsum[:, None, :]).to(x.dtype)
    return dx, dw, dpe
