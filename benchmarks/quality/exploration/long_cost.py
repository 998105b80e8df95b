"""CPU cost of the long-response task set (`--tasks long`), for sizing: a few full-SFT steps and greedy generation of
the eval set, both on one thread, in CPU-seconds (process time, so a loaded machine does not inflate it).

    python -m benchmarks.quality.exploration.long_cost [steps] [smollm2|gemma3]

Trains `full` (plain SFT through the same trainer) for `steps` steps at the real-cpu recipe (batch 8, LoRA r=16) with
the long set's max_length, then generates the real-cpu eval set (80 prompts, the long set's max new tokens) with the
base model (a trained model answers in ~100-230 tokens; the base model runs on, so this bounds it from above).
"""

import sys
import tempfile
import time

import torch
from tools.real_models import real_model_path
from transformers import AutoTokenizer

from .. import long_tasks, methods, real_data, real_evaluate
from ..scales import SCALES
from ..sft import BenchmarkTrainer, load_real_model, lora_config, training_args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    steps = int(argv[0]) if argv else 3
    name = argv[1] if len(argv) > 1 else "smollm2"
    torch.set_num_threads(1)
    scale = {**long_tasks.scale_for(SCALES["real-cpu"]), "model": name}
    splits = real_data.build_splits(scale["data_seed"], scale["train_per_family"], scale["eval_per_family"],
                                    scale["reference_per_family"], tasks="long")  # fmt: skip
    path = str(real_model_path(name))
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = real_data.sft_dataset(tokenizer, name, splits.train, splits.train_noisy)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = BenchmarkTrainer(
            model=load_real_model(path, "cpu"),
            args=training_args(scale, 0, output_dir, "cpu", methods.overrides_for("full"), max_steps=steps),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(scale),
        )
        cpu, wall = time.process_time(), time.time()
        trainer.train()
        print(f"train: {steps} steps of batch {scale['sft_batch_size']}, max_length {scale['max_length']}: "
              f"{time.process_time() - cpu:.1f} CPU-s ({time.time() - wall:.1f} s wall)")  # fmt: skip
    model = load_real_model(path, "cpu")
    prompts = [real_data.prompt_ids(tokenizer, name, real_data.prompt_text(i)) for i in splits.eval]
    cpu, wall = time.process_time(), time.time()
    texts = real_evaluate.greedy_generate(model, tokenizer, name, prompts, scale["max_new_tokens"])
    generated = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    print(f"generate: {len(prompts)} eval prompts, max {scale['max_new_tokens']} new tokens (base model: longest "
          f"{max(generated)}, median {sorted(generated)[len(generated) // 2]}): {time.process_time() - cpu:.1f} CPU-s "
          f"({time.time() - wall:.1f} s wall)")  # fmt: skip


if __name__ == "__main__":
    main()
