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
import itertools
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

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.tiny import build_tiny_tokenizer  # noqa: E402


VARIANTS = ("sft", "floor", "attention", "base", "base-cached", "lagged", "ema")
SCALES = {
    "toy": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab=200,
    ),  # for the smoke test only
    # big enough on 2 CPU cores that the matrix products dominate, small enough for a few minutes
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab=4000,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab=128256,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab=128256,
    ),
}


class FloorTrainer(SFTTrainer):
    """Plain SFT plus one no-grad forward of the base model per micro-batch: an on-the-fly history's floor."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                model(**{**inputs, "use_cache": False}, fused_lm_head=True)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def synthetic_data(vocab_words: int, seq_len: int, examples: int, seed: int = 0):
    """Fixed-length prompt-completion pairs of random words: 3/4 prompt, 1/4 completion, no padding noise."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_words)]
    prompt_len, completion_len = (seq_len * 3) // 4, seq_len - (seq_len * 3) // 4 - 1  # -1: TRL appends EOS
    rows = [
        {
            "prompt": " ".join(rng.choices(words, k=prompt_len)),
            "completion": " " + " ".join(rng.choices(words, k=completion_len)),
        }
        for _ in range(examples)
    ]
    return rows, words


def build(variant, args, tokenizer, rows, cache_dir, output_dir):
    shape = SCALES[args.scale]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=max(4096, args.seq_len),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(dtype=dtype, device=args.device)
    common = dict(
        output_dir=output_dir,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        gradient_checkpointing=True,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        max_length=args.seq_len,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        seed=0,
        dataloader_num_workers=0,
    )
    peft = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    dataset = Dataset.from_list(rows)
    if variant in ("sft", "floor"):
        trainer_class = SFTTrainer if variant == "sft" else FloorTrainer
        return trainer_class(
            model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer, peft_config=peft
        )
    selection = dict(attention_warmup_ratio=0.0)
    selection.update(
        {
            "attention": dict(selection_method="attention"),
            "base": dict(history="base"),
            "base-cached": dict(history="base", history_cache_dir=cache_dir, history_cache_batch_size=2 * args.batch),
            "lagged": dict(history="lagged", history_update_steps=50),
            "ema": dict(history="ema", history_update_steps=1, history_ema_alpha=0.98),
        }[variant]
    )
    return SSTokenTrainer(
        model=model,
        args=SSTokenConfig(**common, **selection),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft,
    )


class Runner:
    """Runs one optimizer step at a time of a trainer, as its training loop would (GA = 1)."""

    def __init__(self, name, trainer, device):
        self.name, self.trainer, self.device = name, trainer, device
        total = trainer.args.max_steps
        trainer.create_optimizer_and_scheduler(num_training_steps=total)
        trainer.state.max_steps = total
        trainer.model.train()
        self.batches = itertools.cycle(trainer.get_train_dataloader())
        self.times, self.attention_times = [], []
        self._attention_seconds = 0.0
        attention = getattr(trainer, "_attention", None)
        if attention is not None:  # time the statistic inside the forward
            record = attention.record

            def timed_record(*args):
                if attention._armed is None:  # not the armed forward: nothing is computed
                    return record(*args)
                sync(device)
                start = time.perf_counter()
                record(*args)
                sync(device)
                self._attention_seconds += time.perf_counter() - start

            attention.record = timed_record

    def step(self):
        trainer = self.trainer
        self._attention_seconds = 0.0
        samples, num_items = trainer.get_batch_samples(iter([next(self.batches)]), 1, trainer.args.device)
        inputs = samples[0]
        sync(self.device)
        start = time.perf_counter()
        trainer.training_step(trainer.model, inputs, num_items)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        history = getattr(trainer, "_history", None)
        if history is not None:
            history.on_optimizer_step(trainer.state.global_step)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        self.attention_times.append(self._attention_seconds)
        return int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


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
        if args.memory_of == "base-cached":
            runner.trainer._prepare_history_cache()
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
    with tempfile.TemporaryDirectory() as tmp:
        runners = []
        caching = None
        for variant in args.variants:
            trainer = build(variant, args, tokenizer, rows, os.path.join(tmp, "cache"), os.path.join(tmp, variant))
            runner = Runner(variant, trainer, args.device)
            if variant == "base-cached":
                sync(args.device)
                start = time.perf_counter()
                trainer._prepare_history_cache()
                sync(args.device)
                seconds = time.perf_counter() - start
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
