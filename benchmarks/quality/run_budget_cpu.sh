#!/usr/bin/env bash
# The issue-27 budget sweep on the CPU, in the design's order (benchmarks/quality/README.md, "Issue 27: the sweep's
# design"; its stage numbers):
#   0  SmolLM2, the committed 24-step file (real-cpu, --resume: its 72 runs stay): random[position_matched],
#      sstoken[balanced], rel[balanced], noisy and clean, seeds 0-2 (the control copies the file's sstoken runs)
#   1  calibrate SmolLM2 at real-cpu-300 (full SFT, noisy data, seed 99)
#   2  SmolLM2 noisy real-cpu-300: the controls (full, random, sstoken, the position-matched random), seeds 0-2
#   3  the long set's 6-epoch cell (real-cpu-75 --tasks long): calibrate, then full, random, sstoken, sstoken[balanced]
#   4  SmolLM2 noisy real-cpu-300: the variants (sstoken[balanced], rel, rel[balanced], attention, rho1)
#   5  SmolLM2 clean real-cpu-300: the controls
#   6  calibrate SmolLM2 at real-cpu-100, then its noisy controls
#   7  gemma-3-270m: calibrate at real-cpu-300 (1 worker x 2 threads), then its noisy controls
# A session runs only part of it: pick stages by argument or STAGES (default: all, in order), e.g.
#   nohup bash benchmarks/quality/run_budget_cpu.sh 2 3 > benchmarks/results/budget-cpu.log 2>&1 &
#   STAGES="4 5" bash benchmarks/quality/run_budget_cpu.sh
# Every invocation has --resume: a stopped one keeps what it finished (calibrate: every finished lr; run: every
# finished run, the file's runs of other stages included) and rewrites its JSON after every run. The script stops at
# the first invocation that fails; a calibration that ends at an edge of its grid is not final, so the run after it
# is refused (the calibration's log names the lr to add: `... --resume` with it, then run the stage again).
# 2 workers x 1 thread for SmolLM2 (one per free core); gemma as all its runs were made, 1 worker x 2 threads.
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
WORKERS=${WORKERS:-2}
if [ "$#" -gt 0 ]; then STAGES="$*"; fi
STAGES=${STAGES:-0 1 2 3 4 5 6 7}
LRS=(--lrs 1e-3 3e-4 1e-4)
SEEDS=(--seeds 0 1 2)
CONTROLS=(full random sstoken "random[position_matched]")
SMOL=(--model smollm2 --workers "$WORKERS" --threads-per-run 1 --resume)
GEMMA=(--model gemma3 --workers 1 --threads-per-run 2 --resume)

calibrate() { "$PY" -m benchmarks.quality.calibrate "$@"; }
harness() { "$PY" -m benchmarks.quality.run --ablations none "${SEEDS[@]}" "$@"; }

stage() {
    case "$1" in
    0) harness "${SMOL[@]}" --scale real-cpu --datasets noisy clean \
           --methods "random[position_matched]" "sstoken[balanced]" "rel[balanced]" ;;
    1) calibrate "${SMOL[@]}" --scale real-cpu-300 "${LRS[@]}" ;;
    2) harness "${SMOL[@]}" --scale real-cpu-300 --datasets noisy --methods "${CONTROLS[@]}" ;;
    3) calibrate "${SMOL[@]}" --scale real-cpu-75 --tasks long "${LRS[@]}"
       harness "${SMOL[@]}" --scale real-cpu-75 --tasks long --datasets noisy \
           --methods full random sstoken "sstoken[balanced]" ;;
    4) harness "${SMOL[@]}" --scale real-cpu-300 --datasets noisy \
           --methods "sstoken[balanced]" rel "rel[balanced]" attention rho1 ;;
    5) harness "${SMOL[@]}" --scale real-cpu-300 --datasets clean --methods "${CONTROLS[@]}" ;;
    6) calibrate "${SMOL[@]}" --scale real-cpu-100 "${LRS[@]}"
       harness "${SMOL[@]}" --scale real-cpu-100 --datasets noisy --methods "${CONTROLS[@]}" ;;
    7) calibrate "${GEMMA[@]}" --scale real-cpu-300 "${LRS[@]}"
       harness "${GEMMA[@]}" --scale real-cpu-300 --datasets noisy --methods "${CONTROLS[@]}" ;;
    *) echo "run_budget_cpu.sh: unknown stage '$1' (stages: 0-7)" >&2; return 2 ;;
    esac
}

for s in $STAGES; do  # every stage named is checked before any runs
    case "$s" in [0-7]) ;; *) echo "run_budget_cpu.sh: unknown stage '$s' (stages: 0-7)" >&2; exit 2 ;; esac
done
for s in $STAGES; do
    echo "[$(date '+%Y-%m-%d %H:%M:%S')] run_budget_cpu.sh: stage $s"
    stage "$s"
done
echo "[$(date '+%Y-%m-%d %H:%M:%S')] run_budget_cpu.sh: stages $STAGES done"
