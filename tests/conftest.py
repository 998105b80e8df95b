"""Shared tiny fixtures: everything is built locally, offline, on one CPU thread."""

import copy
import json
import os
import subprocess
from importlib import resources


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig  # noqa: E402

from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.saving.temporary_files import _host, _pid_namespace  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


torch.set_num_threads(1)


# ----- test tiers (pytest markers), so a contributor can run the fast ones first: `make test-fast` = `-m unit` -----
# Every test gets exactly one tier. A test may set its own (`@pytest.mark.reliability`); otherwise its file's tier
# below applies; otherwise a test that builds a trainer through `make_trainer` is `trainer`, and the rest is `unit`.
TIERS = {
    "unit": "fast unit tests: pure functions and small objects, no training run (make test-fast)",
    "trainer": "trains tiny models through SSTokenTrainer or runs the CLI on them",
    "reliability": "interruption, resume, corruption, divergence and bad-input behaviour (docs/reliability.md)",
    "real_model": "runs a real pretrained model (SmolLM2-135M, gemma-3-270m); skip with TRL_SSTOKEN_SKIP_REAL_MODELS=1",
    "benchmark": "the benchmarks' harnesses and the GPU check's CPU dry run, at toy scale",
    "distributed": "two-process runs of DDP, FSDP and DeepSpeed on the CPU",
}
FILE_TIERS = {
    "trainer": (
        "test_attention_architectures", "test_baselines", "test_cache", "test_cli", "test_collator",
        "test_data_shapes", "test_docs", "test_examples", "test_full_finetuning", "test_integration",
        "test_out_of_tree_method", "test_prompt_learning", "test_qlora", "test_readme", "test_reference_training",
        "test_trainer", "test_compare",
    ),
    "reliability": (
        "test_bad_input", "test_cache_integrity", "test_checkpoints", "test_cli_resume", "test_config_file",
        "test_deterministic_history", "test_divergence", "test_faults", "test_output_lock", "test_resume",
        "test_resume_qlora", "test_temporary_files", "test_trust",
    ),
    "real_model": ("test_quality_real", "test_real_model_demo", "test_real_models"),
    "benchmark": ("test_defaults_rule", "test_gpu_check", "test_perf_benchmark", "test_quality_benchmark",
                  "test_quality_calibration"),
    "distributed": ("test_distributed",),
}  # fmt: skip
_TIER_OF_FILE = {name: tier for tier, names in FILE_TIERS.items() for name in names}


def pytest_configure(config):
    for tier, description in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {description}")


def tier_of(item) -> str:
    own = [tier for tier in TIERS if item.get_closest_marker(tier) is not None and tier != "real_model"]
    if item.get_closest_marker("real_model") is not None:  # a real model dominates: it is the slow part
        return "real_model"
    if own:
        return own[0]
    module = item.path.stem
    if "distributed" in item.path.parts[:-1]:
        return "distributed"
    if module in _TIER_OF_FILE:
        return _TIER_OF_FILE[module]
    return "trainer" if "make_trainer" in getattr(item, "fixturenames", ()) else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))


def _quickstart_rows():
    text = resources.files("trl_sstoken").joinpath("data/quickstart.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


QUICKSTART_ROWS = _quickstart_rows()


@pytest.fixture(scope="session")
def rows():
    return copy.deepcopy(QUICKSTART_ROWS)


@pytest.fixture(scope="session")
def tokenizer():
    texts = [row["prompt"] + row["completion"] for row in QUICKSTART_ROWS]
    texts.append("once upon a time there was a tiny model that liked words")
    return build_tiny_tokenizer(texts)


@pytest.fixture(scope="session")
def dataset():
    return Dataset.from_list(QUICKSTART_ROWS)


def lora_config(**overrides):
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    settings.update(overrides)
    return LoraConfig(**settings)


def config(tmp_path, config_class=None, **overrides):
    """SSTokenConfig (or `config_class`, e.g. plain SFTConfig for comparisons) with the tests' tiny settings."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=64,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return (config_class or SSTokenConfig)(**settings)


@pytest.fixture
def make_trainer(tmp_path, tokenizer, dataset):
    """make_trainer(architecture="qwen2", peft=True, **config_overrides) -> SSTokenTrainer on a fresh tiny model."""

    def make(
        architecture="qwen2", peft=True, train_dataset=None, trainer_class=SSTokenTrainer, lora=None, **overrides
    ):
        model = build_tiny_model(tokenizer, architecture=architecture)
        plain = not issubclass(trainer_class, SSTokenTrainer)  # a plain SFTTrainer gets a plain SFTConfig
        return trainer_class(
            model=model,
            args=config(tmp_path, config_class=SFTConfig if plain else None, **overrides),
            train_dataset=dataset if train_dataset is None else train_dataset,
            processing_class=tokenizer,
            peft_config=(lora or lora_config()) if peft else None,
        )

    return make


def first_batch(trainer, size=None):
    """A collated training batch on the trainer's device, in the order the trainer would see it."""
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    if size is not None:
        batch = {key: value[:size] for key, value in batch.items()}
    return trainer._prepare_inputs(batch)


def randomize_adapter(model, seed=1, scale=0.5):
    """Gives LoRA B matrices non-zero values so the adapted model differs from its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def record_selections(trainer):
    """Wraps the trainer's selection so every micro-batch's keep mask is recorded as (global_step, keep)."""
    recorded = []
    select = trainer._select

    def recording_select(*args, **kwargs):
        selection = select(*args, **kwargs)
        recorded.append((trainer.state.global_step, selection.keep.detach().cpu().clone()))
        return selection

    trainer._select = recording_select
    return recorded


def count_calls(obj, method_name):
    """Counts calls of obj.method_name (an instance-level wrapper)."""
    calls = []
    original = getattr(obj, method_name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, method_name, counted)
    return calls


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen2 model and its tokenizer saved with `save_pretrained`: a local folder to load by path."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def jsonl_file(tmp_path_factory):
    """The quickstart rows as a local .jsonl file."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUICKSTART_ROWS))
    return path


def chromium_or_skip():
    """Chromium's path. Without one the test is skipped, except with CI=true (set by .ci/run), where it fails: CI
    installs Chromium, so a missing browser there is a broken setup, not a reason to test less."""
    from tools.report_screenshot import find_chromium

    path = find_chromium()
    if path is None:
        message = "no Chromium on this machine (apt-get install chromium); see docs/selection-report.md"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; CI=true, so the browser tests must run")
        pytest.skip(message)
    return path


def _real_model_dir(name):
    """A real pretrained model folder (tools.real_models). Missing is a failure unless skipped on purpose."""
    from tools.real_models import SKIP_ENV, real_model_path

    if os.environ.get(SKIP_ENV):
        pytest.skip(f"{SKIP_ENV} is set: real-model tests skipped on purpose")
    return real_model_path(name)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (Llama architecture, ChatML template, bf16 weights)."""
    return _real_model_dir("smollm2")


@pytest.fixture(scope="session")
def gemma3_dir():
    """gemma-3-270m (base) as a plain Hugging Face folder (Gemma3, sliding-window layers, bf16 weights)."""
    return _real_model_dir("gemma3")


def dead_writers_temporary_name(prefix):
    """A temporary name as `temporary_files.temporary_name` gives it, of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{prefix}.{_host()}.{_pid_namespace()}.{process.pid}-1.0badf00d.tmp"
