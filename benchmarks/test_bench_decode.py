"""One decoding step of N streams (issue 15): ``kvcompress.decode.decode_step``
for every registered backend, eager and replayed from a CUDA graph, beside
recompressing the prefixes and beside ``kvcompress.streaming``
(benchmarks/configs.py: ``decode_sets``; benchmarks/entrants.py:
``decode_entrants``; docs/benchmarks.md, "Decoding").

Every stream holds a prefix of P - 1 tokens, handed over with
``DecodeCache.add``, and receives one token per step; token P - 1 completes
the last window of the full pass over P tokens for every stream.

One test per (configuration, entrant). The gate comes first: the entrant's
first call is the step that delivers token P - 1 (for ``recompress``, the
full pass over the N prefixes), and what it emits must be within the
tolerance model of the exact last window of every stream (benchmarks/checks.py;
the recompression: its first and last windows, as the compression
benchmarks check them); a backend that promises batch invariance must
also match its own full pass bit for bit; every stream must emit; the
replayed step must equal the eager step on a twin cache bit for bit. Then
the entrant is timed (benchmarks/timing.py: rounds of back-to-back calls,
the device synchronised only at the ends of a round); ``steps`` steps per
call, so the report gives us/step. With ``--benchmark-disable`` (CI) it stops
after one more call: correctness only.
"""

from __future__ import annotations

import time

import pytest
import torch

from .checks import CheckFailed
from .configs import decode_sets
from .entrants import NotApplicable, decode_entrants
from .timing import measure, synchronize


def pytest_generate_tests(metafunc):
    if "decode_item" not in metafunc.fixturenames:
        return
    bench = metafunc.config._kvbench
    items = [(cfg, e) for cfg in decode_sets(bench.device, bench.dtype, bench.sizes, bench.kinds)
             for e in decode_entrants(cfg)]
    metafunc.parametrize("decode_item", items, ids=[f"{cfg.id}-{e.name}" for cfg, e in items])


def test_decode(benchmark, kvbench, decode_item):
    cfg, entrant = decode_item
    reason = kvbench.skip_reason(entrant, start=kvbench.started("decode")) or entrant.skip_reason(cfg)
    if reason:
        pytest.skip(reason)
    benchmark.group = cfg.group
    case = cfg.case
    who = f"{entrant.name} ({entrant.label(cfg)})"
    sets = kvbench.sets(cfg)
    prepared = None
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            try:
                prepared = entrant.prepare(cfg, sets)
            except NotApplicable as e:
                pytest.skip(str(e))
            synchronize(cfg.device)
            prepare_s = time.perf_counter() - t0

            # the gate: the first call, the step that completes a window of every stream
            t0 = time.perf_counter()
            y, emitted = prepared.first()
            synchronize(cfg.device)
            first_call = time.perf_counter() - t0
            bit_exact = None
            precision = kvbench.checker.gate_class(case, sets, entrant.precision(cfg), grad=False,
                                                   last=entrant.output != "windows")
            if entrant.output == "windows":
                ratio = kvbench.checker.forward(case, sets, y, who, precision)
            else:
                if emitted is not None and not bool(emitted.all()):
                    raise CheckFailed(f"{who}: token P - 1 = {case.T - 1} completes a window of every stream, but "
                                      f"{int((~emitted).sum())} of {case.B} streams emitted none; not timed")
                ratio = kvbench.checker.last_window(case, sets, y, who, precision)
                if getattr(entrant, "bit_exact", None) is not None and entrant.bit_exact(cfg):
                    kvbench.checker.same_bits(case, sets, y, entrant.backend, who)
                    bit_exact = True
            del y, emitted
            extra = dict(cfg.info(), entrant=entrant.name, family=entrant.family, label=entrant.label(cfg),
                         steps=prepared.steps, prepare_s=prepare_s, first_call_s=first_call,
                         check_worst_error_over_bound=ratio, check_precision=precision,
                         precision_class=entrant.precision(cfg), bit_exact=bit_exact)
            if prepared.probe is not None:
                extra.update(prepared.probe())
            extra.update(prepared.info)

            extra.update(measure(benchmark, prepared.call, device=cfg.device, case_time=kvbench.case_time,
                                 round_time=kvbench.round_time, min_rounds=kvbench.min_rounds))
    finally:
        if prepared is not None:
            prepared.close()
    if benchmark.enabled:
        median = benchmark.stats.stats.median
        extra.update(median_s=median, us_per_step=median / prepared.steps * 1e6)
        assert median > 0, f"{who}: a median time of {median} s cannot be right"
    benchmark.extra_info.update(extra)
