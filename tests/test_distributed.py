"""Exact loss normalisation across processes: a real two-process run (torch.distributed, gloo, CPU).

1 process x 4 sequences, 1 process x 2 micro-batches x 2, and 2 processes x 2 must give the same loss and, after one
plain-SGD step (whose update is proportional to the gradient, unlike Adam's first step), the same adapter.
"""

import json
import os
import socket
import subprocess
import sys

import distributed_worker
import pytest
import torch
from safetensors.torch import load_file


HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def result(out_dir):
    with open(os.path.join(out_dir, "result.json")) as handle:
        return json.load(handle), load_file(os.path.join(out_dir, "adapter.safetensors"))


@pytest.mark.parametrize("method,normalization", [("sstoken", "selected"), ("sstoken", "sequence")])
def test_one_process_two_micro_batches_and_two_processes_agree(tmp_path, method, normalization):
    single, accumulated, two = (str(tmp_path / name) for name in ("single", "accumulated", "two"))
    distributed_worker.run(single, 4, 1, method, normalization)
    distributed_worker.run(accumulated, 2, 2, method, normalization)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(HERE, "distributed_worker.py"),
        two,
        "2",
        "1",
        method,
        normalization,
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    (single_result, single_adapter) = result(single)
    (accumulated_result, accumulated_adapter) = result(accumulated)
    (two_result, two_adapter) = result(two)
    assert two_result["world_size"] == 2 and single_result["world_size"] == 1
    assert accumulated_result["loss"] == pytest.approx(single_result["loss"], rel=1e-5)
    assert two_result["loss"] == pytest.approx(single_result["loss"], rel=1e-5)
    for name, expected in single_adapter.items():
        torch.testing.assert_close(accumulated_adapter[name], expected, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(two_adapter[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    initial = load_file(os.path.join(single, "adapter_initial.safetensors"))
    moved = max((single_adapter[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-3  # the step really moved the adapter, so equal adapters mean equal gradients
