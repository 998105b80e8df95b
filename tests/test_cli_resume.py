"""`trl-sstoken train --resume_from_checkpoint`: the flag arrives as a string; "true" takes the last complete
checkpoint, "false" starts fresh, and a path that is not a checkpoint fails before anything is loaded."""

import json
import os

from test_cli import train_settings, write_yaml

from trl_sstoken import cli


def test_resume_from_checkpoint_true_false_and_a_typo(tmp_path, tiny_model_dir, jsonl_file, capsys):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "run.yaml", train_settings(tiny_model_dir, jsonl_file, out))
    assert cli.main(["train", "--config", str(config)]) == 0
    first = os.stat(out / "checkpoint-2").st_ino
    assert cli.main(["train", "--config", str(config), "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    assert os.stat(out / "checkpoint-2").st_ino == first  # resumed from it; a fresh run would have rewritten it
    capsys.readouterr()
    typo = str(out / "chekpoint-2")
    assert cli.main(["train", "--config", str(config), "--resume_from_checkpoint", typo]) == 2
    error = capsys.readouterr().err
    assert f"Cannot resume from {typo}: the path does not exist" in error
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(config),
                "--output_dir",
                str(tmp_path / "fresh"),
                "--resume_from_checkpoint",
                "false",
            ]
        )
        == 0
    )
    assert (tmp_path / "fresh" / "checkpoint-2").is_dir()
