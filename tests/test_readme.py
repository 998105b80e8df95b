"""The README as a new user meets it: its two commands are the Makefile's, CI runs the same one, and its Python
snippet runs as written on a CPU (with the one flag it states) and writes a model card without "None"."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import QUICKSTART_ROWS

from trl_sstoken import cli


REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
# what a calling make (`make test VENV=... PYTEST_ARGS=...`) puts in the environment of its recipes
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PYTHON", "VENV", "EXTRAS", "TORCH", "ARGS", "PYTEST_ARGS")


def code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_first_screen_shows_the_two_commands():
    first_screen = README[: README.index("Not every response token")]
    commands = [line.split("#")[0].strip() for line in code_blocks(first_screen, "bash")[0].splitlines()]
    assert commands == ["make demo", "make test"]
    # CI runs exactly the README's test command, after the README's setup step
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("make ")]
    assert ci == ["make install VENV=.venv-ci", "make test VENV=.venv-ci"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_sets_up_a_missing_venv_then_runs(tmp_path):
    """`make -n` in a fresh copy: the venv is created, CPU torch installed only when none is importable, the package
    installed with the README's extras at the pinned versions (torch excepted), then the demo / the tests run.
    (.ci/run runs the real thing from nothing.)"""
    copy = tmp_path / "clone"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, copy / name)
    for name in (".ci/constraints.txt", "tools/check_python.py"):
        (copy / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, copy / name)
    # a clean make, not a sub-make of `make test VENV=...` (which would pass its variables and directory messages)
    env = {key: value for key, value in os.environ.items() if key not in MAKE_VARIABLES}

    def plan_of(target):
        command = ["make", "--no-print-directory", "-n", target]
        return subprocess.run(command, cwd=copy, capture_output=True, text=True, check=True, env=env).stdout

    for target, runs in (("demo", "trl-sstoken demo"), ("test", "python -m pytest -q")):
        plan = plan_of(target)
        assert "python3 -m venv .venv" in plan
        assert 'import torch" 2>/dev/null' in plan and "pip install -q torch==2.13.0" in plan
        assert "grep -v '^torch==' .ci/constraints.txt" in plan
        assert '-e ".[dev,qlora,bench,dist]"' in plan
        assert plan.strip().splitlines()[-1].endswith(runs)
    # once set up (the stamp newer than pyproject.toml and the constraints), nothing is installed again
    (copy / ".venv").mkdir()
    (copy / ".venv" / ".trl-sstoken-installed").touch()
    plan = plan_of("test")
    assert "pip install" not in plan and plan.strip().endswith("python -m pytest -q")


def test_readme_snippet_runs_on_a_cpu_as_written(tmp_path, tiny_model_dir, monkeypatch):
    """The README's Python snippet, with a tiny local model for the hub id and a small dataset for `dataset`, and
    the one flag its comment states when there is no GPU."""
    snippet = next(block for block in code_blocks(README, "python") if "SSTokenTrainer(" in block)
    assert "no GPU: add use_cpu=True" in snippet
    snippet = snippet.replace('"Qwen/Qwen2.5-0.5B"', repr(str(tiny_model_dir)))
    if not cli.devices.has_accelerator():
        snippet = snippet.replace('history="base")', 'history="base", use_cpu=True)')
    from datasets import Dataset

    monkeypatch.chdir(tmp_path)
    namespace = {"dataset": Dataset.from_list(QUICKSTART_ROWS[:8])}
    exec(compile(snippet, "README.md", "exec"), namespace)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("# Model Card for out") == 1
    assert f"fine-tuned version of `{tiny_model_dir}` (a local folder)" in card
    assert "None" not in card and "huggingface.co/None" not in card and f"huggingface.co/{tiny_model_dir}" not in card
    assert 'model="out"' in card and "## ssToken token selection" in card
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")
