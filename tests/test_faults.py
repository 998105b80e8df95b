"""Fault tests: a real training run is killed with SIGKILL in the middle of a checkpoint save and in the middle of a
step; resuming from the last complete checkpoint finishes with the same adapter as an uninterrupted run, and a
half-written checkpoint is never picked up."""

import os
import signal
import subprocess
import sys
import time

import fault_worker
import pytest
import torch
from safetensors.torch import load_file

from trl_sstoken.checkpoints import CHECKPOINT_MARKER


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    fault_worker.run(out_dir)
    return load_file(os.path.join(out_dir, "final_adapter.safetensors"))


def kill_when_paused(out_dir, how, timeout=240):
    process = subprocess.Popen(
        [sys.executable, WORKER, out_dir, how], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(out_dir, "paused")):
        if process.poll() is not None:
            raise AssertionError(f"the worker exited early: {process.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("the worker never reached its pause point")
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def resume(out_dir):
    completed = subprocess.run(
        [sys.executable, WORKER, out_dir, "resume"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, load_file(os.path.join(out_dir, "final_adapter.safetensors"))


def test_killed_in_the_middle_of_a_checkpoint_save(tmp_path, uninterrupted):
    out_dir = str(tmp_path)
    kill_when_paused(out_dir, "pause-in-save:6")
    half_written = os.path.join(out_dir, "checkpoint-6")
    assert os.path.isdir(half_written) and not os.path.exists(os.path.join(half_written, CHECKPOINT_MARKER))
    assert os.path.exists(os.path.join(out_dir, "checkpoint-4", CHECKPOINT_MARKER))
    completed, adapter = resume(out_dir)
    assert "Skipping the incomplete checkpoint" in completed.stderr and "checkpoint-6" in completed.stderr
    for name, expected in uninterrupted.items():
        assert torch.equal(adapter[name], expected), name


def test_killed_in_the_middle_of_a_step(tmp_path, uninterrupted):
    out_dir = str(tmp_path)
    kill_when_paused(out_dir, "pause-in-step:5")
    assert sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    _, adapter = resume(out_dir)
    for name, expected in uninterrupted.items():
        assert torch.equal(adapter[name], expected), name


def test_an_incomplete_checkpoint_given_by_path_is_refused(tmp_path):
    os.makedirs(tmp_path / "checkpoint-2")
    trainer = fault_worker.build(str(tmp_path))
    with pytest.raises(ValueError, match="is incomplete"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
