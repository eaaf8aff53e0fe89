#!/usr/bin/env bash
# One lease of the lent GPU (see docs/triton.md "GPU runs"): install the
# test-only wheels carried in .whl/, then run the named phases, each under a
# time limit, logging to $OUT. Usage: bash scripts/gpu_session.sh PHASE[:SECONDS]...
# (SECONDS overrides the phase's time limit)
#   info      nvidia-smi, versions
#   check     scripts/gpu_check.py (correctness + timing of the Triton kernels)
#   checkap   scripts/gpu_check.py correctness of attention_pool only (D = 192, 64, packed)
#   timing    scripts/gpu_check.py timing only, every kind, the NSA shape
#   timingsizes  the same at T = 8192 and 65536, B = 4, and D = 192
#   suitetriton  the property suite (ci profile) for the Triton backend on CUDA, untuned launches
#             (KVCOMPRESS_TRITON_AUTOTUNE=0: autotuning every drawn shape cost ~35 s a property, run 4)
#   quick     scripts/gpu_check.py --quick
#   configs   tests/test_every_config.py (every configuration each autotuned launcher's prune keeps, against the
#             reference, each compiled) and tests/test_gated_pool_kernels.py, on XDIST workers
#   gputests  pytest -m gpu tests/test_direct_launch.py tests/test_triton.py
#   suite     the property suite on CUDA (every backend, ci profile)
#   thorough  the property suite on the Triton backend, thorough profile, under pytest-xdist: JOBS (16)
#             workers, one GPU each by turns (kvcompress/testing/_xdist.py: worker gwN gets the N-th visible
#             GPU modulo their count, so JOBS=64 on a host of 4 GPUs gives each 16); a test fails at
#             TEST_TIMEOUT seconds (default: the phase's limit - 90) and none starts after SESSION_TIMEOUT
#             (default: limit - 30 - TEST_TIMEOUT, 60 s), so the session ends by itself, with its summary,
#             junit.xml and report.json in $OUT/thorough, before the phase's SIGINT (give JOBS >= the number
#             of selected tests, or a longer SESSION_TIMEOUT and shorter TEST_TIMEOUT); THOROUGH_FILES
#             (conformance, gradients) and THOROUGH_K (-k, default triton) select, THOROUGH_OPTS adds options
#   thoroughparts  the properties too slow for one process (PARTS_K, -k, default "mlp and triton and
#             gradients", run 10, in THOROUGH_FILES) in PARTS (16) parts of the thorough budget (1000
#             examples a test): pytest-xdist --dist each runs every selected test on each of PARTS workers,
#             each drawing its own ceil(1000 / PARTS) random examples (profile thorough-part); the report sums
#             the parts ($OUT/thoroughparts/junit.xml, report.json); TEST_TIMEOUT as in thorough
#   bench     kvcompress-bench (tables and roofline plot); BENCH_ARGS adds options (e.g. "--kinds mlp
#             --deadline 450"), BENCH_TAG suffixes the output folder
#   streambench  decode-step latency (benchmarks/test_bench_streaming.py), bfloat16 on the GPU
#   precision scripts/precision_table.py at T = PRECISION_T (16384): error against the bound per kind, dtype and
#             tensor, "before" from the tree unpacked in .head/before (git archive REV kvcompress benchmarks), then
#             this tree (issue 13's table)
#   hostprof  scripts/host_profile.py: where the host time of a call goes (cProfile, tiny inputs; HOST_CALLS, 1000;
#             HOST_ARGS adds options, e.g. "--kinds gated_pool")
#   ncu       Nsight Compute on one tuned call of NCU_KIND (attention_pool) at the NSA shape (scripts/ncu_kernel.py,
#             NCU_ARGS adds e.g. --fwdbwd): speed of light, occupancy, warp stalls, clocks left alone
#   peers     scripts/verify_peers.py: the public kernels' adapters through the suite (sources in .peers/, wheels in .whl/)
#   production  the production-shape tier (test_production.py) for every backend on CUDA, ci profile
#   pytest    python3 -m pytest $PYTEST_ARGS [-k "$PYTEST_K"] (-q -p no:cacheprovider, on XDIST workers), untuned
#             launches: any selection
#   mlpprobe  scripts/mlp_gemm_probe.py: mlp through cuBLAS (windows copied once) against the Triton kernel and the
#             seed eager and compiled, bf16 at the NSA shape, with the matmul floor (issue 14.1)
#   decodebench  scripts/decode_bench.py: issue 15's decode-step latency table (every kind and CUDA backend, N
#             streams 1/8/64/256, eager and CUDA-graph replay, against recompressing the prefixes; DECODE_ARGS adds)
#   apsweep   scripts/ap_sweep.py: attention_pool's kernels one launch configuration at a time at the NSA shape (time,
#             registers, spills; more backward programs; the tuned forward + backward)
#   profile   scripts/kind_profile.py: per-kernel profile and do_bench of kvcompress-bench's configuration of PROFILE_KIND
#             (gated_pool) at setting PROFILE_SETTING (0), D 128, T 131072, every entrant (PROFILE_ARGS adds options)
#   perf      scripts/gpu_perf.py: linear and the pools, CUDA-graph and eager times, per-kernel profile, host time
#             (docs/triton-perf.md); LABEL=name names the run (compare saved runs with gpu_perf.py --compare)
# The other property-suite phases run pytest-xdist with XDIST workers (default 8) when it is importable: on a GPU
# the suite is bound by Triton's compilation of each drawn shape (CPU work), ~7 s a property in one process.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# kvcompress itself, editable and offline: the pytest plugin is found through its entry point, and the
# reference (folder reference/) imports as kvcompress_reference, as from a wheel
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . > "$OUT/install.log" 2>&1 \
    || { echo "=== editable install of kvcompress failed:"; tail -n 20 "$OUT/install.log"; }
# the public kernels the adapters verify, carried as source (not in the repo): .peers/<name>
for d in .peers/*/; do [ -d "$d" ] && export PYTHONPATH=$PYTHONPATH:$PWD/${d%/}; done
XD=()
python3 -c "import xdist" 2>/dev/null && XD=(-n "${XDIST:-8}")
run() {  # name, limit seconds, command...
    local name=$1 limit=${LIMIT:-$2}; shift 2
    echo "=== $name ($(date +%T))"
    # SIGINT first: pytest then stops cleanly and still prints its summary of what ran
    timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name exit $? ($(date +%T))"
    tail -n 40 "$OUT/$name.log"
}
for arg in "$@"; do
    phase=${arg%%:*} LIMIT=
    [ "$phase" != "$arg" ] && LIMIT=${arg#*:}
    case $phase in
        info) run info 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"' ;;
        quick) run quick 300 python3 scripts/gpu_check.py --quick --out "$OUT/quick.json" ;;
        check) run check 420 python3 scripts/gpu_check.py --out "$OUT/gpu_check.json" ;;
        checkap) run checkap 120 python3 scripts/gpu_check.py --kinds attention_pool --skip-timing \
                   --cases b4d192,d64,packed --out "$OUT/gpu_check_ap.json" ;;
        timing) run timing 300 python3 scripts/gpu_check.py --skip-correctness --out "$OUT/gpu_timing.json" ;;
        suitetriton) KVCOMPRESS_TRITON_AUTOTUNE=0 run suitetriton 300 python3 -m pytest kvcompress/testing/properties/test_conformance.py kvcompress/testing/properties/test_invariants.py \
                   kvcompress/testing/properties/test_gradients.py tests/test_streaming.py -q -p no:cacheprovider -k triton \
                   --hypothesis-show-statistics "${XD[@]}" ;;
        timingsizes) run timingsizes 560 python3 scripts/gpu_check.py --skip-correctness \
                   --timing-shapes t8192,t65536,b4,d192 --out "$OUT/gpu_timing_sizes.json" ;;
        configs) KVCOMPRESS_TRITON_AUTOTUNE=0 run configs 500 python3 -m pytest tests/test_every_config.py \
                   tests/test_gated_pool_kernels.py -q -p no:cacheprovider "${XD[@]}" ;;
        gputests) run gputests 400 python3 -m pytest -m gpu tests/test_direct_launch.py tests/test_triton.py -q -p no:cacheprovider -x ;;
        suite) KVCOMPRESS_TRITON_AUTOTUNE=0 run suite 420 python3 -m pytest kvcompress/testing/properties \
                   tests/test_streaming.py tests/test_triton.py -q -p no:cacheprovider --kvcompress-report "$OUT/suite.json" \
                   --hypothesis-show-statistics "${XD[@]}" ;;
        thorough|thoroughparts)
                  lim=${LIMIT:-560} tt=${TEST_TIMEOUT:-$((${LIMIT:-560} - 90))}
                  files=${THOROUGH_FILES:-kvcompress/testing/properties/test_conformance.py kvcompress/testing/properties/test_gradients.py}
                  mkdir -p "$OUT/$phase"
                  if ! python3 -c "import xdist, pytest_timeout" 2>/dev/null; then
                      echo "=== $phase: needs pytest-xdist and pytest-timeout (pip install -e .[test], or wheels in .whl/)"
                  elif [ "$phase" = thorough ]; then
                      KVCOMPRESS_TRITON_AUTOTUNE=0 run thorough "$lim" python3 -m pytest $files -k "${THOROUGH_K:-triton}" \
                       -n "${JOBS:-16}" --timeout "$tt" --session-timeout "${SESSION_TIMEOUT:-$((lim - 30 - tt))}" \
                       --kvcompress-profile thorough --junitxml "$OUT/thorough/junit.xml" \
                       --kvcompress-report "$OUT/thorough/report.json" -q -p no:cacheprovider ${THOROUGH_OPTS:-}
                  else
                      parts=${PARTS:-16}
                      KVCOMPRESS_TRITON_AUTOTUNE=0 KVCOMPRESS_PART_EXAMPLES=$(( (1000 + parts - 1) / parts )) \
                       run thoroughparts "$lim" python3 -m pytest $files -k "${PARTS_K:-mlp and triton and gradients}" \
                       -n "$parts" --dist each --timeout "$tt" \
                       --kvcompress-profile thorough-part --junitxml "$OUT/thoroughparts/junit.xml" \
                       --kvcompress-report "$OUT/thoroughparts/report.json" -q -p no:cacheprovider ${THOROUGH_OPTS:-}
                  fi ;;
        peers) run peers 420 python3 scripts/verify_peers.py --out "$OUT/peers" ;;
        production) KVCOMPRESS_TRITON_AUTOTUNE=0 run production 420 python3 -m pytest \
                   kvcompress/testing/properties/test_production.py -q -p no:cacheprovider --kvcompress-profile ci \
                   --kvcompress-report "$OUT/production.json" --hypothesis-show-statistics "${XD[@]}" ;;
        pytest) KVCOMPRESS_TRITON_AUTOTUNE=0 run pytest 400 python3 -m pytest ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} \
                   -q -p no:cacheprovider "${XD[@]}" ;;
        precision) run precision 300 bash -c 'T=${PRECISION_T:-16384}; \
                   PYTHONPATH=.head/before:$PYTHONPATH python3 scripts/precision_table.py --T $T --label before \
                   --out "$OUT/precision_before.json"; python3 scripts/precision_table.py --T $T --label after \
                   --out "$OUT/precision_after.json"' ;;
        hostprof) run hostprof 240 python3 scripts/host_profile.py --calls "${HOST_CALLS:-1000}" --out "$OUT" ${HOST_ARGS:-} ;;
        ncu) run ncu 150 ncu --nvtx --nvtx-include "measured/" --clock-control none --section SpeedOfLight \
                   --section Occupancy --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
                   python3 scripts/ncu_kernel.py --kind "${NCU_KIND:-attention_pool}" ${NCU_ARGS:-} ;;
        mlpprobe) run mlpprobe 300 python3 scripts/mlp_gemm_probe.py --out "$OUT/mlp_probe.json" ;;
        decodebench) run decodebench 300 python3 scripts/decode_bench.py --out "$OUT/decode.json" --md "$OUT/decode.md" \
                   ${DECODE_ARGS:-} ;;
        profile) run profile 300 python3 scripts/kind_profile.py --kind "${PROFILE_KIND:-gated_pool}" \
                   --setting "${PROFILE_SETTING:-0}" --out "$OUT/profile_${PROFILE_KIND:-gated_pool}.json" ${PROFILE_ARGS:-} ;;
        apsweep) run apsweep 200 python3 scripts/ap_sweep.py --out "$OUT/ap_sweep.json" ;;
        perf) run perf 400 python3 scripts/gpu_perf.py --label "${LABEL:-this}" --out "$OUT/perf.json" ;;
        bench) run bench 420 python3 -m kvcompress.bench --out "$OUT/bench${BENCH_TAG:-}" ${BENCH_ARGS:-} ;;
        streambench) run streambench 300 python3 -m pytest benchmarks/test_bench_streaming.py --benchmark-only -q \
                   -p no:cacheprovider --benchmark-columns=min,median,max,rounds ;;
        benchquick) run bench 200 python3 -m kvcompress.bench --quick --deadline 150 --compile-budget 60 --out "$OUT/bench" ;;
        *) echo "unknown phase $phase" ;;
    esac
done
