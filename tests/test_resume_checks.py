"""What a resume checks besides the recorded files being unchanged (issue 23, item 5): the files and settings every
checkpoint of the run must hold are there, no link leads out of the checkpoint, every file is hashed whatever its
size, the training set and its order are the checkpoint's, and a `save_only_model` checkpoint is refused."""

import json
import os
import shutil

import pytest
from test_checkpoints import trainer_for

from trl_sstoken.saving.checkpoints import (
    CHECKPOINT_MARKER,
    CheckpointError,
    checkpoint_problem,
    mark_checkpoint_complete,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, dataset):
    """A finished LoRA run with a lagged history and checkpoint-2 and checkpoint-4; tests copy it first."""
    root = tmp_path_factory.mktemp("run")
    trainer_for(root, tokenizer, dataset, root / "out").train()
    return root / "out"


@pytest.fixture
def copy(run, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(run, target)
    return target


def remark(checkpoint, **changes):
    """Rewrites the marker from the checkpoint's files as they are now, as someone who edits a checkpoint would;
    `changes` replace marker entries afterwards (e.g. files={})."""
    marker_path = checkpoint / CHECKPOINT_MARKER
    recorded = json.loads(marker_path.read_text())
    mark_checkpoint_complete(str(checkpoint), recorded["global_step"], recorded["settings"])
    if changes:
        marker = json.loads(marker_path.read_text())
        marker.update(changes)
        marker_path.write_text(json.dumps(marker))


def resumed(tmp_path, tokenizer, dataset, output_dir, **overrides):
    trainer = trainer_for(tmp_path, tokenizer, dataset, output_dir, **{"max_steps": 5, **overrides})
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))
    return trainer


# ----- the files and settings every checkpoint of the run holds -----


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
def test_a_marker_that_leaves_out_an_essential_file_is_refused(copy, tmp_path, tokenizer, dataset, name):
    """Before: the file deleted and the marker rewritten without it verified, and the run went on without it (an
    untrained adapter, a fresh optimizer, ...)."""
    os.remove(copy / "checkpoint-4" / name)
    remark(copy / "checkpoint-4")
    with pytest.raises(CheckpointError, match=f"the file {name}( or [^ ]+)? is not recorded in its marker"):
        resumed(tmp_path, tokenizer, dataset, copy)


def test_a_marker_with_no_files_is_refused(copy, tmp_path, tokenizer, dataset):
    os.remove(copy / "checkpoint-4" / "adapter_model.safetensors")
    remark(copy / "checkpoint-4", files={})
    with pytest.raises(CheckpointError, match="the file trainer_state.json is not recorded in its marker"):
        resumed(tmp_path, tokenizer, dataset, copy)
    with pytest.warns(UserWarning, match="Skipping the checkpoint .*checkpoint-4: the file"):
        trainer = trainer_for(tmp_path, tokenizer, dataset, copy, max_steps=5)
        trainer.train(resume_from_checkpoint=True)  # falls back to checkpoint-2, which holds everything
    assert trainer.state.global_step == 5


def test_a_marker_with_no_settings_is_refused(copy, tmp_path, tokenizer, dataset):
    """Before: `"settings": {}` accepted any settings."""
    remark(copy / "checkpoint-4", settings={})
    with pytest.raises(CheckpointError, match="does not record the settings .*attention_score.*learning_rate"):
        resumed(tmp_path, tokenizer, dataset, copy)


def test_a_save_only_model_checkpoint_is_refused_for_resume(tmp_path, tokenizer, dataset):
    """It holds no optimizer, scheduler or RNG state: before, the run resumed with fresh ones, not exactly."""
    out = tmp_path / "only-model"
    trainer_for(tmp_path, tokenizer, dataset, out, save_only_model=True).train()
    trainer = trainer_for(tmp_path, tokenizer, dataset, out, save_only_model=True, max_steps=5)
    with pytest.raises(CheckpointError, match="save_only_model=True.*cannot be resumed exactly"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    with (
        pytest.warns(UserWarning, match="Skipping the checkpoint .*save_only_model=True"),
        pytest.raises(CheckpointError, match="No complete checkpoint found"),
    ):
        trainer.train(resume_from_checkpoint=True)


# ----- links -----


def test_a_linked_folder_outside_the_checkpoint_is_refused(copy, tmp_path, tokenizer, dataset):
    """Before: `history/` replaced by a link to a folder elsewhere was not walked, so not recorded, and a change
    there went unnoticed."""
    checkpoint = copy / "checkpoint-4"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(checkpoint / "history", elsewhere)
    os.symlink(elsewhere, checkpoint / "history")
    remark(checkpoint)
    with pytest.raises(CheckpointError, match="history is a link to .*elsewhere, outside the checkpoint"):
        resumed(tmp_path, tokenizer, dataset, copy)


def test_a_linked_file_outside_the_checkpoint_is_refused(copy, tmp_path):
    checkpoint = copy / "checkpoint-4"
    outside = tmp_path / "optimizer.pt"
    shutil.move(checkpoint / "optimizer.pt", outside)
    os.symlink(outside, checkpoint / "optimizer.pt")
    remark(checkpoint)
    assert "optimizer.pt is a link to" in checkpoint_problem(str(checkpoint))


def test_a_link_inside_the_checkpoint_is_accepted(copy):
    checkpoint = copy / "checkpoint-4"
    os.symlink("trainer_state.json", checkpoint / "state-link.json")
    remark(checkpoint)
    assert checkpoint_problem(str(checkpoint)) is None


# ----- hashing -----


def test_a_file_over_256_mib_is_hashed(tmp_path):
    """Before: files over 256 MiB (a real 8B r=64 adapter is 336 MB) were checked by size only, so a change that
    kept the size passed. A sparse file keeps the test's disk use small."""
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    big = checkpoint / "adapter_model.safetensors"
    with open(big, "wb") as handle:
        handle.truncate(257 * 2**20)
    mark_checkpoint_complete(str(checkpoint), 1, {})
    assert len(json.loads((checkpoint / CHECKPOINT_MARKER).read_text())["files"][big.name]["sha256"]) == 64
    with open(big, "r+b") as handle:
        handle.seek(200 * 2**20)
        handle.write(b"\x01")
    assert big.stat().st_size == 257 * 2**20
    assert "changed after the checkpoint was written" in checkpoint_problem(str(checkpoint))


# ----- the training set -----


@pytest.mark.parametrize("change", ["reversed", "one row edited", "one row fewer"])
def test_resuming_with_another_training_set_or_order_is_refused(copy, tmp_path, tokenizer, dataset, change):
    """The position in the data is part of the checkpoint: before, another order or content resumed silently."""
    if change == "reversed":
        other = dataset.select(range(len(dataset) - 1, -1, -1))
    elif change == "one row edited":
        other = dataset.map(
            lambda row, i: {"completion": row["completion"] + " extra" if i == 50 else row["completion"]},
            with_indices=True,
        )
    else:
        other = dataset.select(range(len(dataset) - 1))
    with pytest.raises(CheckpointError, match="train_dataset: '96 rows, .*' there, '9[56] rows, .*' now"):
        resumed(tmp_path, tokenizer, other, copy)
    resumed(tmp_path, tokenizer, dataset, copy)  # the same data resumes
