"""The set-up on every Python the package declares: the pinned versions (.ci/constraints.txt) fit each declared
Python, the declared versions agree everywhere they are stated, and `make` refuses an older Python in one line
before creating anything. (.ci/pythons checks the same online: pip's dry-run resolution on each interpreter, then
the set-up from nothing and the demo.)"""

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version


REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PYTHON", "VENV", "EXTRAS", "TORCH", "ARGS", "PYTEST_ARGS")

sys.path.insert(0, str(REPO / "tools"))
import check_python  # noqa: E402


def declared_minors():
    prefix = "Programming Language :: Python :: "
    minors = [c[len(prefix) :] for c in PYPROJECT["classifiers"] if c.startswith(prefix) and "." in c[len(prefix) :]]
    return sorted(minors, key=Version)


def declared_full_versions():
    """Every patch release 0..20 of each declared minor: enough to cross any python_full_version boundary a pin
    can have (pymdown-extensions 13 needs 3.11.5)."""
    return [f"{minor}.{patch}" for minor in declared_minors() for patch in range(21)]


def environment(full_version):
    env = default_environment()
    env.update(python_full_version=full_version, python_version=".".join(full_version.split(".")[:2]))
    return env


def constraints():
    lines = (REPO / ".ci/constraints.txt").read_text().splitlines()
    return [Requirement(line) for line in (line.split(" #")[0].strip() for line in lines) if line and line[0] != "#"]


def test_the_declared_pythons_agree_with_requires_python_and_the_docs():
    floor = check_python.requires_python(REPO / "pyproject.toml")
    minors = declared_minors()
    assert minors, "pyproject.toml declares no Python 3.X classifier (.ci/pythons runs on those)"
    assert Version(minors[0]) == Version(".".join(map(str, floor)))
    assert PYPROJECT["requires-python"] == f">={minors[0]}"
    # each declared minor is consecutive: none is skipped between the oldest and the newest
    assert [int(m.split(".")[1]) for m in minors] == list(range(int(minors[0].split(".")[1]), int(minors[-1][2:]) + 1))
    readme = (REPO / "README.md").read_text()
    assert f"nothing installed but Python {minors[0]}+ and `make`" in readme
    assert f"Python {minors[0]} or newer" in (REPO / "docs/quickstart.md").read_text()


def test_every_declared_python_gets_exactly_one_pin_of_each_package():
    """Environment markers split a package's pins by Python; a gap (no pin: pip would take any version) or an
    overlap (two pins: ResolutionImpossible) on some declared Python is caught here, offline."""
    pins = constraints()
    names = {canonicalize_name(pin.name) for pin in pins}
    for pin in pins:
        assert len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==", str(pin)
    for full_version in declared_full_versions():
        env = environment(full_version)
        for name in names:
            applying = [
                str(p) for p in pins if canonicalize_name(p.name) == name and (not p.marker or p.marker.evaluate(env))
            ]
            assert len(applying) == 1, f"Python {full_version}: {name} has {len(applying)} pins: {applying}"


@pytest.mark.smoke
def test_the_installed_pins_allow_every_declared_python_their_markers_give_them_to():
    """For each pin installed here at its pinned version, its own Requires-Python must admit every declared Python
    its marker applies to: pymdown-extensions 13.1.2 pinned for all Pythons fails this (it needs 3.11.5; Debian 12
    has 3.11.2). Run on each interpreter by .ci/pythons (the smoke tests), so each one's installed pins are checked;
    pip's dry run there checks the rest online."""
    checked = []
    for pin in constraints():
        try:
            installed = metadata.distribution(pin.name)
        except metadata.PackageNotFoundError:
            continue
        pinned = next(iter(pin.specifier)).version
        if Version(installed.version).public != Version(pinned).public:
            continue
        requires_python = SpecifierSet(installed.metadata.get("Requires-Python") or "")
        for full_version in declared_full_versions():
            if not pin.marker or pin.marker.evaluate(environment(full_version)):
                assert requires_python.contains(full_version), (
                    f"{pin} applies on Python {full_version}, but {pin.name} {pinned} requires Python {requires_python}"
                )
        checked.append(pin.name)
    # in a venv set up by `make install` the core pins are there to check (elsewhere: nothing to say)
    if os.environ.get("CI") and os.path.exists(os.path.join(sys.prefix, ".trl-sstoken-installed")):
        assert {"trl", "transformers", "pymdown-extensions"} <= set(checked), checked


@pytest.mark.smoke
def test_the_floor_is_the_one_the_core_dependencies_need():
    """requires-python is not lower than what the installed TRL and transformers need (both dropped 3.10)."""
    floor = ".".join(map(str, check_python.requires_python(REPO / "pyproject.toml")))
    for name in ("trl", "transformers"):
        needed = SpecifierSet(metadata.metadata(name).get("Requires-Python") or "")
        assert needed.contains(f"{floor}.0") or needed.contains(floor), f"{name} requires Python {needed}"


@pytest.mark.smoke
def test_check_python_says_what_to_do_in_one_line():
    floor = check_python.requires_python(REPO / "pyproject.toml")
    message = check_python.problem("python3", False, floor, version=(3, 10, 13))
    assert "\n" not in message
    assert "needs Python >= 3.11" in message and "python3 is Python 3.10.13" in message
    assert "PYTHON=python3.11" in message
    for version in ((3, 11, 0), (3, 11, 2), (3, 13, 0)):
        assert check_python.problem("python3", True, floor, version=version) is None


def make_plan(target, **variables):
    env = {key: value for key, value in os.environ.items() if key not in MAKE_VARIABLES}
    command = ["make", "--no-print-directory", "-n", target] + [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(sys.platform == "win32" or not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
@pytest.mark.parametrize("target", ["demo", "test", "install"])
def test_make_refuses_an_older_python_in_one_line_before_anything_else(tmp_path, target):
    """A stand-in for Python 3.10.13 (this interpreter reporting that version to tools/check_python.py): every target
    stops with the one line and a plan of nothing; no venv is created."""
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no make on this machine")
    old = tmp_path / "python3.10"
    old.write_text(
        "#!/bin/sh\n"
        f'exec "{sys.executable}" -c "import sys, runpy; sys.version_info = (3, 10, 13, \'final\', 0); '
        'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name=\'__main__\')" "$@"\n'
    )
    old.chmod(0o755)
    venv = tmp_path / "venv"
    result = make_plan(target, PYTHON=old, VENV=venv)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(
        r"needs Python >= 3\.11 .*python3\.10 is Python 3\.10\.13: run make with PYTHON=python3\.11", lines[0]
    )
    assert not venv.exists()

    result = make_plan(target, PYTHON=tmp_path / "no-such-python", VENV=venv)
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no Python" in result.stderr

    # a Python that will do goes ahead (the plan creates the venv with it)
    result = make_plan(target, PYTHON=sys.executable, VENV=venv)
    assert result.returncode == 0 and f"{sys.executable} -m venv {venv}" in result.stdout


def test_ci_runs_the_set_up_on_every_declared_python():
    """.ci/run: the constraints' resolution on each Python first, the full suite on PATH's python3, then each
    declared Python and the system Python from nothing (and the refusal below the floor)."""
    run = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines() if not line.startswith("#")]
    steps = [line for line in run if line.startswith((".ci/pythons", "make "))]
    assert steps == [
        ".ci/pythons resolve",
        "make install VENV=.venv-ci",
        "make test VENV=.venv-ci",
        ".ci/pythons setup",
        ".ci/pythons refuse",
    ]
    pythons = (REPO / ".ci/pythons").read_text()
    # the declared list is read from pyproject.toml, the system Python always runs, and a missing one fails
    assert "Programming Language :: Python :: " in pythons and "/usr/bin/python3" in pythons
    assert 'fail "Python $minor is declared but MISSING' in pythons
    assert 'PYTEST_ARGS="-m smoke' in pythons
