"""Rho-1 from a clean set (`reference_dataset`): the trainer trains the reference adapter, saves it in output_dir with
a fingerprint, reuses it on a rerun, refuses a stale or damaged one, and checks its inputs before any model is
loaded."""

import json
import os

import pytest
import torch
from conftest import QUICKSTART_ROWS, config, lora_config
from datasets import Dataset
from safetensors.torch import load_file

from trl_sstoken import SSTokenConfig, SSTokenTrainer
from trl_sstoken.history.reference import REFERENCE_ADAPTER
from trl_sstoken.history.reference_training import (
    IDENTITY_FILE,
    REFERENCE_FOLDER,
    WEIGHTS_FILE,
    ReferenceTrainingError,
)


CLEAN = QUICKSTART_ROWS[:8]


def rho1_trainer(make_trainer, reference=None, **overrides):
    settings = dict(selection_method="rho1", reference_dataset=reference or Dataset.from_list(CLEAN),
                    reference_max_steps=3, max_steps=2, selection_ratio=0.5)  # fmt: skip
    settings.update(overrides)
    return make_trainer(**settings)


def reference_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}


def test_trains_the_reference_saves_it_and_trains_with_rho1(make_trainer, tmp_path):
    trainer = rho1_trainer(make_trainer)
    main_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".default." in n}
    trainer.train()
    folder = tmp_path / "out" / REFERENCE_FOLDER
    record = json.loads((folder / IDENTITY_FILE).read_text())
    assert set(record) >= {"data", "base_model", "tokenizer", "recipe", "weights_sha256"}
    assert record["recipe"]["max_steps"] == 3 and record["recipe"]["selection_method"] == "full"
    assert record["examples"] == len(CLEAN)
    # the reference is the saved adapter, frozen, and it is not the untrained (zero-B) initialisation
    saved = load_file(folder / WEIGHTS_FILE)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    loaded = reference_weights(trainer)
    assert loaded and not any(p.requires_grad for n, p in trainer.model.named_parameters() if REFERENCE_ADAPTER in n)
    assert set(trainer.model.peft_config) == {"default", REFERENCE_ADAPTER}  # the training adapter is gone
    # the main adapter trained, and the excess loss against the reference was used
    assert any(not torch.equal(p, main_before[n]) for n, p in trainer.model.named_parameters() if n in main_before)
    fractions = [e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    assert fractions and all(f < 1 for f in fractions)


def test_a_rerun_reuses_the_reference_and_trains_the_same(make_trainer, tmp_path, monkeypatch):
    first = rho1_trainer(make_trainer)
    first.train()
    first_weights = {n: p.detach().clone() for n, p in first.model.named_parameters() if ".default." in n}
    folder = tmp_path / "out" / REFERENCE_FOLDER
    stamp = os.stat(folder / WEIGHTS_FILE).st_mtime_ns

    second = rho1_trainer(make_trainer)
    trained, train = [], SSTokenTrainer.train

    def counted(self, *args, **kwargs):  # the reference's own trainer would call train() again
        trained.append(self.args.output_dir)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SSTokenTrainer, "train", counted)
    second.train()
    assert len(trained) == 1  # the main run only: the reference was reused, not retrained
    assert os.stat(folder / WEIGHTS_FILE).st_mtime_ns == stamp
    # the random state is restored around the reference's training: a reused reference gives the same main run
    for name, param in second.model.named_parameters():
        if name in first_weights:
            assert torch.equal(param, first_weights[name]), name


def test_a_stale_reference_is_refused(make_trainer):
    rho1_trainer(make_trainer).train()
    other_data = Dataset.from_list(QUICKSTART_ROWS[8:16])
    with pytest.raises(ReferenceTrainingError, match="different data"):
        rho1_trainer(make_trainer, reference=other_data).train()
    with pytest.raises(ReferenceTrainingError, match="different recipe"):
        rho1_trainer(make_trainer, reference_max_steps=4).train()
    with pytest.raises(ReferenceTrainingError, match="different base_model"):
        rho1_trainer(make_trainer, architecture="llama").train()


def test_a_damaged_reference_is_refused(make_trainer, tmp_path):
    rho1_trainer(make_trainer).train()
    weights = tmp_path / "out" / REFERENCE_FOLDER / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ReferenceTrainingError, match="checksum"):
        rho1_trainer(make_trainer).train()
    (tmp_path / "out" / REFERENCE_FOLDER / IDENTITY_FILE).unlink()
    with pytest.raises(ReferenceTrainingError, match="incomplete or damaged"):
        rho1_trainer(make_trainer).train()


def test_a_data_file_works_like_a_dataset(make_trainer, tmp_path):
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CLEAN))
    from_file = rho1_trainer(make_trainer, reference=str(path), output_dir=str(tmp_path / "a"))
    from_file.train()
    from_dataset = rho1_trainer(make_trainer, output_dir=str(tmp_path / "b"))
    from_dataset.train()
    record = [json.loads((tmp_path / d / REFERENCE_FOLDER / IDENTITY_FILE).read_text()) for d in "ab"]
    assert record[0]["data"] == record[1]["data"] and record[0]["weights_sha256"] == record[1]["weights_sha256"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(selection_method="sstoken", reference_dataset="trl-lib/x"), "only used by selection_method='rho1'"),
        (dict(reference_dataset="./missing/clean.jsonl"), "reference_dataset='./missing/clean.jsonl' looks like"),
        (dict(reference_dataset=Dataset.from_list([])), "reference_dataset is empty"),
        (dict(reference_dataset=123), "reference_dataset must be a datasets.Dataset"),
        (dict(reference_dataset=Dataset.from_list(CLEAN), reference_max_steps=0), "reference_max_steps=0"),
        (dict(reference_dataset=Dataset.from_list(CLEAN), reference_dataset_split=""), "reference_dataset_split"),
        (
            dict(reference_dataset=Dataset.from_list(CLEAN), reference_adapter="some/adapter"),
            "needs exactly one reference",
        ),
    ],
)
def test_bad_settings_name_the_field(tmp_path, overrides, match):
    settings = {"selection_method": "rho1", **overrides}
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **settings)


def test_a_missing_split_and_full_finetuning_are_refused_before_the_model_is_loaded(tmp_path, tokenizer, dataset):
    from datasets import DatasetDict

    path = tmp_path / "clean"
    DatasetDict({"train": Dataset.from_list(CLEAN)}).save_to_disk(str(path))
    args = config(tmp_path, selection_method="rho1", reference_dataset=str(path), reference_dataset_split="test")
    with pytest.raises(ValueError, match="reference_dataset_split 'test' is not a split"):
        SSTokenTrainer(model="no/such-model", args=args, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=lora_config())  # fmt: skip
    args = config(tmp_path, selection_method="rho1", reference_dataset=Dataset.from_list(CLEAN))
    with pytest.raises(ValueError, match="needs a PEFT adapter"):
        SSTokenTrainer(model="no/such-model", args=args, train_dataset=dataset, processing_class=tokenizer)


def test_the_config_stays_serialisable(tmp_path):
    args = config(tmp_path, selection_method="rho1", reference_dataset=Dataset.from_list(CLEAN))
    assert "<datasets.Dataset: 8 rows" in json.loads(args.to_json_string())["reference_dataset"]
    assert isinstance(SSTokenConfig.__dataclass_fields__["reference_dataset"].metadata["help"], str)


def test_the_command_line_trains_the_reference_from_a_data_file(tmp_path, tiny_model_dir, jsonl_file):
    from test_cli import train_settings, write_yaml

    from trl_sstoken import cli

    settings = train_settings(tiny_model_dir, jsonl_file, tmp_path / "out", save_strategy="no", history="base")
    config_file = write_yaml(tmp_path / "run.yaml", settings)
    flags = ["--selection_method", "rho1", "--reference_dataset_name", str(jsonl_file), "--reference_max_steps", "2"]
    assert cli.main(["train", "--config", str(config_file), *flags]) == 0
    record = json.loads((tmp_path / "out" / REFERENCE_FOLDER / IDENTITY_FILE).read_text())
    assert record["recipe"]["max_steps"] == 2
    assert not (tmp_path / "out" / REFERENCE_ADAPTER).exists()  # the final artefact holds the trained adapter only


def test_a_resumed_run_reuses_its_reference(make_trainer, tmp_path, monkeypatch):
    first = rho1_trainer(make_trainer, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    stamp = os.stat(tmp_path / "out" / REFERENCE_FOLDER / WEIGHTS_FILE).st_mtime_ns
    trained, train = [], SSTokenTrainer.train

    def counted(self, *args, **kwargs):
        trained.append(self.args.output_dir)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SSTokenTrainer, "train", counted)
    resumed = rho1_trainer(make_trainer, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert trained == [str(tmp_path / "out")]  # no second training of the reference
    assert os.stat(tmp_path / "out" / REFERENCE_FOLDER / WEIGHTS_FILE).st_mtime_ns == stamp
    assert resumed.state.global_step == 4


class RecordingHub:
    """Stands in for transformers' `hf_api()`: records what each `upload_folder` call would upload, filtered by
    huggingface_hub's own pattern matching and default ignores, and uploads nothing."""

    def __init__(self):
        self.uploads = []  # (path_in_repo, sorted relative paths)

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False, **kwargs):
        from concurrent.futures import Future
        from pathlib import Path

        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
        patterns = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        self.uploads.append((path_in_repo or "", sorted(filter_repo_objects(files, ignore_patterns=patterns))))
        done = Future()
        done.set_result(None)
        return done if run_as_future else None


def test_push_to_hub_uploads_the_trained_model_not_the_reference(make_trainer, tmp_path, monkeypatch):
    """The reference is a working file of the run (trained from the user's clean data): neither the per-save push
    of hub_strategy nor the final push_to_hub() uploads it, nor the output_dir lock."""
    hub = RecordingHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    trainer = rho1_trainer(make_trainer, reference_max_steps=1, save_strategy="steps", save_steps=1,
                           push_to_hub=True, hub_model_id="someone/run", hub_strategy="checkpoint")  # fmt: skip
    trainer.train()
    assert (tmp_path / "out" / REFERENCE_FOLDER / WEIGHTS_FILE).is_file()  # it is there, next to the model
    per_save = [files for where, files in hub.uploads if where == ""]
    assert len(per_save) == 2 and [where for where, _ in hub.uploads].count("last-checkpoint") == 2
    trainer.push_to_hub()
    final = hub.uploads[-1]
    assert final[0] == "" and {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(final[1])
    for files in [*per_save, final[1]]:
        assert not [f for f in files if REFERENCE_FOLDER.strip("_") in f or f.startswith("_")], files
        assert not [f for f in files if f.startswith("checkpoint-")]
