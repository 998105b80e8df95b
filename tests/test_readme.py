"""The README as a new user meets it: its two commands are the Makefile's, CI runs the same one, and its Python
snippet runs as written on a CPU (with the one flag it states) and writes a model card without "None"."""

import os
import re
import shutil
import subprocess
import sys
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


FAKE_PYTHON = """#!/bin/sh
# A stand-in interpreter: records each call, answers what the Makefile asks of it, installs and tests nothing.
echo "$*" >> "$CALLS"
case "$1 $2" in
    "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
    "-c import torch") [ -f "$TORCH_IMPORTABLE" ] ;;
    "-c import torch; print(torch.__version__)") [ -f "$TORCH_IMPORTABLE" ] && echo 2.13.0 ;;
    "-m pip") case "$*" in *"torch=="*) touch "$TORCH_IMPORTABLE" ;; esac ;;
    "-m pytest") ;;
    *) exec "$REAL_PYTHON" "$@" ;;  # tools/check_python.py: the real check, on the real interpreter
esac
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_sets_up_what_is_missing_then_runs(tmp_path):
    """What `make` does in a fresh copy, recorded by a stand-in Python: creates the venv, installs torch only when
    none is importable, installs the package with the README's extras at the pinned versions (torch excepted), runs
    the command; once set up it installs nothing again, and a changed pyproject.toml sets up again.
    (.ci/run and .ci/pythons run the real thing from nothing.)"""
    copy = tmp_path / "clone"
    for name in ("Makefile", "pyproject.toml", ".ci/constraints.txt", "tools/check_python.py"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, copy / name)
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls, torch_marker = tmp_path / "calls", tmp_path / "torch-importable"
    # a clean make, not a sub-make of `make test VENV=...` (which would pass its variables and directory messages)
    env = {key: value for key, value in os.environ.items() if key not in MAKE_VARIABLES}
    env.update(CALLS=str(calls), TORCH_IMPORTABLE=str(torch_marker), REAL_PYTHON=sys.executable)

    def run(target) -> list[str]:
        calls.write_text("")
        subprocess.run(
            ["make", "--no-print-directory", target, f"PYTHON={python}"],
            cwd=copy,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return [line for line in calls.read_text().splitlines() if "check_python.py" not in line]

    extras = re.search(r"^EXTRAS \?= (\S+)$", (REPO / "Makefile").read_text(), flags=re.M).group(1)
    readme_install = re.search(r'pip install -c \.ci/constraints\.txt -e "\.\[([^]]+)\]"', README).group(1)
    assert extras == readme_install  # the Makefile installs what the README's by-hand steps install

    first = run("test")
    assert first[0] == f"-m venv {copy / '.venv'}" or first[0] == "-m venv .venv"
    assert "-m pip install -q torch==2.13.0" in first
    package = [call for call in first if call.startswith("-m pip install -q -c")]
    assert package == [f"-m pip install -q -c .venv/constraints-without-torch.txt -e .[{extras}]"]
    assert first.index("-m pip install -q torch==2.13.0") < first.index(package[0])
    assert first[-1] == "-m pytest -q"
    pinned = (copy / ".venv/constraints-without-torch.txt").read_text().splitlines()
    assert pinned and not any(line.startswith("torch==") for line in pinned)
    assert "trl==1.16.0" in pinned

    assert run("test") == ["-m pytest -q"]  # set up: nothing installed again
    os.utime(copy / "pyproject.toml")  # newer than the stamp: set up again, keeping the torch that is there
    again = run("install")
    assert not any("torch==" in call for call in again)
    assert any(call.startswith("-m pip install -q -c") for call in again)
    assert not any(call.startswith("-m venv") for call in again)


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
