"""Fault injection: real training processes SIGKILLed at 23 points of a run with `save_total_limit=1` (in the middle
of steps, of each part of a checkpoint save, with files torn to half, between marking a checkpoint complete and
deleting the older one, and in the middle of that deletion), each resumed with `resume_from_checkpoint=True` to the
end: every one must finish with an adapter bit-identical to the uninterrupted run's. `tests/fault_worker.py` runs
the matrix (one process that forks a run per kill, so the imports are paid once); docs/reliability.md lists it."""

import json
import os
import subprocess
import sys

import pytest


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")


@pytest.fixture(scope="module")
def fault_matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, WORKER, str(root), "default"], capture_output=True, text=True, timeout=1200, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    matrix = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "error" not in matrix, matrix["error"]
    return matrix


def describe(result):
    return f"#{result['index']} {result['event']}: left {result.get('left')}, resume: {result.get('resume')}"


def test_every_kill_resumes_to_the_uninterrupted_adapter(fault_matrix):
    results = fault_matrix["results"]
    assert len(results) == 24, [r["event"] for r in results]  # every kill point of the matrix was found, + 1 double
    not_killed = [describe(r) for r in results if r["kill"] != "killed"]
    assert not not_killed, not_killed
    failed = [describe(r) for r in results if r.get("adapter") != "bit-identical"]
    assert not failed, "\n".join(failed)


def test_the_matrix_reaches_the_states_it_claims(fault_matrix):
    """The kills did leave what they were meant to: a torn or unmarked newer checkpoint next to the older one, a
    marked checkpoint next to the older one not yet deleted, and a deletion interrupted half-way."""
    by_event = {r["event"]: r for r in fault_matrix["results"]}
    torn = by_event["step 4: after optimizer and scheduler (torn)"]
    assert torn["left"] == ["checkpoint-2", "checkpoint-4"]
    between = next(r for e, r in by_event.items() if e == "rename checkpoint-2")
    assert between["left"] == ["checkpoint-2", "checkpoint-4"]
    half_deleted = [r for e, r in by_event.items() if e.startswith("unlink ") and "checkpoint-2" in e]
    assert len(half_deleted) == 4
    assert all(any(name.startswith(".sstoken-deleting-checkpoint-2") for name in r["left"]) for r in half_deleted)
    first = by_event["step 1: forward (micro-batch 0)"]
    assert first["resume"].startswith("refused: no complete checkpoint yet")
    double = fault_matrix["results"][-1]
    assert " then " in double["event"] and double["left"][-1] == "checkpoint-6"  # the second kill came after marking 6
