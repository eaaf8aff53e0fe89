"""Every kind x registered backend x configuration, beside its peers
(benchmarks/configs.py: what; benchmarks/entrants.py: who;
benchmarks/checks.py: the correctness gate; benchmarks/timing.py: how).

One test per (configuration, entrant). It asserts that the entrant's
output (and in fwd+bwd its gradients of x, pe and every parameter) are
within the tolerance model on the first and last windows of the timed
call itself, then times it. With ``--benchmark-disable`` (CI) it stops
after one more call: correctness only.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import pytest
import torch

try:
    from kvcompress.ops._triton.launch import picks_since, tuned_keys
except ImportError:             # without triton: no autotuner, no picks
    def tuned_keys():
        return []

    def picks_since(keys):
        return {}

from .configs import cost
from .entrants import NotApplicable, call_loop
from .timing import measure, peak_extra_bytes, synchronize


def test_compress(benchmark, kvbench, bench_item):
    cfg, entrant = bench_item
    reason = kvbench.skip_reason(entrant) or entrant.skip_reason(cfg)
    if reason:
        pytest.skip(reason)
    benchmark.group = cfg.group
    case, grad = cfg.case, cfg.direction == "fwd+bwd"
    who = f"{entrant.name} ({entrant.label(cfg)})"
    sets = kvbench.sets(cfg)
    tuned_before = tuned_keys()       # before prepare, which may call the kernel
    try:
        prepared = entrant.prepare(cfg, sets, grad)
    except NotApplicable as e:
        pytest.skip(str(e))

    # The gate: the first call, on the timing arguments, is checked; a wrong
    # result fails here and is never timed. Its device time (compile and
    # autotuning included) is kept apart from the checker's NumPy time.
    t0 = time.perf_counter()
    with nullcontext() if grad else torch.no_grad():
        y = prepared.forward(0)
    synchronize(cfg.device)
    first_call = time.perf_counter() - t0
    precision = kvbench.checker.gate_class(case, sets, entrant.precision(cfg), grad)
    ratio = kvbench.checker.forward(case, sets, y, who, precision)
    grad_ratio = None
    if grad and not (isinstance(y, torch.Tensor) and y.requires_grad):
        pytest.skip(f"{entrant.name}: its output does not require grad (no backward): fwd+bwd not measured")
    if grad:
        parts = kvbench.checker.grad_parts(case)
        grad_ratio = 0.0
        for i, part in enumerate(parts):     # the first windows' backward, then the last windows'
            g = kvbench.checker.cotangent(case, sets, part)
            t0 = time.perf_counter()
            grads = torch.autograd.grad(y, prepared.leaves[0], g, retain_graph=i + 1 < len(parts))
            synchronize(cfg.device)
            if i == 0:                       # the first backward's compile and autotuning
                first_call += time.perf_counter() - t0
            grad_ratio = max(grad_ratio, kvbench.checker.gradients(case, sets, prepared.to_ours(list(grads)), who,
                                                                   part, precision))
            del grads
    del y
    if entrant.compiled:
        kvbench.compile_spent += first_call
    autotuned = picks_since(tuned_before)     # the configurations the autotuner picked in this gate, if any

    call = call_loop(prepared, sets, grad)
    info = {}
    if entrant.compiled and hasattr(torch.compiler, "set_stance"):
        # one compile per shape: a recompile while timing is an error, not a silent fallback
        torch.compiler.set_stance("fail_on_recompile")
    try:
        info = measure(benchmark, call, device=cfg.device, case_time=kvbench.case_time,
                       round_time=kvbench.round_time, min_rounds=kvbench.min_rounds)
    finally:
        if entrant.compiled and hasattr(torch.compiler, "set_stance"):
            torch.compiler.set_stance("default")

    flops, nbytes = cost(case, cfg.direction, sets.itemsize)
    extra = dict(cfg.info(), entrant=entrant.name, family=entrant.family, label=entrant.label(cfg),
                 flops=flops, bytes=nbytes, n_sets=prepared.n_sets, first_call_s=first_call,
                 check_worst_error_over_bound=ratio, check_worst_gradient_error_over_bound=grad_ratio,
                 check_precision=precision, precision_class=entrant.precision(cfg), autotuned=autotuned, **info)
    if benchmark.enabled:
        with nullcontext() if grad else torch.no_grad():
            extra["peak_extra_bytes"] = peak_extra_bytes(call, cfg.device)
        ceil = kvbench.ceilings()
        median = benchmark.stats.stats.median
        extra.update(median_s=median, tflops=flops / median / 1e12, gbps=nbytes / median / 1e9,
                     ceiling_gbps=ceil["bandwidth_gbps"], ceiling_tflops=ceil["matmul_tflops"])
        roof = max(flops / (ceil["matmul_tflops"] * 1e12), nbytes / (ceil["bandwidth_gbps"] * 1e9))
        extra["roofline_fraction"] = roof / median
        assert median > 0, f"{who}: a median time of {median} s cannot be right"
    benchmark.extra_info.update(extra)
