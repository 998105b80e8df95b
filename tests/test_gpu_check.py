"""The prepared GPU check (benchmarks/gpu/) at toy shapes on the CPU: the same script, stage by stage, so that it
cannot rot while no GPU is lent. No timing assertion: the numbers only have to be sane."""

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.gpu.settings import SCALES, STAGES  # noqa: E402


TOY = SCALES["toy"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    work = tmp_path_factory.mktemp("gpu-check-work")
    command = [sys.executable, "-m", "benchmarks.gpu.check", "--dry-run", "--out", str(out), "--work", str(work)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "gpu-check.json").read_text())
    return summary, completed.stdout, out


def _problems(stage):
    """Sub-steps that neither passed nor were skipped with a reason."""
    return {
        name: entry.get("error") or entry.get("status")
        for name, entry in stage.get("substeps", {}).items()
        if not (entry["status"] == "ok" or (entry["status"] == "skipped" and entry.get("reason")))
    }


def test_every_stage_ran_and_passed_or_skipped_with_a_reason(dry_run):
    summary, stdout, out = dry_run
    assert list(summary["stages"]) == list(STAGES)
    for name, stage in summary["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"), _problems(stage))
        assert not _problems(stage), (name, _problems(stage))
        assert (out / f"stage-{name}.json").exists()
    assert "check: done" in stdout and "env: imports: ok" in stdout  # progress lines reach stdout
    prepare = summary["prepare"]  # the checkpoints written in the background while correctness ran
    assert prepare["status"] == "ok" and all(entry["bytes"] > 0 for entry in prepare["substeps"].values())


def test_env_stage_reports_versions(dry_run):
    env = dry_run[0]["stages"]["env"]
    versions = env["versions"]
    for name in ("torch", "transformers", "trl", "peft", "datasets", "trl_sstoken"):
        assert versions[name], name
    assert "flash_attn" in versions and "deepspeed" in versions  # present or None, never missing
    assert dry_run[0]["requirements"]["unmet"] == []  # the dev environment meets every requirement


def test_correctness_checks_ran_and_passed(dry_run):
    substeps = dry_run[0]["stages"]["correctness"]["substeps"]
    for quantization in TOY["quantizations"]:
        for mode in TOY["correctness_modes"]:
            entry = substeps[f"train-{quantization}-sdpa-{mode}"]
            assert entry["status"] == "ok" and len(entry["losses"]) == TOY["small_steps"]
        assert substeps[f"train-{quantization}-flash_attention_2-base-cached"]["status"] == "skipped"
        full = substeps[f"full-equals-sft-{quantization}"]
        assert full["status"] == "ok" and full["loss_relative_difference"] < full["tolerance"]
        assert full["grad_worst_cosine"] > 0.999
    assert substeps["train-nf4-sdpa-lagged"]["history_adapter_parameters"] > 0
    assert substeps["attention-kernel-vs-float64"]["max_abs_error_float32"] < 1e-4
    capture = substeps["attention-capture-sdpa-float32-vs-float64-eager"]
    assert capture["status"] == "ok" and all(
        capture[f"layer_{layer}_max_abs_error"] < capture["tolerance"]
        for layer in (0, TOY["small_shape"]["num_hidden_layers"] - 1)
    )


def test_cost_numbers_are_sane(dry_run):
    cost = dry_run[0]["stages"]["cost"]["substeps"]
    for label, _, _ in TOY["cost_shapes"]:
        variants = cost[f"side-by-side-{label}"]["variants"]
        assert set(variants) == set(TOY["cost_variants"])
        for name, entry in variants.items():
            assert entry["step_seconds_median"] > 0 and entry["tokens_per_second"] > 0, name
            assert entry["time_vs_sft"] > 0 and entry["time_vs_floor"] > 0, name
            assert entry["timed_steps"] == TOY["cost_steps"]
        assert variants["sft"]["time_vs_sft"] == 1.0
        assert variants["base"]["attention_instrumented"] and variants["base"]["attention_seconds_median"] > 0
        assert variants["sft"]["attention_seconds_median"] == 0
        share = cost[f"attention-share-{label}"]
        assert share["status"] == "ok"
        for length in TOY["share_seq_lens"]:
            assert 0 < share[f"seq{length}"]["share"] < 1
    kernel = cost["attention-kernel-alone"]
    assert all(kernel[key] > 0 for key in kernel if key.endswith("_seconds"))


def test_memory_cap_and_distributed_code_paths_ran(dry_run):
    stages = dry_run[0]["stages"]
    cap = stages["memory_cap"]
    assert cap["fits"] == dict.fromkeys(TOY["cap_modes"], True)
    assert cap["cap_applied"] is False  # the CPU has no memory cap to apply
    distributed = stages["distributed"]["substeps"]
    for name in TOY["distributed_configs"]:
        assert distributed[name]["status"] == "skipped" and distributed[name]["reason"]
    plain = distributed["plain-cpu"]
    assert set(plain["modes"]) == set(TOY["distributed_modes"])
    for mode, entry in plain["modes"].items():
        assert entry["status"] == "ok", (mode, entry.get("error"))
        assert "adapter_model.safetensors" in entry["checkpoint_files"]
    assert any(path.startswith("history/") for path in plain["modes"]["lagged"]["checkpoint_files"])
    quality = stages["quality"]["substeps"]["entry-point"]
    assert quality["status"] == "ok" or quality["reason"]


def test_settings_overrides_and_unknown_keys(monkeypatch):
    from benchmarks.gpu.settings import load

    monkeypatch.setenv("GPU_CHECK_OVERRIDES", '{"cost_steps": 3, "cap_modes": ["sft"]}')
    settings = load("gpu")
    assert settings["cost_steps"] == 3 and settings["cap_modes"] == ["sft"]
    assert SCALES["gpu"]["cost_steps"] == 5  # the table itself is untouched
    monkeypatch.setenv("GPU_CHECK_OVERRIDES", '{"cost_stepz": 3}')
    with pytest.raises(KeyError, match="cost_stepz"):
        load("gpu")


def test_compat_wheels_are_chosen_by_unmet_requirement(tmp_path):
    from benchmarks.gpu import wheels

    for name in (
        "tokenizers-0.22.0-cp39-abi3-any.whl",
        "tokenizers-0.23.3-cp310-abi3-any.whl",
        "huggingface_hub-2.4.0-py3-none-any.whl",
        "regex-2026.11.19-cp312-cp312-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    unmet = [
        ("tokenizers<0.24.0,>=0.23.1", "transformers", "0.21.0"),
        ("huggingface-hub<3.0,>=1.31.0", "transformers", "0.36.2"),
        ("pyarrow>=24.0.0", "datasets", "19.0.0"),
    ]  # no wheel for it: reported, not installed
    chosen = [os.path.basename(path) for path in wheels._choose(unmet, str(tmp_path), [])]
    assert chosen == ["tokenizers-0.23.3-cp310-abi3-any.whl", "huggingface_hub-2.4.0-py3-none-any.whl"]
    assert wheels._choose(unmet, str(tmp_path), chosen) == []  # never the same wheel twice
