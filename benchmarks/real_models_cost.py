"""What the real models cost on this machine: LoRA step time and the cache's model fingerprint.

For SmolLM2-135M and gemma-3-270m (tools.real_models), in bf16, LoRA r=16 on all linear layers, batch 8 x 64
tokens, no gradient checkpointing: the median optimizer-step time of plain SFTTrainer and of SSTokenTrainer with the
on-the-fly `base` history (one extra no-grad forward) and with the cached one (none). Then the time to fingerprint
every weight byte (`model_fingerprint`), and, from its throughput, an estimate for a Llama-3.1-8B shape in bf16 and
in NF4 (bytes counted on the meta device, nothing allocated).

    python benchmarks/real_models_cost.py            # writes benchmarks/results/real-models-cost.json as it goes

Run it on an otherwise idle machine: two busy cores make every figure 10-20x slower.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tools.real_models import real_model_path  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.history.fingerprints import model_fingerprint  # noqa: E402


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "real-models-cost.json")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def dataset(tokenizer, rows=64, length=64):
    """Prompt-completion rows of exactly `length` tokens (half prompt), from real words."""
    words = (
        "the cat sat on the mat while the owl watched the green cow reverse a list of letters and add two "
        "numbers before the capital of france"
    ).split()
    examples = []
    for i in range(rows):
        text = " ".join(words[(i + j) % len(words)] for j in range(4 * length))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: length - 2]
        half = len(ids) // 2
        examples.append({"prompt": tokenizer.decode(ids[:half]), "completion": tokenizer.decode(ids[half:])})
    return Dataset.from_list(examples)


def time_variant(name, model_dir, variant, steps, output_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    settings = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=64,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    data = dataset(tokenizer)
    if variant == "sft":
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**settings), train_dataset=data, processing_class=tokenizer, peft_config=lora
        )
    else:
        extra = dict(attention_warmup_ratio=0.0)
        if variant == "sstoken-cached":
            extra["history_cache_dir"] = os.path.join(output_dir, "cache")
        trainer = SSTokenTrainer(
            model=model,
            args=SSTokenConfig(**settings, **extra),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora,
        )
    timer = StepTimer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    measured = timer.times[2:]  # two warm-up steps
    return {
        "model": name,
        "variant": variant,
        "steps": steps,
        "median_step_s": statistics.median(measured),
        "min_step_s": min(measured),
        "max_step_s": max(measured),
        "train_s_incl_caching": total,
    }


def fingerprint_cost(name, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    start = time.perf_counter()
    model_fingerprint(model)
    seconds = time.perf_counter() - start
    return {"model": name, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}


def llama_8b_bytes():
    """State-dict bytes of a Llama-3.1-8B shape: bf16, and NF4 (linear layers 4-bit + fp32 absmax per 64)."""
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    bf16 = nf4 = 0
    for name, param in model.named_parameters():
        bf16 += param.numel() * 2
        in_layers = ".layers." in name and name.endswith("proj.weight")
        nf4 += param.numel() // 2 + param.numel() // 64 * 4 if in_layers else param.numel() * 2
    return {"bf16": bf16, "nf4": nf4}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--variants", nargs="+", default=["sft", "sstoken", "sstoken-cached"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "steps": [],
        "fingerprint": [],
    }

    def save():
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)

    for name in args.models:
        model_dir = real_model_path(name)
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as output_dir:
                results["steps"].append(time_variant(name, model_dir, variant, args.steps, output_dir))
            print(json.dumps(results["steps"][-1]), flush=True)
            save()
        results["fingerprint"].append(fingerprint_cost(name, model_dir))
        print(json.dumps(results["fingerprint"][-1]), flush=True)
        save()
    rate = statistics.median(entry["gb_per_s"] for entry in results["fingerprint"])
    sizes = llama_8b_bytes()
    results["llama_3.1_8b_estimate"] = {kind: {"bytes": n, "seconds": n / rate / 1e9} for kind, n in sizes.items()}
    results["load_average_at_end"] = os.getloadavg()
    save()
    print(json.dumps(results["llama_3.1_8b_estimate"]))


if __name__ == "__main__":
    main()
