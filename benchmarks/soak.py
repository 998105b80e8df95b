"""Soak: a long CPU run of SSTokenTrainer that checks memory does not grow with steps and the history stays finite.

Not part of the test suite (it takes minutes). One run trains a LoRA adapter on a tiny local model with
`history="lagged"` or `"ema"` for a few thousand optimizer steps on the bundled quickstart data (96 rows, cycled),
and every `--sample-every` optimizer steps records, after a `gc.collect()`:
- the process's resident set size (VmRSS from /proc/self/status; ru_maxrss where /proc is missing);
- the number of objects the garbage collector tracks, how many of them are tensors, and Python's allocated blocks;
- whether every history and trained adapter parameter is finite, their largest magnitude and their distance.

Memory is judged on the second half of the run, once the allocator and caches have settled:
- the least-squares slope of RSS against steps, in KiB per 1000 steps, must not exceed `--max-slope-kib`;
- the median RSS of the last 10% of samples may exceed that of the first 10% of the second half by at most
  `--max-growth-mib` (single samples scatter by about +-10 MiB with the allocator's state);
- the number of live tensors in the last quarter may not exceed its maximum over the first half.
`--trace-python-growth` (a diagnostic, slower) also traces Python allocations over the second half and lists the
source lines whose live memory grew most.

The result goes to `benchmarks/results/soak-<mode>.json`: command, versions, git commit, settings, figures, checks
and every sample. The exit status is 1 when a check fails.

    python benchmarks/soak.py --history lagged
    python benchmarks/soak.py --history ema
"""

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from importlib import resources
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import trl_sstoken  # noqa: E402
from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.history import HISTORY_ADAPTER  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results"


def rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc), or the peak from getrusage where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def slope_per_1000(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of values against steps, per 1000 steps."""
    n = len(steps)
    if n < 2:
        return 0.0
    mean_x, mean_y = sum(steps) / n, sum(values) / n
    sxx = sum((x - mean_x) ** 2 for x in steps)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(steps, values, strict=True))
    return 1000.0 * sxy / sxx if sxx else 0.0


class SoakProbe(TrainerCallback):
    """Samples memory and the adapters' health every `every` optimizer steps."""

    def __init__(self, model, every: int, trace_from: int | None = None):
        self.every = every
        self.trace_from = trace_from
        self.trace_start = None
        self.python_growth = None
        named = dict(model.named_parameters())
        self.history = [p for n, p in named.items() if f".{HISTORY_ADAPTER}." in n]
        self.trained = [
            named[n.replace(f".{HISTORY_ADAPTER}.", ".default.")] for n in named if f".{HISTORY_ADAPTER}." in n
        ]
        if not self.history:
            raise RuntimeError("The model has no history adapter; the soak needs history='lagged' or 'ema'.")
        self.samples = []
        self.started = None

    def sample(self, step: int, log_entries: int) -> dict:
        gc.collect()
        objects = gc.get_objects()
        with torch.no_grad():
            history_finite = all(bool(torch.isfinite(p).all()) for p in self.history)
            trained_finite = all(bool(torch.isfinite(p).all()) for p in self.trained)
            history_max = max(float(p.abs().max()) for p in self.history)
            trained_max = max(float(p.abs().max()) for p in self.trained)
            gap = math.sqrt(
                sum(float((h - t).double().pow(2).sum()) for h, t in zip(self.history, self.trained, strict=True))
            )
        entry = {
            "step": step,
            "seconds": round(time.perf_counter() - self.started, 2),
            "rss_kib": rss_kib(),
            "gc_objects": len(objects),
            "live_tensors": sum(1 for o in objects if isinstance(o, torch.Tensor)),
            "python_blocks": sys.getallocatedblocks(),
            "log_entries": log_entries,
            "history_finite": history_finite,
            "trained_finite": trained_finite,
            "history_max_abs": history_max,
            "trained_max_abs": trained_max,
            "history_trained_distance": gap,
        }
        del objects
        self.samples.append(entry)
        return entry

    def on_train_end(self, args, state, control, **kwargs):
        if self.trace_start is not None:
            gc.collect()
            growth = tracemalloc.take_snapshot().compare_to(self.trace_start, "lineno")
            tracemalloc.stop()
            self.python_growth = [
                {
                    "where": str(stat.traceback),
                    "size_diff_kib": round(stat.size_diff / 1024, 1),
                    "count_diff": stat.count_diff,
                }
                for stat in growth[:15]
            ]

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.sample(0, len(state.log_history))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            entry = self.sample(state.global_step, len(state.log_history))
            if self.trace_from is not None and self.trace_start is None and state.global_step >= self.trace_from:
                tracemalloc.start()
                self.trace_start = tracemalloc.take_snapshot()
            print(
                f"step {entry['step']:>6}  {entry['seconds']:>8.1f}s  rss {entry['rss_kib'] / 1024:8.1f} MiB  "
                f"objects {entry['gc_objects']:>8}  tensors {entry['live_tensors']:>6}  "
                f"blocks {entry['python_blocks']:>8}  history finite {entry['history_finite']}",
                flush=True,
            )


def load_rows() -> list[dict]:
    text = resources.files("trl_sstoken").joinpath("data/quickstart.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def git_state() -> dict:
    """The commit the package was run from, and whether its files differed from it."""
    root = Path(trl_sstoken.__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "trl_sstoken", "benchmarks/soak.py")
    return {
        "commit": git("rev-parse", "HEAD"),
        "package_or_script_modified": bool(status) if status is not None else None,
    }


def versions() -> dict:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "trl_sstoken": trl_sstoken.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", choices=["lagged", "ema"], required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--sample-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--history-update-steps", type=int, default=10)
    parser.add_argument("--ema-alpha", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-slope-kib", type=float, default=2048.0, help="allowed RSS slope, KiB per 1000 steps")
    parser.add_argument("--max-growth-mib", type=float, default=8.0, help="allowed RSS growth, middle to end")
    parser.add_argument("--logging-steps", type=int, default=100)
    parser.add_argument(
        "--trace-python-growth",
        action="store_true",
        help="diagnostic: trace Python allocations over the second half and report the lines that grew most "
        "(slows the run; its RSS then includes tracemalloc's own bookkeeping)",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    git_at_start = git_state()
    torch.set_num_threads(args.threads)
    rows = load_rows()
    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in rows])
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    rss_before_trainer = rss_kib()

    with tempfile.TemporaryDirectory(prefix="sstoken-soak-") as output_dir:
        config = SSTokenConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            logging_steps=args.logging_steps,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            max_length=64,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            history=args.history,
            history_update_steps=args.history_update_steps,
            history_ema_alpha=args.ema_alpha,
            attention_warmup_ratio=0.05,
        )
        trainer = SSTokenTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
        )
        probe = SoakProbe(
            trainer.model, args.sample_every, trace_from=args.steps // 2 if args.trace_python_growth else None
        )
        trainer.add_callback(probe)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        rel_means = [e["sstoken/rel_mean"] for e in trainer.state.log_history if "sstoken/rel_mean" in e]
        global_step = trainer.state.global_step

    samples = probe.samples
    half = [s for s in samples if s["step"] >= args.steps // 2]
    half_steps = [s["step"] for s in half]
    middle, end = half[0], samples[-1]
    slope = slope_per_1000(half_steps, [s["rss_kib"] for s in half])
    slope_objects = slope_per_1000(half_steps, [s["gc_objects"] for s in half])
    slope_tensors = slope_per_1000(half_steps, [s["live_tensors"] for s in half])
    slope_blocks = slope_per_1000(half_steps, [s["python_blocks"] for s in half])
    # Single RSS samples scatter by +-10 MiB with the allocator's state; compare medians of the two ends instead
    window = max(len(half) // 10, 1)
    median_middle = statistics.median(s["rss_kib"] for s in half[:window]) / 1024
    median_end = statistics.median(s["rss_kib"] for s in half[-window:]) / 1024
    growth_mib = median_end - median_middle
    quarter = max(len(samples) // 4, 1)
    checks = {
        "ran_all_steps": global_step == args.steps,
        "rss_slope_second_half_ok": slope <= args.max_slope_kib,
        "rss_median_growth_middle_to_end_ok": growth_mib <= args.max_growth_mib,
        "live_tensors_not_growing": max(s["live_tensors"] for s in samples[-quarter:])
        <= max(s["live_tensors"] for s in samples[1 : len(samples) // 2 + 1]),
        "history_finite_throughout": all(s["history_finite"] for s in samples),
        "trained_finite_throughout": all(s["trained_finite"] for s in samples),
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
    }
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "versions": versions(),
        "git": git_at_start,
        "settings": vars(args) | {"output": str(args.output) if args.output else None},
        "model": "tiny qwen2 (trl_sstoken.tiny): hidden 64, 2 layers, 4 heads, 2 kv heads; LoRA r=8 all-linear",
        "data": f"trl_sstoken/data/quickstart.jsonl ({len(rows)} rows, cycled)",
        "steps": global_step,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(global_step, 1), 4),
        "rss_mib": {
            "before_trainer": round(rss_before_trainer / 1024, 1),
            "start": round(samples[0]["rss_kib"] / 1024, 1),
            "first_sample_after_start": round(samples[1]["rss_kib"] / 1024, 1) if len(samples) > 1 else None,
            "middle": round(middle["rss_kib"] / 1024, 1),
            "end": round(end["rss_kib"] / 1024, 1),
            "peak": round(peak_rss_kib() / 1024, 1),
            "median_of_first_10pct_of_second_half": round(median_middle, 1),
            "median_of_last_10pct": round(median_end, 1),
            "median_growth_middle_to_end": round(growth_mib, 2),
        },
        "rss_slope_second_half_kib_per_1000_steps": round(slope, 1),
        "gc_objects_slope_second_half_per_1000_steps": round(slope_objects, 1),
        "live_tensors_slope_second_half_per_1000_steps": round(slope_tensors, 1),
        "python_blocks_slope_second_half_per_1000_steps": round(slope_blocks, 1),
        "gc_objects_middle_end": [middle["gc_objects"], end["gc_objects"]],
        "python_blocks_middle_end": [middle["python_blocks"], end["python_blocks"]],
        "log_history_entries_middle_end": [middle["log_entries"], end["log_entries"]],
        "python_growth_top": probe.python_growth,
        "live_tensors_middle_end": [middle["live_tensors"], end["live_tensors"]],
        "history": {
            "finite_throughout": checks["history_finite_throughout"],
            "max_abs_end": end["history_max_abs"],
            "distance_to_trained_end": end["history_trained_distance"],
        },
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "rel_mean_last": rel_means[-1] if rel_means else None,
        "thresholds": {"max_slope_kib_per_1000": args.max_slope_kib, "max_growth_mib": args.max_growth_mib},
        "checks": checks,
        "passed": all(checks.values()),
        "samples": samples,
    }
    output = args.output or RESULTS / f"soak-{args.history}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "seconds", "rss_mib", "checks", "passed")}, indent=1))
    print(f"wrote {output}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
