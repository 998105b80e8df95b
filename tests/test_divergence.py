"""A diverging run stops with `TrainingDivergedError` and never saves non-finite weights (issue 23, item 2); the
optimizer hyperparameters that can only diverge are refused at construction.

Before: `learning_rate=1e6` turned every adapter weight into NaN at step 2, every later batch was skipped (loss
0.0), one warning was printed, the run exited 0 and saved a NaN adapter.
"""

import math
import os

import pytest
import torch
import yaml
from conftest import config
from transformers.integrations.neftune import neftune_post_forward_hook

from trl_sstoken import SSTokenConfig, TrainingDivergedError, cli
from trl_sstoken.saving.checkpoints import checkpoint_problem


ADAPTER = "adapter_model.safetensors"


def checkpoints(output_dir):
    return sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-"))


def test_weights_turning_nonfinite_stop_the_run_and_nothing_is_saved_from_them(make_trainer, tmp_path):
    trainer = make_trainer(learning_rate=1e6, max_steps=6, save_strategy="steps", save_steps=1)
    out = trainer.args.output_dir
    with pytest.raises(TrainingDivergedError, match="optimizer step 2") as raised:
        trainer.train()
    message = str(raised.value)
    assert "lora_" in message and "learning_rate=1000000.0" in message
    assert os.path.join(out, "checkpoint-1") in message  # the last good checkpoint, named
    assert checkpoints(out) == ["checkpoint-1"]  # no checkpoint of the diverged state
    assert checkpoint_problem(os.path.join(out, "checkpoint-1")) is None  # it still verifies: resume from it
    assert trainer.state.global_step == 1  # the step that diverged was not counted as done
    # a user who catches the error and saves anyway gets the error again, and no file
    with pytest.raises(TrainingDivergedError, match="Refusing to save the model"):
        trainer.save_model()
    assert not os.path.exists(os.path.join(out, ADAPTER))
    with pytest.raises(TrainingDivergedError, match="Refusing to save checkpoint-1"):
        trainer._save_checkpoint(trainer.model, None)
    assert trainer._history is None or all(
        bool(torch.isfinite(p).all()) for n, p in trainer.model.named_parameters() if ".history." in n
    )


def test_neftune_hook_is_removed_when_the_run_diverges(make_trainer):
    trainer = make_trainer(learning_rate=1e6, max_steps=4, neftune_noise_alpha=5.0)
    with pytest.raises(TrainingDivergedError):
        trainer.train()
    embeddings = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()
    assert neftune_post_forward_hook not in embeddings._forward_hooks.values()
    assert not hasattr(embeddings, "neftune_noise_alpha")


def test_every_batch_skipped_for_the_limit_of_steps_stops_the_run(make_trainer):
    # learning_rate=1e30: the weights stay finite (about 1e30) but every forward overflows, so every batch from step 2
    # on is skipped; before, the run went on to the end with loss 0 and exited normally
    trainer = make_trainer(learning_rate=1e30, max_steps=8, max_consecutive_skipped_steps=2)
    with pytest.warns(UserWarning, match="Non-finite log-probabilities"):
        with pytest.raises(TrainingDivergedError, match="last 2 optimizer steps") as raised:
            trainer.train()
    assert "up to step 3" in str(raised.value)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())  # the skip rule, not the weights


def test_the_skip_limit_counts_consecutive_steps_only(make_trainer):
    trainer = make_trainer(max_consecutive_skipped_steps=2)
    guard, args, state = trainer._divergence, trainer.args, trainer.state
    guard.on_train_begin(args, state, None)

    def step(*skipped):
        for flag in skipped:
            guard.record_batch(skipped=flag)
        guard.on_optimizer_step(args, state, None)

    step(True)
    step(True, False)  # one batch of the step trained: the count starts over
    assert guard.skipped_steps == 0
    step(True)
    assert guard.skipped_steps == 1
    with pytest.raises(TrainingDivergedError, match="max_consecutive_skipped_steps=2"):
        step(True, True)


def test_without_a_skip_limit_skips_alone_never_stop_the_run(make_trainer):
    trainer = make_trainer(learning_rate=1e30, max_steps=4, max_consecutive_skipped_steps=None)
    with pytest.warns(UserWarning, match="Non-finite log-probabilities"):
        trainer.train()
    skipped = [entry["sstoken/nonfinite_skipped"] for entry in trainer.state.log_history if "loss" in entry]
    assert skipped[1:] == [1.0, 1.0, 1.0]


def test_saving_refuses_nonfinite_weights(make_trainer, tmp_path):
    trainer = make_trainer()
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_B.default" in n)[0, 0] = math.inf
    with pytest.raises(TrainingDivergedError, match="lora_B.default"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / ADAPTER).exists()


# ----- hyperparameters refused at construction -----


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("learning_rate", math.inf, "finite and > 0"),
        ("learning_rate", math.nan, "finite and > 0"),
        ("learning_rate", 0.0, "finite and > 0"),
        ("learning_rate", -1e-4, "finite and > 0"),
        ("weight_decay", math.inf, "finite and >= 0"),
        ("weight_decay", -0.1, "finite and >= 0"),
        ("adam_epsilon", 0.0, "finite and > 0"),
        ("adam_epsilon", math.inf, "finite and > 0"),
        ("adam_beta1", 1.0, "in [0, 1)"),
        ("adam_beta2", math.nan, "in [0, 1)"),
        ("max_grad_norm", math.inf, "0 turns clipping off"),
        ("max_grad_norm", -1.0, "0 turns clipping off"),
        ("warmup_steps", math.inf, "finite and >= 0"),
        ("neftune_noise_alpha", math.inf, "finite and >= 0"),
        ("max_consecutive_skipped_steps", 0, ">= 1"),
        ("max_consecutive_skipped_steps", 1.5, "must be an integer"),
    ],
)
def test_hyperparameters_that_can_only_diverge_are_refused(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as raised:
        config(tmp_path, **{field: value})
    message = str(raised.value)
    assert field in message and allowed in message
    if not isinstance(value, float) or not math.isnan(value):
        assert repr(value) in message


def test_edge_values_that_are_fine_are_accepted(tmp_path):
    args = config(
        tmp_path, max_grad_norm=0.0, weight_decay=0, neftune_noise_alpha=0.0, max_consecutive_skipped_steps=None
    )
    assert args.max_grad_norm == 0.0 and args.max_consecutive_skipped_steps is None
    assert SSTokenConfig.__dataclass_fields__["max_consecutive_skipped_steps"].default == 5


# ----- the command line -----


def _settings(model_dir, data_file, output_dir, **overrides):
    settings = dict(
        model_name_or_path=str(model_dir),
        dataset_name=str(data_file),
        output_dir=str(output_dir),
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=64,
        save_strategy="no",
        seed=0,
    )
    settings.update(overrides)
    return settings


@pytest.mark.parametrize(
    "flag, value", [("--learning_rate", "inf"), ("--weight_decay", "inf"), ("--adam_epsilon", "0")]
)
def test_cli_refuses_hyperparameters_before_loading_anything(tmp_path, jsonl_file, capsys, flag, value):
    config_file = tmp_path / "run.yaml"
    # the model path does not exist: the hyperparameter is refused before anything is loaded
    config_file.write_text(yaml.safe_dump(_settings(tmp_path / "no-model", jsonl_file, tmp_path / "out")))
    assert cli.main(["train", "--config", str(config_file), flag, value]) == 2
    error = capsys.readouterr().err
    assert error.startswith("trl-sstoken train: error:") and flag.lstrip("-") in error and "no-model" not in error


def test_cli_stops_a_diverging_run_with_a_clear_error_and_saves_nothing(tmp_path, tiny_model_dir, jsonl_file, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_settings(tiny_model_dir, jsonl_file, tmp_path / "out")))
    status = cli.main(["train", "--config", str(config_file), "--learning_rate", "1e6"])
    error = capsys.readouterr().err
    assert status == 1
    assert "trl-sstoken train: error: Training diverged at optimizer step" in error
    assert "Traceback" not in error
    assert not (tmp_path / "out" / ADAPTER).exists()
