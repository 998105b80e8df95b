"""The checkpoint protocol (trl_sstoken/saving/checkpoints.py): what a marker records, what resuming verifies and refuses,
how rotation deletes, and the resume argument as the command line passes it. The kill tests are in test_faults.py."""

import copy as copy_module
import json
import os
import pathlib
import shutil

import pytest
import torch
from conftest import config, count_calls, dead_writers_temporary_name, lora_config
from safetensors.torch import load_file, save_file
from trl import SFTConfig, SFTTrainer

import trl_sstoken.saving.checkpoints as checkpoints
from trl_sstoken import SSTokenTrainer
from trl_sstoken import config as config_module
from trl_sstoken.history.model_copy import CHECKPOINT_FILE
from trl_sstoken.saving.checkpoints import (
    CHECKPOINT_MARKER,
    WRITING_SENTINEL,
    CheckpointError,
    delete_checkpoint,
    parse_resume_argument,
    resolve_resume,
    rotate_checkpoints,
)
from trl_sstoken.saving.resume import DATA_SETTINGS, TOTAL_BATCH, checkpoint_settings, essential_files, run_settings
from trl_sstoken.saving.temporary_files import temporary_name
from trl_sstoken.tiny import build_tiny_model


SETTINGS = dict(max_steps=4, save_strategy="steps", save_steps=2, history="lagged", history_update_steps=3)


def trainer_for(tmp_path, tokenizer, dataset, output_dir, peft=True, **overrides):
    return SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=config(tmp_path, output_dir=str(output_dir), **{**SETTINGS, **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config() if peft else None,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, dataset):
    """A finished LoRA run with checkpoint-2 and checkpoint-4; tests copy it before damaging anything."""
    root = tmp_path_factory.mktemp("run")
    trainer_for(root, tokenizer, dataset, root / "out").train()
    return root / "out"


@pytest.fixture
def copy(run, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(run, target)
    return target


def test_the_marker_records_every_file_and_the_settings(run):
    marker = json.loads((run / "checkpoint-4" / CHECKPOINT_MARKER).read_text())
    assert marker["global_step"] == 4
    files = marker["files"]
    for name in (
        "adapter_model.safetensors",
        "history/adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    ):
        assert files[name]["size"] == os.path.getsize(run / "checkpoint-4" / name)
        assert len(files[name]["sha256"]) == 64
    assert marker["settings"]["history"] == "lagged" and marker["settings"]["selection_ratio"] == 0.6
    assert marker["settings"]["history_update_steps"] == 3 and marker["settings"]["selection_gamma"] == 0.5
    assert not (run / "checkpoint-4" / WRITING_SENTINEL).exists()


@pytest.mark.parametrize(
    "name",
    [
        "adapter_model.safetensors",
        "history/adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
    ],
)
def test_a_checkpoint_missing_a_file_is_refused_naming_it(copy, tmp_path, tokenizer, dataset, name):
    os.remove(copy / "checkpoint-4" / name)
    trainer = trainer_for(tmp_path, tokenizer, dataset, copy)
    with pytest.raises(CheckpointError, match=f"the file {name} is missing"):
        trainer.train(resume_from_checkpoint=str(copy / "checkpoint-4"))
    with pytest.warns(UserWarning, match=f"Skipping the checkpoint .*checkpoint-4: the file {name} is missing"):
        assert resolve_resume(True, str(copy), run_settings(trainer), essential_files(trainer)) == str(
            copy / "checkpoint-2"
        )


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage-json"])
def test_a_damaged_file_is_refused(copy, tmp_path, tokenizer, dataset, damage):
    path = copy / "checkpoint-4" / "trainer_state.json"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    else:
        data = bytearray(b"{" * len(data))
    path.write_bytes(bytes(data))
    trainer = trainer_for(tmp_path, tokenizer, dataset, copy)
    with pytest.raises(CheckpointError, match="the file trainer_state.json (changed|has)"):
        trainer.train(resume_from_checkpoint=str(copy / "checkpoint-4"))


def test_a_half_deleted_checkpoint_with_its_marker_does_not_verify(copy, tmp_path, tokenizer, dataset):
    """What a crash in the middle of `Trainer`'s own rotation (shutil.rmtree) leaves behind."""
    shutil.rmtree(copy / "checkpoint-4" / "history")
    os.remove(copy / "checkpoint-4" / "adapter_model.safetensors")
    shutil.rmtree(copy / "checkpoint-2")
    trainer = trainer_for(tmp_path, tokenizer, dataset, copy)
    with pytest.warns(UserWarning, match="Skipping"), pytest.raises(CheckpointError, match="No complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(history="base"), "history"),
        (dict(history="ema", history_ema_alpha=0.9), "history"),
        (dict(selection_ratio=0.5), "selection_ratio"),
        (dict(selection_gamma=0.25), "selection_gamma"),
        (dict(selection_method="rel"), "selection_method"),
        (dict(history_update_steps=4), "history_update_steps"),
        (dict(attention_score="sink_free"), "attention_score"),  # issue 24: was accepted silently
        (dict(learning_rate=2e-2), "learning_rate"),  # issue 23: ignored silently (the scheduler's state won)
    ],
)
def test_resuming_with_other_settings_is_refused_naming_the_setting(copy, tmp_path, tokenizer, dataset, change, field):
    trainer = trainer_for(tmp_path, tokenizer, dataset, copy, **change)
    with pytest.raises(CheckpointError, match=f"other settings \\((.*; )?{field}: .* there, .* now"):
        trainer.train(resume_from_checkpoint=True)


# A value other than the tests' run for every setting a resume must match; a must-match field added without an
# entry here fails test_every_must_match_setting_is_refused_when_changed
CHANGED = {
    "selection_method": "rel",
    "selection_ratio": 0.5,
    "selection_gamma": 0.25,
    "selection_positions": "balanced",
    "selection_position_buckets": 4,
    "attention_layer": 0,
    "attention_score": "sink_free",
    "attention_warmup_ratio": 0.1,
    "allow_rel_fallback": True,
    "selection_loss_normalization": "sequence",
    "history": "ema",
    "history_update_steps": 4,
    "history_ema_alpha": 0.9,
    "history_cache_dir set": ("history_cache_dir", "some/cache"),
    "profit_threshold": 0.2,
    "reference_model": "some/model",
    "reference_adapter": "some/adapter",
    "reference_dataset": "clean.jsonl",
    "reference_dataset_split": "clean",
    "reference_max_steps": 8,
    "seed": 1,
    "data_seed": 7,
    "max_length": 32,
    "packing": True,
    "completion_only_loss": False,
    "assistant_only_loss": True,
    "learning_rate": 2e-2,
    "lr_scheduler_type": "cosine",
    "lr_scheduler_kwargs": {"num_cycles": 2},
    "warmup_steps": 2,
    "weight_decay": 0.1,
    "adam_beta1": 0.8,
    "adam_beta2": 0.99,
    "adam_epsilon": 1e-6,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    TOTAL_BATCH: ("per_device_train_batch_size", 8),
}


@pytest.mark.parametrize("setting", sorted(checkpoint_settings(config(pathlib.Path("unused"), **SETTINGS))))
def test_every_must_match_setting_is_refused_when_changed(run, setting):
    """Every setting the configuration's metadata (and config.SFT_RESUME_MUST_MATCH) says a resume must match,
    changed alone, is refused, naming it with both values."""
    assert setting in CHANGED, f"{setting} must match on resume: add a changed value for it to CHANGED"
    name, value = CHANGED[setting] if isinstance(CHANGED[setting], tuple) else (setting, CHANGED[setting])
    args = config(run.parent, **SETTINGS)
    changed = copy_module.copy(args)
    setattr(changed, name, value)  # no validation: what a resume compares, not whether the value trains
    assert checkpoint_settings(changed)[setting] != checkpoint_settings(args)[setting]
    resolve_resume(str(run / "checkpoint-4"), str(run), checkpoint_settings(args), pending=DATA_SETTINGS)
    with pytest.raises(CheckpointError, match=f"other settings \\({setting}: .* there, .* now\\)"):
        resolve_resume(str(run / "checkpoint-4"), str(run), checkpoint_settings(changed), pending=DATA_SETTINGS)


def test_the_must_match_settings_are_read_off_the_field_metadata(monkeypatch):
    """No hand-kept list: a field's `resume` metadata decides, and every inherited setting of the one list."""
    settings = checkpoint_settings(config(pathlib.Path("unused"), **SETTINGS))
    for field in config_module.sstoken_fields():
        rule = field.metadata["resume"]
        assert (field.name in settings) == (rule == config_module.RESUME_MUST_MATCH), field.name
        assert (f"{field.name} set" in settings) == (rule == config_module.RESUME_WHETHER_SET), field.name
    assert set(config_module.SFT_RESUME_MUST_MATCH) <= set(settings)
    assert settings[TOTAL_BATCH] == 4  # per-device 4 x accumulation 1 x one process


def test_how_the_batch_is_split_may_change(run):
    """The examples per optimizer step must match; per-device batch and accumulation may trade (a smaller GPU)."""
    args = config(run.parent, **SETTINGS)
    split = copy_module.copy(args)
    split.per_device_train_batch_size, split.gradient_accumulation_steps = 2, 2
    resumed = resolve_resume(str(run / "checkpoint-4"), str(run), checkpoint_settings(split), pending=DATA_SETTINGS)
    assert resumed == str(run / "checkpoint-4")


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "yes"])
def test_the_strings_true_and_false_are_read_as_such(copy, tmp_path, tokenizer, dataset, value):
    trainer = trainer_for(tmp_path, tokenizer, dataset, copy, max_steps=5)
    forwards = count_calls(trainer, "_forward_and_select")
    trainer.train(resume_from_checkpoint=value)
    assert trainer.state.global_step == 5 and len(forwards) == 1  # one step: resumed from checkpoint-4
    assert parse_resume_argument("false") is None and parse_resume_argument("") is None
    assert parse_resume_argument(False) is None and parse_resume_argument("checkpoint-2") == "checkpoint-2"


def test_what_is_not_a_checkpoint_of_this_trainer_says_so(tmp_path, tokenizer, dataset):
    settings = checkpoint_settings(config(tmp_path, **SETTINGS))
    with pytest.raises(CheckpointError, match="the path does not exist"):
        resolve_resume(str(tmp_path / "chekpoint-4"), str(tmp_path), settings)
    interrupted = tmp_path / "out" / "checkpoint-6"
    interrupted.mkdir(parents=True)
    (interrupted / WRITING_SENTINEL).write_text("")
    with pytest.raises(CheckpointError, match="writing it was interrupted"):
        resolve_resume(str(interrupted), str(tmp_path / "out"), settings)
    plain = SFTTrainer(
        model=build_tiny_model(tokenizer),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        args=config(
            tmp_path,
            config_class=SFTConfig,
            output_dir=str(tmp_path / "plain"),
            max_steps=1,
            save_strategy="steps",
            save_steps=1,
        ),
    )
    plain.train()
    with pytest.raises(CheckpointError, match="not a checkpoint of SSTokenTrainer"):
        resolve_resume(str(tmp_path / "plain" / "checkpoint-1"), str(tmp_path / "plain"), settings)
    with pytest.raises(CheckpointError, match="not a checkpoint of SSTokenTrainer"), pytest.warns(UserWarning):
        resolve_resume("true", str(tmp_path / "plain"), settings)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(True, str(tmp_path / "nowhere"), settings)


def test_an_old_marker_without_a_file_record_is_refused(copy):
    (copy / "checkpoint-4" / CHECKPOINT_MARKER).write_text('{"global_step": 4}\n')
    settings = checkpoint_settings(config(copy, **SETTINGS))
    with pytest.raises(CheckpointError, match="older trl_sstoken that did not record"):
        resolve_resume(str(copy / "checkpoint-4"), str(copy), settings)


def test_rotation_keeps_the_newest_complete_checkpoint_and_clears_leftovers(tmp_path):
    def checkpoint(step, complete=True):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "x.bin").write_bytes(b"x")
        (folder / (CHECKPOINT_MARKER if complete else WRITING_SENTINEL)).write_text("{}")
        return folder

    for step in (2, 4):
        checkpoint(step)
    checkpoint(5, complete=False)  # an interrupted save, older than the newest
    newest = checkpoint(6)
    checkpoint(8, complete=False)  # left by an abandoned, longer run: replaced when this run gets there
    (tmp_path / ".sstoken-deleting-checkpoint-1-abcd").mkdir()  # an interrupted deletion
    rotate_checkpoints(str(tmp_path), 2, newest=str(newest), best=str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    rotate_checkpoints(str(tmp_path), 1, newest=str(newest))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]
    delete_checkpoint(str(tmp_path / "checkpoint-8"))
    assert os.listdir(tmp_path) == ["checkpoint-6"]


def test_save_total_limit_one_deletes_the_older_checkpoint_only_after_the_newer_is_marked(
    tmp_path, tokenizer, dataset
):
    trainer = trainer_for(tmp_path, tokenizer, dataset, tmp_path / "out", save_total_limit=1)
    seen = []
    real_delete = checkpoints.delete_checkpoint

    def recording_delete(path):
        newer = [
            name
            for name in os.listdir(tmp_path / "out")
            if name.startswith("checkpoint-") and os.path.exists(tmp_path / "out" / name / CHECKPOINT_MARKER)
        ]
        seen.append((os.path.basename(path), sorted(newer)))
        real_delete(path)

    checkpoints.delete_checkpoint = recording_delete
    try:
        trainer.train()
    finally:
        checkpoints.delete_checkpoint = real_delete
    assert seen == [("checkpoint-2", ["checkpoint-2", "checkpoint-4"])]
    assert [name for name in os.listdir(tmp_path / "out") if "checkpoint" in name] == ["checkpoint-4"]


def test_a_full_fine_tuning_history_file_with_foreign_weights_is_refused(tmp_path, tokenizer, dataset):
    trainer = trainer_for(
        tmp_path, tokenizer, dataset, tmp_path / "a", peft=False, history="ema", max_steps=2, learning_rate=1e-3
    )
    trainer.train()
    path = tmp_path / "a" / "checkpoint-2" / CHECKPOINT_FILE
    state = load_file(path)
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    del state[next(iter(state))]
    save_file(state, path)
    resumed = trainer_for(
        tmp_path, tokenizer, dataset, tmp_path / "b", peft=False, history="ema", max_steps=3, learning_rate=1e-3
    )
    with pytest.raises(ValueError, match=f"{CHECKPOINT_FILE} in the checkpoint .* is not this model's history"):
        resumed._history.load_checkpoint(str(tmp_path / "a" / "checkpoint-2"))


def test_a_marker_write_removes_the_temporary_files_dead_writers_left(tmp_path):
    prefix = f"{checkpoints.TEMPORARY_PREFIX}{CHECKPOINT_MARKER}"
    dead = dead_writers_temporary_name(prefix)
    live = temporary_name(prefix)  # this process's: a write in progress
    other = dead_writers_temporary_name(f"{checkpoints.TEMPORARY_PREFIX}trainer_state.json")  # not this file's
    for name in (dead, live, other):
        (tmp_path / name).write_bytes(b"{}")
    checkpoints._write_atomically(str(tmp_path / CHECKPOINT_MARKER), b"{}")
    assert sorted(os.listdir(tmp_path)) == sorted([CHECKPOINT_MARKER, live, other])
