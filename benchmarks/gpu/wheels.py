"""Are the requirements of the stack met on this machine, and can the carried compat wheels meet those that are not?

The GPU image has its own torch, an older transformers, peft, accelerate, tokenizers, huggingface_hub, safetensors and
pyarrow; `.whl/` (fetched by `benchmarks/gpu/fetch-wheels.sh`) brings trl, datasets, bitsandbytes, transformers 5.23
and peft. transformers 5.23 checks some versions when it is imported (tokenizers >= 0.23.1, huggingface-hub >= 1.31,
safetensors >= 0.8, regex, ...), which the image's may not meet: `.whl/compat/` holds wheels for those, and this
module installs, from there only, the ones whose requirement is not met (`pip install --no-index --no-deps --target`
into the folder the device command puts first on PYTHONPATH). Standard library and `packaging` only; nothing here
imports the stack itself.
"""

import glob
import os
import re
import subprocess
import sys


ROOTS = ("transformers", "trl", "datasets", "peft", "accelerate", "bitsandbytes")
# The image's own torch is taken as it is (its CUDA libraries need not be pip distributions)
NOT_EXPANDED = {"torch"}
PROJECT_REQUIREMENTS = (
    "torch>=2.4",
    "trl>=1.16,<2",
    "transformers>=5.23,<6",
    "peft>=0.21,<1",
    "accelerate>=1.15",
    "datasets>=5.2",
    "bitsandbytes>=0.50",
)


def unmet_requirements():
    """[(requirement, required by, installed version or None)] over the stack's dependency closure."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    def installed(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    unmet, seen = [], set()
    queue = [(Requirement(text), "trl-sstoken") for text in PROJECT_REQUIREMENTS]
    for root in ROOTS:
        queue.append((Requirement(root), "the GPU check"))
    while queue:
        requirement, parent = queue.pop(0)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = (_normal(requirement.name), str(requirement.specifier), parent)
        if key in seen:
            continue
        seen.add(key)
        version = installed(requirement.name)
        if version is None or (
            requirement.specifier and not requirement.specifier.contains(version, prereleases=True)
        ):
            unmet.append((str(requirement), parent, version))
            continue
        if _normal(requirement.name) not in NOT_EXPANDED:  # the whole closure: httpx2 needs httpcore2, ...
            for text in metadata.requires(requirement.name) or []:
                queue.append((Requirement(text), requirement.name))
    return unmet


def compat_wheels(compat_dir):
    """{normalised name: [(version, path)]} of the wheels in `compat_dir`."""
    found = {}
    for path in sorted(glob.glob(os.path.join(compat_dir, "*.whl"))):
        name, version = os.path.basename(path).split("-")[:2]
        found.setdefault(_normal(name), []).append((version, path))
    return found


def check_and_fix(site=None, compat_dir=None):
    """The unmet requirements before and after installing what `compat_dir` can meet into `site` (if given)."""
    report = {"python": sys.version.split()[0], "site": site, "installed_from_compat": []}
    try:
        before = unmet_requirements()
    except Exception as error:  # noqa: BLE001 - packaging missing, broken metadata: report, never stop here
        report["error"] = f"{type(error).__name__}: {error}"
        return report
    report["unmet_before"] = [_describe(item) for item in before]
    unmet = before
    # A wheel installed from compat can bring requirements of its own (huggingface-hub 2 needs httpx2, hf-xet, ...):
    # a few rounds, each installing what compat can meet of what is still unmet
    for _ in range(4):
        chosen = _choose(unmet, compat_dir, report["installed_from_compat"]) if site and compat_dir else []
        if not chosen:
            break
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            site,
            *chosen,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        report["installed_from_compat"] += [os.path.basename(path) for path in chosen]
        if completed.returncode != 0:
            report["install_error"] = completed.stderr[-2000:]
            break
        import importlib

        importlib.invalidate_caches()
        unmet = unmet_requirements()
    report["unmet"] = [_describe(item) for item in unmet]
    return report


def _choose(unmet, compat_dir, already):
    """The newest compat wheel meeting each unmet requirement, not installed before."""
    from packaging.requirements import Requirement

    available = compat_wheels(compat_dir)
    chosen = []
    for text, _, _ in unmet:
        requirement = Requirement(text)
        for version, path in reversed(available.get(_normal(requirement.name), [])):
            if not requirement.specifier or requirement.specifier.contains(version, prereleases=True):
                if path not in chosen and os.path.basename(path) not in already:
                    chosen.append(path)
                break
    return chosen


def describe(report):
    """Log lines for a check_and_fix report."""
    if "error" in report:
        return [f"requirement check not possible: {report['error']}"]
    lines = []
    if report["installed_from_compat"]:
        lines.append(f"installed from .whl/compat: {', '.join(report['installed_from_compat'])}")
    if report.get("install_error"):
        lines.append(f"compat install failed: {report['install_error'][-300:]}")
    lines.append("unmet requirements: " + ("; ".join(report["unmet"]) if report["unmet"] else "none"))
    return lines


def _describe(item):
    text, parent, version = item
    return f"{text} (for {parent}; installed: {version or 'none'})"


def _normal(name):
    return re.sub(r"[-_.]+", "-", name).lower()
