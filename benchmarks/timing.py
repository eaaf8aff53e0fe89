"""How a call is timed (docs/benchmarks.md, "Timing"), the measured
ceilings, and peak memory.

On CUDA, work is asynchronous: a host clock read after a launch sees the
launch, not the kernel. pytest-benchmark times a *round* (``iterations``
back-to-back calls) between two reads of its timer; ``benchmarks/conftest.py``
makes that timer ``cuda_synchronized_perf_counter`` (synchronize, then
``time.perf_counter()``) on CUDA, so a round spans exactly its calls' device
work, and enough iterations per round (about ``round_time`` seconds) make
the cost of the two synchronisations negligible. Each call reads a
different argument set (rotating buffers, together at least twice the
last-level cache), so no call finds its inputs in cache. pytest-benchmark
reports the per-call time of every round; we use the median over rounds.
"""

from __future__ import annotations

import glob
import math
import statistics
import time
from collections.abc import Callable

import torch


def cuda_synchronized_perf_counter() -> float:
    """pytest-benchmark timer for CUDA: wait for all queued device work, then
    read the host clock (seconds)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def now(device: str) -> float:
    """The host clock after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def cache_bytes(device: str) -> int:
    """Size of the cache that a rotation of inputs must defeat: the GPU's L2;
    on a CPU its largest cache level, at most 64 MiB (a server's shared L3
    of hundreds of MiB cannot be flushed by rotation at a sensible cost:
    CPU timings see a warm L3), 32 MiB if unknown."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20))
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        n = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = max(best, n)
    return min(best, 64 << 20) if best else 32 << 20


def rotation_sets(set_bytes: int, device: str, *, max_sets: int = 16) -> int:
    """How many argument sets to rotate through: enough that the sets
    together are at least twice the last-level cache, so every call reads
    its inputs from memory (at most ``max_sets``)."""
    return max(1, min(max_sets, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))))


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated on the device during one call of ``fn`` above what was
    allocated before it (outputs and gradients included); None on CPU,
    where torch keeps no allocator statistics."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def _median_call(fn: Callable[[], object], device: str, *, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return statistics.median(times)


def measure(benchmark, fn: Callable[[], object], *, device: str, case_time: float, round_time: float,
            min_rounds: int) -> dict:
    """Time ``fn`` (one call, rotating its own inputs) with pytest-benchmark.

    Warm-up: one call (the entrant's first call, which may compile or
    autotune, has already run in the correctness gate). Calibration: the median of up to three more calls
    gives t; a round is ceil(round_time / t) calls and there are
    max(min_rounds, case_time / round) rounds (at most 1000).
    ``benchmark.pedantic`` then runs them with the session's timer.
    With ``--benchmark-disable`` fn runs once, untimed. Returns what was
    done, for ``benchmark.extra_info``.
    """
    if not benchmark.enabled:
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return {}
    fn()
    t = _median_call(fn, device, calls=1)
    if t * min_rounds < case_time:          # cheap enough to calibrate on more than one call
        t = min(t, _median_call(fn, device, calls=3))
    iterations = max(1, min(10_000, math.ceil(round_time / max(t, 1e-9))))
    rounds = max(min_rounds, min(1000, int(case_time / max(iterations * t, 1e-9))))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    return {"calibration_s": t, "iterations": iterations, "rounds": rounds}


def _time_op(fn: Callable[[], object], device: str, *, reps: int) -> float:
    fn()
    fn()
    synchronize(device)
    return _median_call(fn, device, calls=reps)


def _time_copy(nbytes: int, device: str, timer) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def _time_matmul(n: int, dtype: torch.dtype, device: str, timer) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return timer(lambda: a @ b)


def measure_ceilings(device: str, dtype: torch.dtype, *, quick: bool = False,
                     timer: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """The machine's attainable bandwidth and matmul throughput, measured now.

    Bandwidth: a device-to-device copy of 1 GiB (CUDA) or 256 MiB (CPU),
    counting bytes read + written. Matmul: n x n @ n x n in ``dtype`` (n =
    8192 on CUDA, 2048 on CPU), 2 n^3 flops. ``quick`` (keyword-only,
    default False): 256 MiB and n = 4096 on CUDA, 1 MiB and n = 128 on CPU
    (a smoke run). ``timer``: fn -> seconds of one call of fn (default:
    the median of several synchronised calls; the GPU scripts pass
    triton's do_bench). Also the ceilings of scripts/gpu_check.py and
    scripts/gpu_perf.py.
    """
    if device == "cuda":
        nbytes, n = ((1 << 28), 4096) if quick else ((1 << 30), 8192)
    else:
        nbytes, n = ((1 << 20), 128) if quick else ((256 << 20), 2048)
    t_copy = _time_copy(nbytes, device, timer or (lambda fn: _time_op(fn, device, reps=10)))
    t_mm = _time_matmul(n, dtype, device, timer or (lambda fn: _time_op(fn, device, reps=10 if device == "cuda"
                                                                        else 3)))
    return {
        "bandwidth_gbps": 2 * nbytes / t_copy / 1e9,
        "matmul_tflops": 2 * n ** 3 / t_mm / 1e12,
        "copy_bytes": nbytes,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }
