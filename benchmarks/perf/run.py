"""Side-by-side cost of ssToken against plain SFTTrainer, on the same model, data and batch, in one process.

Every variant is a real trainer on its own copy of the same randomly initialised model; their optimizer steps are
interleaved (sft, floor, base, ... then again), after warm-up steps, so that drift in the machine's speed hits all
variants alike. Peak memory is measured per variant in a fresh subprocess (CPU: peak RSS; CUDA: max allocated).

Peak memory on the CPU is the peak resident set size sampled during the training steps (after one step that
allocates the optimizer state), not the process's lifetime peak, which imports and data preparation set.

Variants:
  sft          plain trl.SFTTrainer
  floor        plain SFTTrainer plus exactly one no-grad forward of the same model per micro-batch (adapter
               disabled): the least an on-the-fly history can cost
  attention    SSTokenTrainer, selection_method="attention": the attention statistic alone, no history forward
  base         SSTokenTrainer, history="base", on the fly
  base-cached  SSTokenTrainer, history="base" with history_cache_dir (the caching pass is timed separately)
  lagged       SSTokenTrainer, history="lagged" (K = 50)
  ema          SSTokenTrainer, history="ema" (K = 1, alpha = 0.98)

    python benchmarks/perf/run.py                 # CPU scale, writes benchmarks/results/perf-cpu.{json,md}
    python benchmarks/perf/run.py --scale llama-3.2-1b --device cuda   # GPU shapes (random weights)
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaForCausalLM  # noqa: E402

from benchmarks.perf.harness import (  # noqa: E402
    SCALES,
    VARIANTS,
    AttentionTimer,
    Runner,
    build_trainer,
    llama_config,
    prepare_history_cache,
    sync,
    synthetic_data,
)
from trl_sstoken.tiny import build_tiny_tokenizer  # noqa: E402


def build(variant, args, tokenizer, rows, cache_dir, output_dir):
    torch.manual_seed(0)
    config = llama_config(SCALES[args.scale], tokenizer, max_positions=max(4096, args.seq_len))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(dtype=dtype, device=args.device)
    return build_trainer(
        variant,
        model,
        tokenizer,
        rows,
        output_dir=output_dir,
        cache_dir=cache_dir,
        seq_len=args.seq_len,
        batch=args.batch,
        steps=args.warmup + args.steps,
        device=args.device,
    )


def current_rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's resident memory every 2 ms in a thread: the peak *during the training steps*.

    The process-wide `ru_maxrss` cannot be reset, and its peak is set by imports and data preparation long before the
    first step, so it hides what a step costs."""

    def __init__(self):
        import threading

        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak_memory_bytes(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(variant, args):
    """Peak memory of a variant, alone in a fresh process (warm-up + 3 steps)."""
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        variant,
        "--scale",
        args.scale,
        "--device",
        args.device,
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--warmup",
        "1",
        "--steps",
        "3",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def setup(args):
    shape = SCALES[args.scale]
    rows, words = synthetic_data(shape["vocab"] - 8, args.seq_len, args.examples)
    tokenizer = build_tiny_tokenizer([" ".join(words)])
    return rows, tokenizer


def memory_only(args):
    rows, tokenizer = setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(
            args.memory_of, build(args.memory_of, args, tokenizer, rows, os.path.join(tmp, "cache"), tmp), args.device
        )
        prepare_history_cache(runner.trainer)
        runner.step()  # the first step allocates the optimizer state: count it in the baseline of every variant
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup + args.steps):
                runner.step()
            peak = torch.cuda.max_memory_allocated()
        else:
            with RssSampler() as sampler:
                for _ in range(args.warmup + args.steps):
                    runner.step()
            peak = sampler.peak
        print(json.dumps({"variant": args.memory_of, "peak_memory_bytes": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    parser.add_argument("--memory-into", help="only measure peak memory and add it to this existing results JSON")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_only(args)

    if args.memory_into:
        with open(args.memory_into) as handle:
            results = json.load(handle)
        return finish(results, args, args.memory_into[: -len(".json")])

    rows, tokenizer = setup(args)
    timer = AttentionTimer(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        runners = []
        caching = None
        for variant in args.variants:
            trainer = build(variant, args, tokenizer, rows, os.path.join(tmp, "cache"), os.path.join(tmp, variant))
            runner = Runner(variant, trainer, args.device, attention_timer=timer)
            if variant == "base-cached":
                sync(args.device)
                start = time.perf_counter()
                prepared = prepare_history_cache(trainer)
                sync(args.device)
                seconds = time.perf_counter() - start
            if variant == "base-cached" and prepared:
                caching = {
                    "seconds": seconds,
                    "tokens": len(rows) * args.seq_len,
                    "tokens_per_second": len(rows) * args.seq_len / seconds,
                }
            runners.append(runner)
        tokens_per_step = None
        for round_index in range(args.warmup + args.steps):
            for runner in runners:  # interleaved: every variant sees the same machine state
                tokens_per_step = runner.step()
            print(f"round {round_index + 1}/{args.warmup + args.steps} done", file=sys.stderr)

    results = {
        "command": "python " + " ".join(sys.argv),
        "scale": args.scale,
        "shape": SCALES[args.scale],
        "device": args.device,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "variants": {},
    }
    medians = {r.name: statistics.median(r.times[args.warmup :]) for r in runners}
    for runner in runners:
        timed = runner.times[args.warmup :]
        median = medians[runner.name]
        entry = {
            "step_seconds_median": median,
            "step_seconds_min": min(timed),
            "step_seconds_max": max(timed),
            "tokens_per_second": tokens_per_step / median,
            "attention_seconds_median": statistics.median(runner.attention_times[args.warmup :]),
        }
        entry["attention_share_of_step"] = entry["attention_seconds_median"] / median
        if "sft" in medians:
            entry["time_vs_sft"] = median / medians["sft"]
        if "floor" in medians:
            entry["time_vs_floor"] = median / medians["floor"]
        results["variants"][runner.name] = entry
    if caching is not None and "sft" in medians:
        caching["vs_training_throughput"] = caching["tokens_per_second"] / (tokens_per_step / medians["sft"])
        results["caching_pass"] = caching
    finish(results, args, args.out or os.path.join("benchmarks", "results", f"perf-{args.scale}"))


def finish(results, args, out):
    """Adds the per-variant peak memory (unless --no-memory) and writes the JSON and the markdown table."""
    if not args.no_memory:
        results["memory_command"] = "python " + " ".join(sys.argv)
        for variant in args.variants:
            peak = measure_memory(variant, args)["peak_memory_bytes"]
            results["variants"][variant]["peak_memory_bytes"] = peak
        if "sft" in args.variants:
            for variant in args.variants:
                entry = results["variants"][variant]
                entry["memory_vs_sft"] = entry["peak_memory_bytes"] / results["variants"]["sft"]["peak_memory_bytes"]

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    table = markdown(results)
    with open(out + ".md", "w") as handle:
        handle.write(table)
    print(table)


def markdown(results):
    lines = [
        f"Command: `{results['command']}`  ",
        f"Scale {results['scale']}, {results['device']}, sequence length {results['seq_len']}, batch {results['batch']}, "
        f"{results['threads']} threads, median of {results['timed_steps']} interleaved steps after {results['warmup_steps']} "
        f"warm-up steps; torch {results['versions']['torch']}.",
        "",
        "| variant | step (s), median [min-max] | tokens/s | vs SFT | vs floor | attention share | peak memory | memory vs SFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        memory = f"{v['peak_memory_bytes'] / 2**20:.0f} MiB" if "peak_memory_bytes" in v else "-"
        lines.append(
            f"| {name} | {v['step_seconds_median']:.3f} [{v['step_seconds_min']:.3f}-{v['step_seconds_max']:.3f}] | "
            f"{v['tokens_per_second']:.0f} | {v.get('time_vs_sft', float('nan')):.3f} | "
            f"{v.get('time_vs_floor', float('nan')):.3f} | {100 * v['attention_share_of_step']:.1f}% | {memory} | "
            f"{v.get('memory_vs_sft', float('nan')):.3f} |"
        )
    if "caching_pass" in results:
        c = results["caching_pass"]
        lines += [
            "",
            f"Caching pass: {c['tokens']} tokens in {c['seconds']:.1f} s = {c['tokens_per_second']:.0f} tokens/s, "
            f"{c['vs_training_throughput']:.2f}x the plain SFT training throughput.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
