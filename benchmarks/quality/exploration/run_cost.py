"""CPU cost of one real-model run, split into training steps and evaluation (for sizing a design, issue 27).

Full SFT on the noisy data at a real-model scale's recipe (batch, max length, LoRA), a handful of steps, one torch
thread. Prints CPU-seconds (this process's `time.process_time`, which a loaded machine does not inflate the way it
inflates wall time) per training step (the first step apart: it pays one-off set-up) and for each part of the
harness's evaluation: greedy decoding + clean NLL on the eval prompts (`real_evaluate.evaluate`) and the attention
diagnostics on `diagnostic_rows` training rows.

    python -m benchmarks.quality.exploration.run_cost smollm2 --steps 6
"""

import argparse
import json
import os
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import PrinterCallback, TrainerCallback, set_seed  # noqa: E402

from .. import methods, real_evaluate, run  # noqa: E402
from ..scales import SCALES  # noqa: E402
from ..sft import BenchmarkTrainer, load_real_model, lora_config, training_args  # noqa: E402


class StepClock(TrainerCallback):
    """CPU-seconds of every optimizer step (from the end of one step to the end of the next)."""

    def __init__(self):
        self.marks = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.marks:
            self.marks.append(time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.process_time())

    def steps(self):
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.exploration.run_cost")
    parser.add_argument("model", choices=("smollm2", "gemma3"))
    parser.add_argument("--scale", default="real-cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3, help="irrelevant to the cost; the scale's may be unset")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from tools.real_models import real_model_path

    torch.set_num_threads(args.threads)
    run.quiet_libraries()
    scale = {**SCALES[args.scale], "model": args.model, "sft_lr": args.lr}
    path = str(real_model_path(args.model))
    cpu0 = time.process_time()
    run._init_real_worker(scale, path, "cpu", args.threads)
    worker = run._WORKER
    dataset = worker["datasets"]["noisy"]
    set_seed(99)
    model = load_real_model(path, "cpu")
    setup = time.process_time() - cpu0
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = BenchmarkTrainer(
            model=model,
            args=training_args(scale, 99, output_dir, "cpu", methods.overrides_for("full"), args.steps),
            train_dataset=dataset,
            processing_class=worker["tokenizer"],
            peft_config=lora_config(scale),
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        cpu1 = time.process_time()
        trainer.train()
        train = time.process_time() - cpu1
        cpu2 = time.process_time()
        real_evaluate.evaluate(trainer.model, worker["tokenizer"], args.model, worker["splits"].eval)
        evaluation = time.process_time() - cpu2
        cpu3 = time.process_time()
        rows = [dataset[i] for i in range(min(scale["diagnostic_rows"], len(dataset)))]
        real_evaluate.attention_diagnostics(trainer.model, rows, -1, worker["tokenizer"].pad_token_id)
        diagnostics = time.process_time() - cpu3
    steps = clock.steps()
    later = steps[1:] or steps
    print(json.dumps({
        "model": args.model, "scale": args.scale, "threads": args.threads, "steps": args.steps,
        "batch": scale["sft_batch_size"], "max_length": scale["max_length"],
        "eval_prompts": len(worker["splits"].eval), "diagnostic_rows": len(rows),
        "cpu_s_setup_data_and_model": round(setup, 1), "cpu_s_train_total": round(train, 1),
        "cpu_s_per_step": [round(s, 2) for s in steps],
        "cpu_s_per_step_after_first_mean": round(sum(later) / len(later), 2),
        "cpu_s_evaluate": round(evaluation, 1), "cpu_s_attention_diagnostics": round(diagnostics, 1),
        "load_average": os.getloadavg(),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
