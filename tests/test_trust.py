"""Trust: the package never executes what it loads and writes nothing outside its output directory.

Three kinds of test (the findings are written up in docs/reliability.md, "Trust"):
- a static audit of the package source (and the shipped example) for pickle loading, `torch.load` without
  `weights_only=True`, a hard-coded `trust_remote_code=True`, `eval`/`exec` and similar, with a self-test proving
  the audit flags each pattern;
- loading what a user hands in: a model directory that needs remote code is refused without running it, and a
  checkpoint whose pickle files carry a code-running payload makes the resume fail without running it;
- a full tiny training run (train, checkpoints, evaluate, save, resume) in a subprocess whose working directory,
  HOME and TMPDIR are empty temporary directories, which must stay empty.
"""

import ast
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART_ROWS, config, lora_config
from datasets import Dataset

import trl_sstoken
from trl_sstoken import SSTokenTrainer
from trl_sstoken.history import HISTORY_ADAPTER
from trl_sstoken.saving.checkpoints import CHECKPOINT_MARKER, CheckpointError, mark_checkpoint_complete
from trl_sstoken.tiny import build_tiny_model


PACKAGE_DIR = Path(trl_sstoken.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


# ----- static audit -----

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
CODE_RUNNING_CALLS = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "builtins.compile"}
UNSAFE_CALLS = {
    "torch.jit.load": "TorchScript archives carry code",
    "os.system": "runs a shell command",
    "os.popen": "runs a shell command",
    "pandas.read_pickle": "unpickles",
    "yaml.unsafe_load": "constructs arbitrary Python objects",
    "yaml.full_load": "constructs Python objects",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _contains_true(node) -> bool:
    """True itself, or a call such as field(default=True)."""
    if _is_true(node):
        return True
    return isinstance(node, ast.Call) and any(_is_true(k.value) for k in node.keywords if k.arg == "default")


def audit_source(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe load or code-running call in a Python source file, as 'file:line: what' strings."""
    tree = ast.parse(source, filename)
    aliases = {}  # local name -> dotted name it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    aliases.setdefault("np", "numpy")
    aliases.setdefault("pd", "pandas")

    def dotted(node) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return ""
        parts.append(aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    # Loader classes defined in this file on top of a SafeLoader (e.g. one that bounds aliases) are safe too
    safe_loaders = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            dotted(base).endswith("SafeLoader") or dotted(base) in safe_loaders for base in node.bases
        ):
            safe_loaders.add(node.name)

    findings = []

    def flag(node, what):
        findings.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    flag(node, f"imports {alias.name} (pickle-style deserialisation)")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
            flag(node, f"imports from {node.module} (pickle-style deserialisation)")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name in CODE_RUNNING_CALLS:
                flag(node, f"calls {name}()")
            elif name in TORCH_LOADS and not _is_true(keywords.get("weights_only")):
                flag(node, f"calls {name}() without weights_only=True (unpickles arbitrary objects)")
            elif name in UNSAFE_CALLS:
                flag(node, f"calls {name}(): {UNSAFE_CALLS[name]}")
            elif name in ("yaml.load", "yaml.load_all") and not (
                dotted(keywords.get("Loader", ast.Constant(None))).endswith("SafeLoader")
                or dotted(keywords.get("Loader", ast.Constant(None))) in safe_loaders
            ):
                flag(node, f"calls {name}() without a SafeLoader")
            if "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False
            ):
                flag(node, "passes allow_pickle")
            if _is_true(keywords.get("trust_remote_code")):
                flag(node, "hard-codes trust_remote_code=True")
            if _is_true(keywords.get("shell")):
                flag(node, "runs a command with shell=True")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    flag(node, "hard-codes trust_remote_code=True in a dict")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                target_name = (
                    target.id
                    if isinstance(target, ast.Name)
                    else target.attr
                    if isinstance(target, ast.Attribute)
                    else target.slice.value
                    if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
                    else None
                )
                if target_name == "trust_remote_code" and node.value is not None and _contains_true(node.value):
                    flag(node, "sets trust_remote_code to True")
    return findings


def audited_files() -> list[Path]:
    """The package's Python source and the example users run."""
    files = sorted(PACKAGE_DIR.rglob("*.py")) + sorted((REPO_ROOT / "examples").glob("*.py"))
    assert any(f.name == "trainer.py" for f in files)
    return files


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(open('x', 'rb'))",
        "from pickle import loads",
        "import dill",
        "import joblib as jl",
        "import torch\ntorch.load('a.pt')",
        "import torch\ntorch.load('a.pt', weights_only=False)",
        "import torch as t\nt.load('a.pt', map_location='cpu')",
        "from torch import load\nload('a.pt')",
        "import torch\ntorch.serialization.load('a.pt')",
        "import torch\ntorch.jit.load('m.pt')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('a.pkl')",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import yaml\nclass L(yaml.Loader):\n    pass\nyaml.load(text, Loader=L)",
        "import yaml\nclass L(yaml.FullLoader):\n    pass\nyaml.load(text, Loader=L)",
        "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "kwargs = {'trust_remote_code': True}",
        "kwargs['trust_remote_code'] = True",
        "args.trust_remote_code = True",
        "class C:\n    trust_remote_code: bool = field(default=True)",
        "eval(line)",
        "exec(code)",
        "__import__(name)",
        "import os\nos.system(cmd)",
        "import subprocess\nsubprocess.run(cmd, shell=True)",
    ],
)
def test_the_audit_flags_each_unsafe_pattern(snippet):
    assert audit_source(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('a.pt', weights_only=True, map_location='cpu')",
        "model.eval()",
        "self.model.eval()",
        "AutoModel.from_pretrained(name, trust_remote_code=args.trust_remote_code)",
        "AutoModel.from_pretrained(name, trust_remote_code=False)",
        "import json\njson.loads(line)",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nclass L(yaml.SafeLoader):\n    pass\nclass M(L):\n    pass\nyaml.load(text, Loader=M)",
        "from safetensors.torch import load_file\nload_file('a.safetensors')",
        "import numpy as np\nnp.load('a.npy')",
    ],
)
def test_the_audit_passes_safe_code(snippet):
    assert audit_source(snippet) == []


def test_package_source_loads_nothing_unsafely():
    findings = [finding for path in audited_files() for finding in audit_source(path.read_text(), str(path))]
    assert findings == []


def test_package_ships_no_serialised_objects():
    """Package data is text (JSON lines); no pickle, .pt, .bin or other binary blob rides along."""
    data = [p for p in PACKAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"]
    assert data and all(p.suffix in (".jsonl", ".json", ".md", ".txt", ".typed") for p in data), data
    for path in data:
        if path.suffix == ".jsonl":
            assert all(json.loads(line) is not None for line in path.read_text().splitlines() if line.strip())


def test_trust_remote_code_is_off_by_default(tmp_path):
    assert config(tmp_path).trust_remote_code is False


# ----- loading what a user hands in -----


class CodeRunningPayload:
    """Unpickling this touches `marker`: the stand-in for any code an attacker could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def write_payload(path: Path, marker: Path):
    torch.save({"state": CodeRunningPayload(marker)}, path)


def test_the_payload_runs_when_unpickled(tmp_path):
    """Positive control: the payload is live, so the tests below would see it run."""
    marker = tmp_path / "ran"
    write_payload(tmp_path / "payload.pt", marker)
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.exists()


def test_a_model_that_needs_remote_code_is_refused_without_running_it(tmp_path, tokenizer, dataset):
    model_dir = tmp_path / "remote-code-model"
    model_dir.mkdir()
    marker = tmp_path / "remote code ran"
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "sstoken_untrusted",
                "auto_map": {
                    "AutoConfig": "untrusted.UntrustedConfig",
                    "AutoModelForCausalLM": "untrusted.UntrustedModel",
                },
            }
        )
    )
    (model_dir / "untrusted.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        SSTokenTrainer(
            model=str(model_dir),
            args=config(tmp_path, selection_method="attention"),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """checkpoint-2 of a tiny LoRA run with a lagged history: adapter, history adapter, optimizer, scheduler, RNG."""
    tmp_path = tmp_path_factory.mktemp("trust-checkpoint")
    trainer = SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=config(
            tmp_path, max_steps=2, save_strategy="steps", save_steps=2, history="lagged", history_update_steps=1
        ),
        train_dataset=Dataset.from_list(QUICKSTART_ROWS),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    path = tmp_path / "out" / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "adapter_model.safetensors"):
        assert (path / name).exists(), name
    assert (path / HISTORY_ADAPTER / "adapter_model.safetensors").exists()
    return path


def resume(tmp_path, tokenizer, checkpoint_dir, **overrides):
    trainer = SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=config(tmp_path, max_steps=3, history="lagged", history_update_steps=1, **overrides),
        train_dataset=Dataset.from_list(QUICKSTART_ROWS),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train(resume_from_checkpoint=str(checkpoint_dir))
    return trainer


@pytest.mark.parametrize(
    "poisoned",
    [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "adapter_model.bin",  # replaces the trained adapter's safetensors
        f"{HISTORY_ADAPTER}/adapter_model.bin",  # replaces the history adapter's safetensors
    ],
)
def test_resuming_from_a_poisoned_checkpoint_fails_without_running_the_payload(
    tmp_path, tokenizer, checkpoint, poisoned
):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "payload ran"
    target = copy / poisoned
    if target.suffix == ".bin":
        (target.parent / "adapter_model.safetensors").unlink()
    write_payload(target, marker)
    with pytest.raises(CheckpointError, match="Resume from another checkpoint"):  # the marker no longer matches
        resume(tmp_path, tokenizer, copy)
    remark(copy)  # a checkpoint handed over whole, its marker made to match: the loaders must still refuse
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights.only"):
        resume(tmp_path, tokenizer, copy)
    assert not marker.exists()


def remark(checkpoint_dir):
    """Records the checkpoint's current files in its marker, as whoever prepared a poisoned checkpoint would."""
    recorded = json.loads((checkpoint_dir / CHECKPOINT_MARKER).read_text())
    mark_checkpoint_complete(str(checkpoint_dir), recorded["global_step"], recorded["settings"])


def test_resuming_never_reads_the_pickled_training_args(tmp_path, tokenizer, checkpoint):
    """training_args.bin is a full pickle that Trainer writes for the user; resuming must not unpickle it."""
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "payload ran"
    write_payload(copy / "training_args.bin", marker)
    remark(copy)
    trainer = resume(tmp_path, tokenizer, copy)
    assert trainer.state.global_step == 3
    assert not marker.exists()


# ----- writes -----

TRAINING_RUN = textwrap.dedent(
    """
    import json, os, sys
    from importlib import resources

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from trl_sstoken import SSTokenConfig, SSTokenTrainer
    from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    output_dir = sys.argv[1]
    text = resources.files("trl_sstoken").joinpath("data/quickstart.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in rows])


    def trainer(max_steps):
        args = SSTokenConfig(
            output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
            logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="steps", save_steps=2,
            max_length=64, seed=0, dataloader_num_workers=0, history="lagged", history_update_steps=1,
            attention_warmup_ratio=0.25,
        )
        return SSTokenTrainer(
            model=build_tiny_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        )


    first = trainer(max_steps=4)
    first.train()
    first.evaluate(first.train_dataset.select(range(8)))
    first.save_model()
    resumed = trainer(max_steps=6)
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-4"))
    resumed.save_model()
    print("steps", first.state.global_step, resumed.state.global_step)
    """
)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_a_training_run_writes_only_into_its_output_dir(tmp_path):
    """Train with checkpoints, evaluate, save, resume and save again, with HOME, the working directory and TMPDIR
    pointing at empty directories: all three stay empty (but for torch's empty cache directory, see below), and the
    package's own files are untouched.

    The environment is built from scratch (no inherited HF_HOME, XDG_CACHE_HOME, TRANSFORMERS_CACHE...), so every
    cache location the libraries derive falls under the empty HOME. PYTHONDONTWRITEBYTECODE=1 keeps Python's own
    bytecode cache (__pycache__ next to imported modules, the interpreter's behaviour, not the package's) out of
    the comparison.
    """
    home, cwd, tmp, output_dir = (tmp_path / name for name in ("home", "cwd", "tmp", "out"))
    for directory in (home, cwd, tmp):
        directory.mkdir()
    package_before = snapshot(PACKAGE_DIR)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    result = subprocess.run(
        [sys.executable, "-c", TRAINING_RUN, str(output_dir)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "steps 4 6" in result.stdout

    # Importing peft imports torch._dynamo, whose module body (torch/_dynamo/package.py, DiskDynamoCache) creates
    # the empty directory $TMPDIR/torchinductor_<user>: torch's import side effect, tolerated only while empty
    torch_cache = [p for p in tmp.glob("torchinductor_*") if p.is_dir() and not any(p.iterdir())]
    leftovers = {
        name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p not in torch_cache)
        for name, d in (("HOME", home), ("cwd", cwd), ("TMPDIR", tmp))
    }
    assert leftovers == {"HOME": [], "cwd": [], "TMPDIR": []}
    assert snapshot(PACKAGE_DIR) == package_before

    # and the run did write where it should
    written = {str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()}
    for expected in (
        "adapter_model.safetensors",
        "checkpoint-2/optimizer.pt",
        "checkpoint-4/history/adapter_model.safetensors",
        "checkpoint-6/trainer_state.json",
    ):
        assert expected in written, sorted(written)
    assert not any(name.startswith(f"{HISTORY_ADAPTER}/") for name in written)  # the final model has no history
