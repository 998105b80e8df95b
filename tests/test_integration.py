"""Integration with the rest of the ecosystem: TensorBoard through report_to, the model card, SFTTrainer's arguments,
and the configuration reference generated from the config fields."""

import dataclasses
import glob
import inspect

import pytest
import torch
from conftest import config, lora_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tools.config_reference import config_reference_markdown
from transformers import TrainerCallback
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_sstoken import SSTokenTrainer
from trl_sstoken import config as config_module
from trl_sstoken.config import field_groups, sstoken_fields
from trl_sstoken.saving.model_card import add_to_model_card
from trl_sstoken.tiny import build_tiny_model


def test_sstoken_metrics_reach_tensorboard_unchanged(make_trainer, tmp_path):
    trainer = make_trainer(report_to="tensorboard", max_steps=3, logging_steps=1)
    trainer.train()
    events = glob.glob(str(tmp_path / "out" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    accumulator = EventAccumulator(events[0])
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    logged = [entry for entry in trainer.state.log_history if "sstoken/selected_fraction" in entry]
    assert len(logged) == 3
    for key in (
        "selected_fraction",
        "attention_mean",
        "warmup",
        "empty_sequences",
        "no_context_sequences",
        "rel_mean",
    ):
        tag = f"train/sstoken/{key}"  # transformers prefixes training logs with "train/"
        assert tag in tags
        written = {event.step: event.value for event in accumulator.Scalars(tag)}
        expected = {
            entry["step"]: entry[f"sstoken/{key}"] for entry in trainer.state.log_history if f"sstoken/{key}" in entry
        }
        assert written.keys() == expected.keys() and written == pytest.approx(expected, rel=1e-6)


def test_every_logged_metric_reaches_every_reporting_callback(make_trainer):
    """What W&B, Trackio, MLflow and the rest receive: the `logs` of `on_log`, where the sstoken/ keys are."""

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = make_trainer(max_steps=2)
    trainer.add_callback(recorder)
    trainer.train()
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(step_logs) == 2
    assert all(
        {"sstoken/selected_fraction", "sstoken/attention_mean", "sstoken/warmup"} <= logs.keys() for logs in step_logs
    )


def test_model_card_records_the_method_and_every_setting(make_trainer, tmp_path):
    trainer = make_trainer(selection_ratio=0.7, history="ema", history_ema_alpha=0.9, max_steps=1)
    trainer.create_model_card(model_name="run")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "This model was trained with ssToken" in card and "2510.18250" in card  # TRL's part: the method
    section = card.split("## ssToken token selection", 1)[1].split("\n## ", 1)[0]
    for field in sstoken_fields():
        value = getattr(trainer.args, field.name)
        assert f"| `{field.name}` | {'not set' if value is None else f'`{value!r}`'} |" in section
    assert "None" not in card
    assert "| `selection_ratio` | `0.7` |" in section and "| `history_ema_alpha` | `0.9` |" in section
    assert card.index("## ssToken token selection") < card.index("## Citations")
    # writing it again replaces the section instead of adding a second one
    trainer.create_model_card(model_name="run")
    assert (tmp_path / "out" / "README.md").read_text().count("## ssToken token selection") == 1
    assert add_to_model_card("# Card\n", trainer.args).count("## ssToken token selection") == 1


def test_sstoken_trainer_accepts_every_sfttrainer_argument(tokenizer, dataset, tmp_path):
    """Each parameter of SFTTrainer.__init__, by keyword (and the first ones by position), reaches SFTTrainer."""
    model = build_tiny_model(tokenizer)
    args = config(tmp_path, max_steps=1, selection_method="attention")  # needs no adapter: peft_config=None below
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = TrainerCallback()
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    compute_metrics = lambda prediction: {"constant": 1.0}  # noqa: E731
    preprocess = lambda logits, labels: logits  # noqa: E731
    formatting = None  # a formatting_func would need a text dataset; passing None exercises the keyword
    values = dict(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[callback],
        optimizers=(optimizer, None),
        preprocess_logits_for_metrics=preprocess,
        quantization_config=None,
        peft_config=None,
        formatting_func=formatting,
    )
    parameters = set(inspect.signature(SFTTrainer.__init__).parameters) - {"self"}
    # compute_loss_func is deprecated in TRL and refused here with a message (ssToken computes the loss itself);
    # optimizer_cls_and_kwargs is exclusive with optimizers and is covered by a second construction below
    assert parameters - set(values) == {"compute_loss_func", "optimizer_cls_and_kwargs"}
    trainer = SSTokenTrainer(**values)
    assert trainer.data_collator.collator is collator and trainer.eval_dataset is not None  # wrapped by the hook
    assert trainer.optimizer is optimizer and callback in trainer.callback_handler.callbacks
    assert trainer.compute_metrics is compute_metrics and trainer.preprocess_logits_for_metrics is preprocess

    positional = SSTokenTrainer(
        build_tiny_model(tokenizer),
        config(tmp_path, max_steps=1, selection_method="random"),
        collator,
        dataset,
        None,
        tokenizer,
    )
    assert positional.data_collator.collator is collator and positional.processing_class is tokenizer
    assert positional.eval_dataset is None and len(positional.train_dataset) == len(dataset)

    with_optimizer_class = SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=config(tmp_path, max_steps=1, selection_method="attention"),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    with_optimizer_class.train()
    optimizer_used = getattr(
        with_optimizer_class.optimizer, "optimizer", with_optimizer_class.optimizer
    )  # accelerate wraps it
    assert isinstance(optimizer_used, torch.optim.SGD) and optimizer_used.defaults["lr"] == 0.1

    with pytest.raises(ValueError, match="compute_loss_func cannot be combined"):
        SSTokenTrainer(
            model=build_tiny_model(tokenizer),
            args=config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            compute_loss_func=lambda *a, **k: None,
        )


def test_configuration_reference_lists_every_field_with_its_help():
    reference = config_reference_markdown()
    fields = sstoken_fields()
    assert {field.name for field in fields} >= {"selection_method", "selection_ratio", "history"}
    for field in fields:
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{field.name}` |"))
        assert field.metadata["help"].split(".")[0] in row.replace("\\|", "|")
        default = field.default if field.default is not dataclasses.MISSING else None
        assert f"`{default!r}`" in row
        for choice in field.metadata.get("choices", []):
            assert f"`{choice}`" in row
    grouped = [field.name for group in field_groups().values() for field in group]
    assert sorted(grouped) == sorted(field.name for field in fields)  # each field in exactly one group
    assert "### Parameters that control which tokens are trained on" in reference


def test_fields_missing_from_the_groups_still_reach_the_reference(monkeypatch):
    fields = sstoken_fields()
    ungrouped = dataclasses.field(default=1, metadata={"help": "A field added without a group."})
    ungrouped.name = "new_field"
    monkeypatch.setattr(config_module, "sstoken_fields", lambda: [*fields, ungrouped])
    groups = field_groups()
    assert list(groups)[-1] == "Other ssToken parameters"
    assert groups["Other ssToken parameters"] == [ungrouped]
    assert sum(len(group) for group in groups.values()) == len(fields) + 1
