"""Quickstart: fine-tune a tiny model with ssToken on the bundled dataset and show what it selected.

Runs offline on a CPU in well under a minute: the tokenizer and the model are built locally (no hub), and the data
is `trl_sstoken/data/quickstart.jsonl`, 96 synthetic prompt-completion pairs (look up a colour, reverse a list, add
two numbers), every answer opening with the same boilerplate "sure !".

    python examples/quickstart.py
"""

import json
import os
import tempfile
from importlib import resources


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def load_rows():
    text = resources.files("trl_sstoken").joinpath("data/quickstart.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def show_selection(trainer, examples, tokenizer):
    """Prints each example's response tokens, the kept ones in [brackets]."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in examples])
    selection = trainer.preview_selection(batch)
    for row in range(len(examples)):
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
        shown = []
        for j, is_response in enumerate(selection.regions.response[row].tolist()):
            if is_response:
                token = tokens[j + 1]  # column j scores token j + 1
                shown.append(f"[{token}]" if selection.keep[row, j] else token)
        prompt = tokenizer.decode(batch["input_ids"][row][batch["labels"][row] == -100], skip_special_tokens=True)
        print(f"  prompt:   {prompt.strip()}")
        print(f"  response: {' '.join(shown)}")


def main():
    rows = load_rows()
    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in rows])
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    with tempfile.TemporaryDirectory() as output_dir:
        args = SSTokenConfig(
            output_dir=output_dir,
            max_steps=60,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            logging_steps=20,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            selection_ratio=0.6,
            history="lagged",
            history_update_steps=10,
        )
        trainer = SSTokenTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        )
        before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
        trainer.train()
        after = trainer.evaluate(trainer.train_dataset)["eval_loss"]
        print(f"\nplain NLL over all response tokens: {before:.3f} before, {after:.3f} after training")
        fractions = [
            e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e
        ]
        print(f"fraction of response tokens trained on: {sum(fractions) / len(fractions):.3f}")
        print("\nWhat ssToken selects now ([kept] tokens are trained on):")
        show_selection(trainer, [0, 1, 2], tokenizer)


if __name__ == "__main__":
    main()
