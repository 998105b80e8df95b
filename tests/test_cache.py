import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import QUICKSTART_ROWS, count_calls, record_selections
from datasets import Dataset

from trl_sstoken.history.cache import CACHE_FILE, CachedHistory, HistoryCacheError
from trl_sstoken.tiny import build_tiny_tokenizer


SETTINGS = dict(max_steps=4, attention_warmup_ratio=0.0, selection_method="rel")


def cached_trainer(make_trainer, cache_dir, **overrides):
    return make_trainer(history_cache_dir=str(cache_dir), **{**SETTINGS, **overrides})


def test_cached_run_selects_what_the_on_the_fly_run_selects_without_history_forwards(make_trainer, tmp_path):
    on_the_fly = make_trainer(**SETTINGS)
    expected = record_selections(on_the_fly)
    on_the_fly.train()

    cached = cached_trainer(make_trainer, tmp_path / "cache")
    assert isinstance(cached._history, CachedHistory)
    selections = record_selections(cached)
    building_forwards = count_calls(cached._history.source, "log_probs")
    cached._prepare_history_cache()
    assert len(building_forwards) == -(-len(cached.train_dataset) // 8)  # one pass, batch 2 x 4
    cached.train()
    assert len(building_forwards) == -(-len(cached.train_dataset) // 8)  # and no history forward while training
    assert len(selections) == len(expected) == 4
    for (step, keep), (expected_step, expected_keep) in zip(selections, expected, strict=True):
        assert step == expected_step and torch.equal(keep, expected_keep)
    losses = [e["loss"] for e in cached.state.log_history if "loss" in e]
    expected_losses = [e["loss"] for e in on_the_fly.state.log_history if "loss" in e]
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert not [f for f in os.listdir(tmp_path / "cache") if f != CACHE_FILE]  # no temporary file left behind


def test_a_later_run_reuses_the_cache(make_trainer, tmp_path):
    cached_trainer(make_trainer, tmp_path / "cache").train()
    again = cached_trainer(make_trainer, tmp_path / "cache")
    building_forwards = count_calls(again._history.source, "log_probs")
    again.train()
    assert building_forwards == []


def test_a_cache_for_other_data_is_refused_naming_the_dataset(make_trainer, tmp_path):
    cached_trainer(make_trainer, tmp_path / "cache").train()
    rows = [dict(row) for row in QUICKSTART_ROWS]
    rows[5]["completion"] = " sure ! five ."
    other = cached_trainer(make_trainer, tmp_path / "cache", train_dataset=Dataset.from_list(rows))
    with pytest.raises(HistoryCacheError, match=r"different dataset \(dataset: cached"):
        other.train()


def test_a_cache_for_another_model_is_refused_naming_the_model(make_trainer, tmp_path):
    cached_trainer(make_trainer, tmp_path / "cache").train()
    other = cached_trainer(make_trainer, tmp_path / "cache", architecture="llama")
    with pytest.raises(HistoryCacheError, match=r"different model \(model:"):
        other.train()


def test_a_cache_for_another_tokenizer_is_refused_naming_the_tokenizer(make_trainer, tmp_path, tokenizer):
    cached_trainer(make_trainer, tmp_path / "cache").train()
    trainer = cached_trainer(make_trainer, tmp_path / "cache")
    trainer.processing_class = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in QUICKSTART_ROWS])
    trainer.processing_class.chat_template = tokenizer.chat_template + "{{ '' }}"
    with pytest.raises(HistoryCacheError, match=r"different tokenizer \(tokenizer:"):
        trainer.train()


@pytest.mark.parametrize("damage", ["truncate", "flip_payload_byte", "garbage"])
def test_truncated_or_corrupt_caches_are_detected(make_trainer, tmp_path, damage):
    cached_trainer(make_trainer, tmp_path / "cache").train()
    path = tmp_path / "cache" / CACHE_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 40]
    elif damage == "flip_payload_byte":
        data[-5] ^= 0xFF
    else:
        data = bytearray(b"not a safetensors file at all")
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryCacheError, match="truncated or corrupt|corrupt"):
        cached_trainer(make_trainer, tmp_path / "cache").train()


def test_cache_needs_base_history_and_an_indexable_dataset(make_trainer, tmp_path):
    with pytest.raises(ValueError, match="history_cache_dir is only valid with history='base'"):
        make_trainer(history="lagged", history_cache_dir=str(tmp_path))
    iterable = Dataset.from_list(QUICKSTART_ROWS).to_iterable_dataset()
    trainer = cached_trainer(make_trainer, tmp_path / "cache", train_dataset=iterable)
    with pytest.raises(HistoryCacheError, match="map-style"):
        trainer.train()


def test_full_fine_tuning_with_a_cached_base_needs_no_model_copy(make_trainer, tmp_path):
    copy_run = make_trainer(peft=False, **SETTINGS)
    expected = record_selections(copy_run)
    copy_run.train()
    cached = cached_trainer(make_trainer, tmp_path / "cache", peft=False)
    assert cached._history.parameter_bytes == 0
    selections = record_selections(cached)
    cached.train()
    for (_, keep), (_, expected_keep) in zip(selections, expected, strict=True):
        assert torch.equal(keep, expected_keep)


# a history cache write in a child process: killed by SIGTERM after the temporary file is full, before its rename
# ("kill"), or held there until the test ends ("wait"); the temporary file's name is printed
CACHE_WRITER = """
import os, signal, sys, torch
import trl_sstoken.history.cache as cache
real_save_file = cache.save_file
def save_file(tensors, path, metadata):
    real_save_file(tensors, path, metadata=metadata)
    print(os.path.basename(path), flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGTERM)
    sys.stdin.read()
cache.save_file = save_file
cache.write_cache(os.path.join(sys.argv[1], cache.CACHE_FILE), {}, [torch.zeros(100_000)])
"""


def start_cache_writer(cache_dir, mode):
    return subprocess.Popen(
        [sys.executable, "-c", CACHE_WRITER, str(cache_dir), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


def test_a_temporary_file_left_by_a_killed_cache_write_is_removed_by_the_next_build(make_trainer, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    killed = start_cache_writer(cache_dir, "kill")
    left = killed.stdout.readline().decode().strip()
    assert killed.wait() == -signal.SIGTERM
    assert (cache_dir / left).stat().st_size > 400_000  # a full-size leftover
    writing = start_cache_writer(cache_dir, "wait")  # another run, still writing its cache
    try:
        in_progress = writing.stdout.readline().decode().strip()
        trainer = cached_trainer(make_trainer, cache_dir)
        trainer._prepare_history_cache()
        assert sorted(os.listdir(cache_dir)) == sorted([CACHE_FILE, in_progress])
    finally:
        writing.kill()
        writing.wait()


def test_temporary_files_of_an_earlier_version_are_named_in_a_warning(make_trainer, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / ".history_logprobs.12345.0badf00d.tmp").write_bytes(b"x")  # no host in its name: kept, named
    trainer = cached_trainer(make_trainer, cache_dir)
    with pytest.warns(UserWarning, match=r"earlier trl_sstoken \(\.history_logprobs\.12345\.0badf00d\.tmp\)"):
        trainer._prepare_history_cache()
    assert (cache_dir / ".history_logprobs.12345.0badf00d.tmp").exists()
