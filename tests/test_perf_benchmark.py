"""Smoke test of the performance benchmark at toy scale: it runs end to end and writes every figure. No timing
assertion: speed and memory are measured by the benchmark itself, never by tests."""

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_perf_benchmark_runs_at_toy_scale(tmp_path):
    out = tmp_path / "perf-toy"
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "perf", "run.py"),
        "--scale",
        "toy",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--examples",
        "8",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--variants",
        "sft",
        "floor",
        "base-cached",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "perf-toy.json").read_text())
    assert set(results["variants"]) == {"sft", "floor", "base-cached"}
    for entry in results["variants"].values():
        assert entry["step_seconds_median"] > 0 and entry["tokens_per_second"] > 0
        assert entry["peak_memory_bytes"] > 0 and "memory_vs_sft" in entry and "time_vs_floor" in entry
    assert results["variants"]["sft"]["time_vs_sft"] == 1.0
    assert results["caching_pass"]["tokens"] == 8 * 32 and results["caching_pass"]["vs_training_throughput"] > 0
    assert "| base-cached |" in (tmp_path / "perf-toy.md").read_text()
