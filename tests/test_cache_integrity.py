"""The history cache fails early and never reads damage as data: its destination is checked when the trainer is
built (before the caching pass), every byte of the file is covered by its checksum (metadata included), and it is
created with the usual file mode."""

import os
import stat

import pytest
import torch
from conftest import count_calls

import trl_sstoken.history.cache as cache
from trl_sstoken.history.cache import CACHE_FILE, HistoryCacheError, read_cache, write_cache


IDENTITY = {"dataset": "3 rows, sha256 ab", "model": "cd", "tokenizer": "ef"}
PER_EXAMPLE = [torch.tensor([-1.5, -0.25]), torch.tensor([-3.0]), torch.tensor([-0.5, -2.0, -4.0])]


def test_a_cache_dir_that_is_a_file_is_refused_when_the_trainer_is_built(make_trainer, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for directory in (blocker, blocker / "sub"):
        with pytest.raises(HistoryCacheError, match="is a file, not a directory|cannot be written"):
            make_trainer(history_cache_dir=str(directory), selection_method="rel")


def test_an_unwritable_cache_dir_is_refused_before_the_caching_pass(make_trainer, tmp_path, monkeypatch):
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
    else:  # root writes anywhere: refuse the probe's file creation instead
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(directory)) and flags & os.O_CREAT:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(cache.os, "open", refusing_open)
    passes = []
    monkeypatch.setattr(cache, "compute_log_probs", lambda *args, **kwargs: passes.append(1) or [])
    with pytest.raises(HistoryCacheError, match="history_cache_dir=.*read-only' cannot be written"):
        make_trainer(history_cache_dir=str(directory), selection_method="rel")
    assert passes == []
    directory.chmod(0o755)


def test_an_existing_cache_in_a_read_only_dir_is_used(make_trainer, tmp_path, monkeypatch):
    first = make_trainer(history_cache_dir=str(tmp_path / "cache"), selection_method="rel", max_steps=1)
    first.train()
    real_open = os.open
    cache_dir = str(tmp_path / "cache")

    # `cache.os` is the `os` module itself: refuse creating files in the cache folder only, as a read-only folder
    # would (the output_dir's lock file is created elsewhere through the same function)
    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.abspath(os.fspath(path)).startswith(cache_dir + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache.os, "open", refusing_open)
    again = make_trainer(history_cache_dir=str(tmp_path / "cache"), selection_method="rel", max_steps=1)
    building = count_calls(again._history.source, "log_probs")
    again._prepare_history_cache()
    assert building == [] and again._history.ready


def test_an_empty_cache_dir_string_is_refused(make_trainer):
    with pytest.raises(ValueError, match=r"history_cache_dir='' is not a directory path"):
        make_trainer(history_cache_dir="", selection_method="rel")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_cache_file_mode_follows_the_umask(tmp_path, umask, mode):
    path = tmp_path / CACHE_FILE
    previous = os.umask(umask)
    try:
        write_cache(str(path), IDENTITY, PER_EXAMPLE)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert os.listdir(tmp_path) == [CACHE_FILE]


def test_every_byte_of_the_cache_is_covered(tmp_path):
    """Each byte of a cache file flipped (all eight bits, and the lowest one alone): reading it raises
    `HistoryCacheError`, never a raw KeyError / JSONDecodeError / AttributeError, nor returns other data."""
    path = tmp_path / CACHE_FILE
    write_cache(str(path), IDENTITY, PER_EXAMPLE)
    original = path.read_bytes()
    expected_values, expected_offsets = read_cache(str(path), IDENTITY)
    damaged = tmp_path / "damaged.safetensors"
    undetected = []
    for index in range(len(original)):
        for mask in (0xFF, 0x01):
            data = bytearray(original)
            data[index] ^= mask
            damaged.write_bytes(bytes(data))
            try:
                values, offsets = read_cache(str(damaged), IDENTITY)
            except HistoryCacheError:
                continue
            if not (torch.equal(values, expected_values) and torch.equal(offsets, expected_offsets)):
                undetected.append((index, mask))
    assert len(original) > 400
    assert undetected == []


@pytest.mark.parametrize(
    "metadata",
    [
        {"format": cache.FORMAT, "sha256": "0" * 64},  # no identity
        {"format": cache.FORMAT, "identity": "{not json", "sha256": "0" * 64},
        {"format": cache.FORMAT, "identity": "[1, 2]", "sha256": "0" * 64},
        {"identity": "{}", "sha256": "0" * 64},  # no format
    ],
)
def test_damaged_metadata_is_a_history_cache_error(tmp_path, metadata):
    from safetensors.torch import save_file

    path = tmp_path / CACHE_FILE
    save_file({"log_probs": torch.zeros(3), "offsets": torch.tensor([0, 3])}, str(path), metadata=metadata)
    with pytest.raises(HistoryCacheError):
        read_cache(str(path), IDENTITY)
