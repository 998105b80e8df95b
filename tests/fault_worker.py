"""A real SSTokenTrainer run for tests/test_faults.py, which kills it with SIGKILL at a chosen point and resumes it.

    python tests/fault_worker.py OUT_DIR [pause-in-save:STEP | pause-in-step:STEP | resume]

With a pause-* argument the run writes OUT_DIR/paused when it reaches that point (in the middle of writing the
checkpoint of STEP, after the adapter and before the optimizer state; or inside the forward of optimizer step STEP)
and sleeps there until it is killed.
"""

import os
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


MAX_STEPS = 8


def rows():
    import json
    from importlib import resources

    text = resources.files("trl_sstoken").joinpath("data/quickstart.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()][:32]


def pause(out_dir):
    with open(os.path.join(out_dir, "paused"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)


def build(out_dir):
    torch.set_num_threads(1)
    data = rows()
    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in data])
    args = SSTokenConfig(
        output_dir=out_dir,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        history="lagged",
        history_update_steps=3,
        attention_warmup_ratio=0.25,
    )
    return SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
    )


def run(out_dir, how="run"):
    os.makedirs(out_dir, exist_ok=True)
    trainer = build(out_dir)
    if how.startswith("pause-in-save:"):
        step = int(how.split(":")[1])
        save_optimizer = trainer._save_optimizer_and_scheduler

        def pausing_save(output_dir):
            if trainer.state.global_step == step:
                pause(out_dir)
            return save_optimizer(output_dir)

        trainer._save_optimizer_and_scheduler = pausing_save
    elif how.startswith("pause-in-step:"):
        step = int(how.split(":")[1])
        forward = trainer._forward_and_select

        def pausing_forward(*args, **kwargs):
            if trainer.state.global_step == step - 1:
                pause(out_dir)
            return forward(*args, **kwargs)

        trainer._forward_and_select = pausing_forward
    trainer.train(resume_from_checkpoint=True if how == "resume" else None)
    adapter = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if ".default." in n}
    save_file(adapter, os.path.join(out_dir, "final_adapter.safetensors"))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "run")
