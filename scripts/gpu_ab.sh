#!/usr/bin/env bash
# A/B timing on one GPU lease: the baseline tree in BASE_DIR (default .base: `git archive BASE | tar -x -C
# .base`, carried to the device) against this tree, each timed by scripts/gpu_perf.py in its own process on
# the same card, baseline first, then the comparison table (gpu_perf.py --compare).
# Usage: bash scripts/gpu_ab.sh [gpu_perf.py options, e.g. --layouts bhtd]
# Writes $OUT/base.json, $OUT/new.json and appends every line to $OUT/ab.log.
set -u
OUT=${OUT:-/tmp/out}
BASE_DIR=${BASE_DIR:-.base}
LIMIT=${LIMIT:-240}              # seconds per gpu_perf.py run
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
here=$PWD
echo "=== base ($BASE_DIR) $(date +%T)" | tee -a "$OUT/ab.log"
(cd "$BASE_DIR" && PYTHONPATH=$PWD timeout -s INT "$LIMIT" python3 scripts/gpu_perf.py --label base \
    --out "$OUT/base.json" "$@") 2>&1 | tee -a "$OUT/ab.log" | tail -n 25
echo "=== new (this tree) $(date +%T)" | tee -a "$OUT/ab.log"
PYTHONPATH=$here timeout -s INT "$LIMIT" python3 scripts/gpu_perf.py --label new --out "$OUT/new.json" "$@" 2>&1 \
    | tee -a "$OUT/ab.log" | tail -n 25
echo "=== compare $(date +%T)" | tee -a "$OUT/ab.log"
python3 scripts/gpu_perf.py --compare "$OUT/base.json,$OUT/new.json" "$@" 2>&1 | tee -a "$OUT/ab.log"
