"""The distributed tier: DDP, FSDP1, FSDP2, ZeRO-2 and ZeRO-3, two CPU processes over gloo, against one process.

Every engine runs every scenario of `worker.py` (plain SFTTrainer, `full`, sstoken with `base`, cached `base`,
`lagged`, `ema`, and a lagged run killed after its checkpoint and resumed) in one launch, with two processes of two
sequences each; the reference is one process of four sequences (the same global batch, the same data order). A
scenario either matches the reference (loss and sstoken/rel_mean at every step, the final adapter) or is refused
when the trainer is built, with a message naming the engine and the alternative (`REFUSED`). The engines run on
the CPU through a test-only shim of accelerate's device checks (`cpu_engines.py`).

Marked `distributed`: the fast tier skips it with `-m "not distributed"`. Its time is printed per launch.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
SCENARIOS = ["sft", "full", "base", "cached", "lagged", "ema", "resume-lagged"]
# fsdp1 runs with SHARDED_STATE_DICT (torch's FSDP1 segfaults gathering a full state dict on the CPU), fsdp2 with
# FULL_STATE_DICT, fsdp2sharded with SHARDED_STATE_DICT (worker.ENGINES)
ENGINES = ["ddp", "fsdp1", "fsdp2", "fsdp2sharded", "zero2", "zero3"]
# (engine, scenario) -> a phrase the refusal at construction must contain; everything else must match
FSDP1_MOVING = "under FSDP1 is not supported"
ZERO3_MOVING = "under DeepSpeed ZeRO-3 is not supported"
REFUSED = {
    ("fsdp1", "lagged"): FSDP1_MOVING,
    ("fsdp1", "ema"): FSDP1_MOVING,
    ("fsdp1", "resume-lagged"): FSDP1_MOVING,
    ("zero3", "lagged"): ZERO3_MOVING,
    ("zero3", "ema"): ZERO3_MOVING,
    ("zero3", "resume-lagged"): ZERO3_MOVING,
    ("zero3", "cached"): "history_cache_dir under DeepSpeed ZeRO-3 is not supported",
    ("fsdp2sharded", "lagged"): "under FSDP2 with fsdp_state_dict_type SHARDED_STATE_DICT is not supported",
    # accelerate's FSDP1 sharded load restores a PEFT adapter wrong (plain SFTTrainer too): refused at the resume
    ("fsdp1", "resume-base"): "Resuming a PEFT adapter under FSDP1 with fsdp_state_dict_type SHARDED_STATE_DICT",
}


def scenarios_of(engine: str) -> list[str]:
    """Every scenario; where a lagged resume is refused, the kill-and-resume runs with a base history instead."""
    if engine == "fsdp2sharded":  # what SHARDED_STATE_DICT changes: the final save, the resume
        return ["base", "lagged", "resume-base"]
    extra = ["resume-base"] if (engine, "resume-lagged") in REFUSED else []
    return SCENARIOS + extra


LAUNCH_TIMEOUT = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ACCELERATE_USE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    return env


def launch(out_dir, engine, scenarios, processes):
    """Runs the worker (under torchrun for two processes) and returns {scenario: result}; prints its time."""
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(free_port())]
    command += [WORKER, str(out_dir), engine, *scenarios]
    began = time.monotonic()
    completed = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    print(f"distributed tier: {engine} x{processes}, {len(scenarios)} scenarios, {time.monotonic() - began:.0f} s")  # noqa: T201
    results = {}
    for scenario in scenarios:
        path = os.path.join(out_dir, f"{scenario}.json")
        if not os.path.exists(path):
            pytest.fail(
                f"{engine}: no result for {scenario} (the launch ended with {completed.returncode}):\n"
                + completed.stdout[-3000:]
                + completed.stderr[-5000:]
            )
        with open(path) as handle:
            results[scenario] = json.load(handle)
        adapter = os.path.join(out_dir, f"{scenario}.safetensors")
        if os.path.exists(adapter):
            results[scenario]["adapter"] = load_file(adapter)
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, four sequences per step: what every engine must reproduce."""
    return launch(tmp_path_factory.mktemp("single"), "single", SCENARIOS, processes=1)


def assert_matches(engine, scenario, got, expected):
    where = f"{engine} {scenario}"
    assert got["status"] == "ok", f"{where}: {got.get('error')}\n{got.get('traceback', '')[-3000:]}"
    assert got["world_size"] == 2, where
    if engine != "ddp":
        assert got["fsdp" if engine.startswith("fsdp") else "deepspeed"], f"{where}: the engine was not on"
    assert len(got["losses"]) == len(expected["losses"]), where
    torch.testing.assert_close(got["losses"], expected["losses"], rtol=1e-4, atol=1e-5, msg=f"{where}: losses")
    torch.testing.assert_close(got["rel"], expected["rel"], rtol=1e-3, atol=1e-4, msg=f"{where}: REL per step")
    assert "final_save_error" not in got, f"{where}: final save_model failed: {got['final_save_error']}"
    assert set(got["adapter"]) == set(expected["adapter"]), where
    for name, tensor in expected["adapter"].items():
        torch.testing.assert_close(got["adapter"][name], tensor, rtol=1e-3, atol=1e-4, msg=f"{where}: {name}")


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_a_single_process_or_refuses(engine, reference, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the 'dist' extra (deepspeed) is not installed")
    results = launch(tmp_path, engine, scenarios_of(engine), processes=2)
    failures = []
    for scenario in scenarios_of(engine):
        got = results[scenario]
        refusal = REFUSED.get((engine, scenario))
        try:
            if refusal is not None:
                assert got["status"] == "error" and refusal in got["error"], f"{engine} {scenario}: {got}"
                assert "ValueError" in got["error"] and "use " in got["error"].lower()  # names the alternative
                # raised while the trainer is built, or (a resume) before the engine loads anything
                assert "check_history(" in got["traceback"] or "check_resume(" in got["traceback"]
            else:
                assert_matches(engine, scenario, got, reference[scenario.removeprefix("resume-")])
        except AssertionError as error:
            failures.append(str(error)[:1500])
    assert not failures, "\n\n".join(failures)
