"""Can this interpreter set up trl-sstoken? The Makefile runs it before doing anything else and stops with the one
line it prints (nothing printed: go ahead).

It runs on whatever `python3` a user has, so it is written for any Python 3 from 3.6 on (f-strings, nothing newer) and reads the
supported versions from pyproject.toml itself (`requires-python`, one source of truth). Usage:
`python tools/check_python.py [NAME [--new-venv]]`: NAME is what the message calls the interpreter (the Makefile's
$(PYTHON), or the existing venv's python), `--new-venv` also checks that a virtual environment can be created
(Debian and Ubuntu ship `venv` without `ensurepip` unless python3-venv is installed).
"""

import os
import re
import sys


# why the floor is where it is, for the message: the package's own floor follows its dependencies'
WHY = "TRL 1.16 and transformers 5.23, which it is built on, require it"


def requires_python(pyproject):
    """The `>=X.Y` of `requires-python`, as a tuple of ints (the only form this project declares)."""
    with open(pyproject) as handle:
        match = re.search(r'^requires-python\s*=\s*">=\s*([0-9.]+)"', handle.read(), flags=re.M)
    if match is None:
        raise SystemExit('tools/check_python.py: no `requires-python = ">=X.Y"` in ' + pyproject)
    return tuple(int(part) for part in match.group(1).split("."))


def problem(name, new_venv, floor, version=None):
    """The one-line message, or None when this interpreter will do."""
    version = tuple(sys.version_info[:3]) if version is None else version
    shown = ".".join(str(part) for part in version)
    wanted = ".".join(str(part) for part in floor)
    if version < floor:
        return (
            f"trl-sstoken needs Python >= {wanted} ({WHY}); {name} is Python {shown}: "
            f"run make with PYTHON=python{wanted} (or a newer python3.X)"
        )
    if new_venv:
        try:
            import ensurepip  # noqa: F401
            import venv  # noqa: F401
        except ImportError:
            minor = f"{version[0]}.{version[1]}"
            return (
                f"{name} (Python {shown}) cannot create a virtual environment (no ensurepip module): on "
                f"Debian/Ubuntu install the package python{minor}-venv (or python3-venv), then rerun"
            )
    return None


def main(argv):
    name = argv[1] if len(argv) > 1 else sys.executable
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    message = problem(name, "--new-venv" in argv[2:], requires_python(pyproject))
    if message:
        print(message)


if __name__ == "__main__":
    main(sys.argv)
