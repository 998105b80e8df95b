#!/usr/bin/env bash
# The real-model benchmark at the CPU scale, in the priority order of benchmarks/quality/README.md ("Priority").
# 3 workers x 1 thread: on a free 2-core machine use WORKERS=2. Each stage rewrites its results JSON after every finished run, so a stopped session keeps every number.
#   nohup bash benchmarks/quality/run_real_cpu.sh > benchmarks/results/real-cpu.log 2>&1 &
set -u
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKERS=${WORKERS:-3}
python -m benchmarks.quality.run --model smollm2 --ablations none --workers "$WORKERS"
python -m benchmarks.quality.run --model gemma3 --ablations none --workers "$WORKERS" \
    --methods full random rel attention sstoken "attention[sink_free]" "sstoken[sink_free]" rho1
python -m benchmarks.quality.run --model smollm2 --only-ablations --methods sstoken --datasets noisy --workers "$WORKERS"
