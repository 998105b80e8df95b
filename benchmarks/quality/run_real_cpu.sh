#!/usr/bin/env bash
# The real-model benchmark at the CPU scale, in the priority order of benchmarks/quality/README.md ("Priority").
# 2 workers x 1 thread (one per free core). --resume keeps the runs an earlier, stopped invocation finished. Each stage rewrites its results JSON after every finished run, so a stopped session keeps every number.
#   nohup bash benchmarks/quality/run_real_cpu.sh > benchmarks/results/real-cpu.log 2>&1 &
set -u
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKERS=${WORKERS:-2}
python -m benchmarks.quality.run --model smollm2 --ablations none --workers "$WORKERS" --resume
# gemma-3-270m: one process, two threads, as all its runs were made. Two workers first ran out of memory (quality
# README, "Session 3"); the cause, a 21 GB copy in greedy decoding, is fixed ("Session 4"), but the setting is kept.
# The first 8 methods are the design's tier 3; the last 4 are the extension of "Session 5" (every method on gemma).
python -m benchmarks.quality.run --model gemma3 --ablations none --workers 1 --threads-per-run 2 --resume \
    --methods full random rel attention sstoken "attention[sink_free]" "sstoken[sink_free]" rho1 \
    "attention[position_corrected]" "sstoken[position_corrected]" profit dft
python -m benchmarks.quality.run --model smollm2 --only-ablations --methods sstoken --datasets noisy --workers "$WORKERS" --resume
