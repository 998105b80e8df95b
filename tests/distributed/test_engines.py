"""The distributed tier: DDP, FSDP1, FSDP2, ZeRO-2 and ZeRO-3, two CPU processes over gloo, against one process.

Every engine runs every scenario of `worker.py` (plain SFTTrainer, `full`, sstoken with `base`, cached `base`,
`lagged`, `ema`, and a lagged run killed after its checkpoint and resumed) with two processes of two sequences each;
the reference is one process of four sequences (the same global batch, the same data order). Starting a launch
costs more than an engine's scenarios, so the engines of one entry of `LAUNCHES` share one launch, one after another
in the same two processes; each engine is still its own test, failing with its own scenarios' messages. A
scenario either matches the reference (loss and sstoken/rel_mean at every step, the final adapter) or is refused
when the trainer is built, with a message naming the engine and the alternative (`REFUSED`). The engines run on
the CPU through a test-only shim of accelerate's device checks (`cpu_engines.py`).

Marked `distributed`: the fast tier skips it with `-m "not distributed"`. Its time is printed per launch, and each
scenario's own seconds are in its result.
"""

import importlib.util
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
# engines that share a launch, in the order they run: DeepSpeed last (its global state is reset between engines,
# worker.reset_engine, but a DeepSpeed crash then loses no other engine), FSDP1 after the FSDP2 runs (its segfaults
# on the CPU are why it saves sharded); a test selected alone (-k) launches only its own engine
LAUNCHES = [("ddp", "fsdp2", "fsdp2sharded", "fsdp1", "zero2", "zero3")]
DEEPSPEED_ENGINES = ("zero2", "zero3")
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


LAUNCH_TIMEOUT = 1200  # one launch runs every engine's scenarios


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ACCELERATE_USE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    return env


def launch(out_dir, runs, processes):
    """Runs the worker (under torchrun for two processes) on `runs` [(engine, scenario)]; prints its time.

    Returns {engine: {scenario: result}} for the runs that wrote a result, and the launch's exit code and output tail
    for the error of those that did not (a crash loses the runs after it, never the results before it).
    """
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(free_port())]
    command += [WORKER, str(out_dir), *(f"{engine}/{scenario}" for engine, scenario in runs)]
    began = time.monotonic()
    try:
        completed = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        ended, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as timeout:  # a hang: the results written before it still count
        ended, stdout, stderr = f"a timeout after {LAUNCH_TIMEOUT} s", timeout.stdout or "", timeout.stderr or ""
        stdout, stderr = (
            text.decode(errors="replace") if isinstance(text, bytes) else text for text in (stdout, stderr)
        )
    engines = list(dict.fromkeys(engine for engine, _ in runs))
    seconds = time.monotonic() - began
    print(f"distributed tier: {'+'.join(engines)} x{processes}, {len(runs)} scenarios, {seconds:.0f} s")  # noqa: T201
    results = {engine: {} for engine in engines}
    for engine, scenario in runs:
        path = os.path.join(out_dir, engine, f"{scenario}.json")
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            results[engine][scenario] = json.load(handle)
        adapter = os.path.join(out_dir, engine, f"{scenario}.safetensors")
        if os.path.exists(adapter):
            results[engine][scenario]["adapter"] = load_file(adapter)
    output = f"(the launch ended with {ended}):\n{stdout[-3000:]}{stderr[-5000:]}"
    return results, output


def results_of(launched, engine, scenarios):
    """The engine's results, failing with the launch's output where a scenario has none."""
    results, output = launched
    missing = [scenario for scenario in scenarios if scenario not in results.get(engine, {})]
    if missing:
        pytest.fail(f"{engine}: no result for {', '.join(missing)} {output}")
    return results[engine]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, four sequences per step: what every engine must reproduce."""
    launched = launch(tmp_path_factory.mktemp("single"), [("single", s) for s in SCENARIOS], processes=1)
    return results_of(launched, "single", SCENARIOS)


@pytest.fixture(scope="module")
def engine_launches(request, tmp_path_factory):
    """engine -> the results of its launch; a launch runs once, for the engines of it this session selected."""
    selected = {
        item.callspec.params["engine"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_engine_matches_a_single_process_or_refuses"
    }
    if importlib.util.find_spec("deepspeed") is None:
        selected -= set(DEEPSPEED_ENGINES)
    done = {}

    def launched(engine):
        if engine not in done:
            group = next(group for group in LAUNCHES if engine in group)
            engines = [name for name in group if name == engine or (name in selected and name not in done)]
            runs = [(name, scenario) for name in engines for scenario in scenarios_of(name)]
            outcome = launch(tmp_path_factory.mktemp("-".join(engines)), runs, processes=2)
            done.update(dict.fromkeys(engines, outcome))
        return done[engine]

    return launched


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
def test_engine_matches_a_single_process_or_refuses(engine, reference, engine_launches):
    if engine in DEEPSPEED_ENGINES:
        pytest.importorskip("deepspeed", reason="the 'dist' extra (deepspeed) is not installed")
    results = results_of(engine_launches(engine), engine, scenarios_of(engine))
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
