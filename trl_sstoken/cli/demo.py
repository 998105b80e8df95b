"""`trl-sstoken demo`: fine-tune a tiny local model (or a given one) on the bundled data, write a report."""

import os
from importlib import resources
from types import SimpleNamespace

from .arguments import PROG, _check_at_least
from .inspect import _summary_text
from .train import _require_model


BUNDLED_DATASET = "data/quickstart.jsonl"


def run_demo(demo_args, sstoken_args):
    """Fine-tunes with ssToken on the bundled data, writes a report and a figure: a tiny model and tokenizer built on
    the spot by default, or the causal LM of `--model_name_or_path` with the data in its chat template. The output_dir
    is locked from the start (`saving/output_lock.py`)."""
    from ..saving.output_lock import run_locked
    from ..saving.writable import check_writable_dir

    check_writable_dir(sstoken_args.output_dir, "--output_dir")
    with run_locked(sstoken_args, owner=None):
        return _demo(demo_args, sstoken_args)


def _demo(demo_args, sstoken_args):
    import json

    from datasets import Dataset
    from peft import LoraConfig

    from ..report.collect import collect_examples, report_settings, special_tokens_of, write_figure, write_report
    from ..trainer import SSTokenTrainer

    _check_at_least("--num_report_examples", demo_args.num_report_examples, 1)
    _check_at_least("--hidden_size", demo_args.hidden_size, 8)
    if demo_args.num_eval_examples is not None:
        _check_at_least("--num_eval_examples", demo_args.num_eval_examples, 1)
    if demo_args.hidden_size % 8:
        raise ValueError(f"--hidden_size must be a multiple of 8 (4 heads of even size), got {demo_args.hidden_size}.")
    data_file = resources.files("trl_sstoken").joinpath(BUNDLED_DATASET)
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    output_dir = sstoken_args.output_dir
    method = (
        f"with ssToken ({sstoken_args.selection_method}, keeping {sstoken_args.selection_ratio:.0%} of each response, "
        f"history={sstoken_args.history})"
    )
    if demo_args.model_name_or_path is None:
        model, tokenizer, base_dir = _tiny_demo_model(rows, demo_args, sstoken_args, output_dir)
        model_label = "tiny model built by `trl-sstoken demo`"
        print(
            f"{PROG} demo: a tiny {model.config.model_type} model ({model.num_parameters():,} parameters, built "
            f"locally) learns {len(rows)} bundled examples {method}."
        )
    else:
        model, tokenizer, rows, data_format = _real_demo_model(demo_args.model_name_or_path, rows, sstoken_args)
        base_dir = model_label = demo_args.model_name_or_path
        print(f"{PROG} demo: {model_label} learns {len(rows)} bundled examples ({data_format}) {method}.")
    trainer = SSTokenTrainer(
        model=model,
        args=sstoken_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    eval_rows = trainer.train_dataset
    if demo_args.num_eval_examples is not None:
        eval_rows = eval_rows.select(range(min(demo_args.num_eval_examples, len(eval_rows))))
    before = trainer.evaluate(eval_rows)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_rows)["eval_loss"]
    trainer.save_model(output_dir)
    trainer.create_model_card(
        model_name=os.path.basename(os.path.normpath(output_dir)), dataset_name=f"trl_sstoken/{BUNDLED_DATASET}"
    )

    examples = collect_examples(trainer, demo_args.num_report_examples, sstoken_args.per_device_train_batch_size)
    report_path = os.path.join(output_dir, "selection_report.html")
    settings = report_settings(trainer, model=model_label, dataset=f"trl_sstoken/{BUNDLED_DATASET}")
    summary = write_report(
        report_path, examples, settings, special_tokens_of(tokenizer), title="ssToken demo: selection report"
    )
    write_figure(
        os.path.join(output_dir, "selection.svg"), examples[:3], title="What ssToken keeps (trl-sstoken demo)"
    )

    fractions = [
        entry["sstoken/selected_fraction"]
        for entry in trainer.state.log_history
        if "sstoken/selected_fraction" in entry
    ]
    over = "" if len(eval_rows) == len(rows) else f" of the first {len(eval_rows)} examples"
    print(f"\nPlain NLL over every response token{over}: {before:.3f} before training, {after:.3f} after.")
    if fractions:
        print(f"Fraction of response tokens trained on: {sum(fractions) / len(fractions):.3f}")
    print(_summary_text(summary))
    print("\nWhat ssToken keeps now ([kept] tokens are trained on; the prompt is never trained on):")
    for example in examples[:3]:
        shown = [f"[{token.text}]" if token.role == "kept" else token.text for token in example.response]
        print("  " + " ".join(shown))
    print(f"\nSelection report: {report_path}")
    print(f"Adapter, tokenizer and model card: {output_dir}/   base model: {base_dir}")
    if demo_args.model_name_or_path is None:
        print(
            f"Inspect it again: {PROG} inspect --model_name_or_path {base_dir} --adapter_path {output_dir} "
            f"--dataset_name {data_file}"
        )
    return trainer, summary


def _tiny_demo_model(rows, demo_args, sstoken_args, output_dir):
    """The demo's default: a tiny model and tokenizer built for the bundled data, saved so `inspect` can load them."""
    from ..tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in rows])
    model = build_tiny_model(tokenizer, hidden_size=demo_args.hidden_size, seed=sstoken_args.seed)
    base_dir = os.path.join(output_dir, "base_model")
    model.config._name_or_path = base_dir  # what the model card names as the base model
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return model, tokenizer, base_dir + "/"


def _real_demo_model(name_or_path, rows, sstoken_args):
    """A causal LM and its tokenizer, with the bundled rows as conversations when the tokenizer has a chat template
    (TRL applies it, and trains on the assistant turn), as prompt-completion text when it has none."""
    from ..loading import load_tokenizer

    _require_model(SimpleNamespace(model_name_or_path=name_or_path))
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=sstoken_args.trust_remote_code)
    if getattr(tokenizer, "chat_template", None):
        rows = [
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["completion"].strip()}],
            }
            for row in rows
        ]
        data_format = "as conversations in its chat template"
    else:
        data_format = "as prompt-completion text: its tokenizer has no chat template"
    sstoken_args.model_init_kwargs = {"dtype": "float32", **(sstoken_args.model_init_kwargs or {})}
    return name_or_path, tokenizer, rows, data_format
