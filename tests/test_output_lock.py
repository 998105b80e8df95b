"""output_lock.py: one training run per output_dir; a second one is refused early, naming the process that trains."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from transformers import TrainerCallback

from trl_sstoken.saving.output_lock import LOCK_FILE, OutputDirInUseError, output_dir_locked


HERE = os.path.dirname(os.path.abspath(__file__))
# another process: takes the lock of argv[1] as a run does, says so, and holds it until it is killed
HOLDER = (
    "import sys\n"
    "from trl_sstoken.saving.output_lock import output_dir_locked\n"
    "with output_dir_locked(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


@pytest.fixture
def holder():
    """start(output_dir) -> a process holding the lock of output_dir; killed (SIGKILL) at the end of the test."""
    started = []

    def start(output_dir):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(output_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def in_use_by(process, output_dir):
    return (
        rf"output_dir='{output_dir}' is in use by another training run: process {process.pid} on host "
        rf"{socket.gethostname()} \(since .+, running '-c .+'\) holds its lock {output_dir}/{LOCK_FILE}\. "
    )


def test_another_process_training_into_the_output_dir_is_named_when_the_trainer_is_built(
    make_trainer, tmp_path, holder
):
    output_dir = tmp_path / "out"
    process = holder(output_dir)
    with pytest.raises(OutputDirInUseError, match=in_use_by(process, output_dir)):
        make_trainer()


def test_train_refuses_before_its_first_step_and_a_killed_holder_leaves_no_stale_lock(make_trainer, tmp_path, holder):
    output_dir = tmp_path / "out"
    trainer = make_trainer(max_steps=2, save_strategy="steps", save_steps=1)
    process = holder(output_dir)  # took the output_dir after this trainer was built
    with pytest.raises(OutputDirInUseError, match=in_use_by(process, output_dir)):
        trainer.train()
    assert trainer.state.global_step == 0 and not [n for n in os.listdir(output_dir) if n.startswith("checkpoint")]
    process.send_signal(signal.SIGKILL)
    process.wait()
    trainer.train()  # the kernel released the dead holder's lock
    assert trainer.state.global_step == 2
    assert (output_dir / LOCK_FILE).read_text() == ""  # released: no pid or host left in the file


def test_a_second_trainer_of_the_same_process_is_refused_while_the_first_trains(make_trainer, tmp_path):
    seen = []

    class TrainAnother(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            try:
                make_trainer().train()
            except OutputDirInUseError as error:
                seen.append(str(error))

    trainer = make_trainer(max_steps=1)
    trainer.add_callback(TrainAnother())
    trainer.train()
    assert len(seen) == 1 and f"another trainer of this process (pid {os.getpid()}) holds its lock" in seen[0]
    make_trainer(max_steps=1).train()  # after the first has finished, the output_dir is free


def test_the_lock_is_released_when_training_fails(make_trainer, tmp_path, holder):
    class Fail(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise RuntimeError("a failing step")

    trainer = make_trainer()
    trainer.add_callback(Fail())
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.train()
    holder(tmp_path / "out")  # another process can take it at once


def test_the_command_lines_lock_admits_its_own_trainer_only(make_trainer, tmp_path):
    output_dir = str(tmp_path / "out")
    with output_dir_locked(output_dir):  # as `trl-sstoken train` holds it from before loading
        trainer = make_trainer(max_steps=1)
        trainer.train()
        details = json.loads((tmp_path / "out" / LOCK_FILE).read_text())  # still held, by this process
        assert details["pid"] == os.getpid() and details["host"] == socket.gethostname()
    with output_dir_locked(output_dir, owner=trainer):  # a trainer's lock admits no other trainer
        with pytest.raises(OutputDirInUseError, match="another trainer of this process"):
            make_trainer()


def test_an_unwritable_output_dir_is_named(make_trainer, tmp_path):
    (tmp_path / "out").write_text("a file, not a folder")
    with pytest.raises(OutputDirInUseError, match=rf"output_dir='{tmp_path}/out' cannot be written"):
        make_trainer()


def test_every_rank_of_a_distributed_run_raises_when_the_output_dir_is_in_use(tmp_path, holder):
    from test_distributed import free_port

    output_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), os.path.join(HERE, "lock_worker.py"), str(output_dir)]

    def ranks():
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        found = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
        return {entry["rank"]: entry["error"] for entry in found}

    assert ranks() == {0: None, 1: None}
    process = holder(output_dir)
    found = ranks()
    assert sorted(found) == [0, 1]
    for error in found.values():
        assert error is not None and f"process {process.pid} on host" in error


def test_the_command_line_refuses_before_loading_anything(
    tmp_path, holder, tiny_model_dir, jsonl_file, monkeypatch, capsys
):
    from test_cli import train_settings, write_yaml

    import trl_sstoken.loading as loading
    from trl_sstoken import cli

    monkeypatch.setattr(loading, "load_sft_datasets", lambda *a, **k: pytest.fail("data loaded before the lock"))
    output_dir = tmp_path / "out"
    config = write_yaml(tmp_path / "run.yaml", train_settings(tiny_model_dir, jsonl_file, output_dir))
    process = holder(output_dir)
    assert cli.main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("trl-sstoken train: error: output_dir=") and f"process {process.pid} on host" in error
    assert "--output_dir" in error
