"""Inputs refused when the trainer is built (trl_sstoken/data/inputs.py), with errors that name the field or column."""

import errno
import os

import pytest
import torch
from conftest import QUICKSTART_ROWS, config, lora_config
from datasets import Dataset, IterableDataset

from trl_sstoken import SSTokenTrainer
from trl_sstoken.data.collator import EXAMPLE_ID_COLUMN
from trl_sstoken.saving import writable
from trl_sstoken.tiny import build_tiny_model


def build(tmp_path, tokenizer, rows=None, model=None, **overrides):
    return SSTokenTrainer(
        model=model if model is not None else build_tiny_model(tokenizer),
        args=config(tmp_path, **overrides),
        train_dataset=rows
        if isinstance(rows, (Dataset, IterableDataset))
        else Dataset.from_list(rows or QUICKSTART_ROWS),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def test_a_config_edited_after_construction_is_validated_again(tmp_path, tokenizer, dataset):
    args = config(tmp_path)
    args.selection_ratio = 0.0
    with pytest.raises(ValueError, match=r"selection_ratio=0.0 is out of range"):
        SSTokenTrainer(model=build_tiny_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    args = config(tmp_path)
    args.history = "lagg"
    with pytest.raises(ValueError, match=r"history='lagg' is not supported"):
        SSTokenTrainer(model=build_tiny_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("device", ["cuda:7", "xpu", "mps", "not-a-device"])
def test_a_history_device_this_machine_lacks_is_refused(tmp_path, tokenizer, device):
    backend = getattr(torch, device.split(":")[0], None)
    if backend is not None and hasattr(backend, "is_available") and backend.is_available() and device != "cuda:7":
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ValueError, match=f"history_device='{device}'"):
        build(tmp_path, tokenizer, history="ema", history_device=device)


def test_a_reference_model_path_that_does_not_exist_is_refused(tmp_path, tokenizer):
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(ValueError, match=r"reference_model='.*such-model' does not exist"):
        build(tmp_path, tokenizer, selection_method="rho1", reference_model=missing)
    with pytest.raises(ValueError, match=r"reference_model='someone/missing-model' is neither a local folder nor in"):
        build(tmp_path, tokenizer, selection_method="rho1", reference_model="someone/missing-model")


def test_an_empty_dataset_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        build(tmp_path, tokenizer, rows=Dataset.from_dict({"prompt": [], "completion": []}))


def test_a_dataset_whose_every_example_is_truncated_away_is_refused(tmp_path, tokenizer):
    long_prompt = " ".join(["what is two plus three ?"] * 20)
    rows = [{"prompt": long_prompt, "completion": " five ."}] * 4
    with pytest.raises(ValueError, match=r"all 4 training examples were dropped.*max_length=32"):
        build(tmp_path, tokenizer, rows=rows, max_length=32)


@pytest.mark.parametrize("column", ["prompt", "completion"])
def test_none_in_a_text_column_is_refused_naming_the_column_and_row(tmp_path, tokenizer, column):
    rows = [dict(row) for row in QUICKSTART_ROWS[:8]]
    rows[5][column] = None
    with pytest.raises(ValueError, match=f"None in its '{column}' column \\(first in row 5\\)"):
        build(tmp_path, tokenizer, rows=rows)


def test_the_reserved_example_id_column_is_refused(tmp_path, tokenizer):
    rows = [{**row, EXAMPLE_ID_COLUMN: 7} for row in QUICKSTART_ROWS[:8]]
    with pytest.raises(ValueError, match=f"a column named '{EXAMPLE_ID_COLUMN}'"):
        build(tmp_path, tokenizer, rows=rows)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_a_non_finite_weight_is_refused(tmp_path, tokenizer, tiny_model_dir, value):
    model = build_tiny_model(tokenizer)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight holds 1 non-finite value"):
        build(tmp_path, tokenizer, model=model)


def test_a_model_loaded_by_name_with_a_non_finite_weight_is_refused(tmp_path, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    with pytest.raises(ValueError, match=r"embed_tokens.weight holds 1 non-finite value"):
        build(tmp_path, tokenizer, model=str(broken))


def test_an_empty_streaming_dataset_is_refused(tmp_path, tokenizer):
    empty = Dataset.from_list(QUICKSTART_ROWS[:2]).to_iterable_dataset().filter(lambda row: False)
    with pytest.raises(ValueError, match=r"train_dataset is empty \(it yields no rows\)"):
        build(tmp_path, tokenizer, rows=empty, max_steps=2)


def test_an_output_dir_under_a_file_is_refused_before_anything_is_prepared(tmp_path, tokenizer):
    """Was a raw NotADirectoryError from Trainer.__init__ (with a model given by name: after loading it)."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"^output_dir='.*a-file/out' cannot be created: '.*a-file' is a file, not"):
        build(tmp_path, tokenizer, output_dir=str(tmp_path / "a-file" / "out"), save_strategy="steps")


def test_a_read_only_output_dir_is_refused_when_checkpoints_will_be_written(tmp_path, tokenizer, monkeypatch):
    """Was found at the first checkpoint, after `save_steps` steps. A folder without write permission refuses a
    regular user; root writes through permission bits, so there the write is refused as a read-only mount refuses
    root (EROFS from the probe's file creation)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root

        def read_only_mount(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(writable.tempfile, "mkstemp", read_only_mount)
    try:
        with pytest.raises(ValueError, match=r"^output_dir='.*read-only' is not writable: "):
            build(tmp_path, tokenizer, output_dir=str(folder), save_strategy="steps", save_steps=2)
        build(tmp_path, tokenizer, output_dir=str(folder), save_strategy="no")  # nothing is written there
    finally:
        folder.chmod(0o755)
    assert not [name for name in os.listdir(folder) if name.startswith(writable.PROBE_PREFIX)]  # none left


def test_a_missing_output_dir_is_created_and_the_probe_leaves_nothing(tmp_path):
    writable.check_writable_dir(tmp_path / "new" / "deeper", "output_dir")
    assert os.listdir(tmp_path / "new" / "deeper") == []
