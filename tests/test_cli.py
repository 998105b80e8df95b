"""The trl-sstoken console script: train from a YAML config with overrides, demo, inspect, and its errors."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from conftest import QUICKSTART_ROWS, lora_config, randomize_adapter
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from test_visualize import parse_spans
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sstoken import SSTokenConfig, SSTokenTrainer, cli
from trl_sstoken.config import sstoken_fields
from trl_sstoken.history import HISTORY_ADAPTER
from trl_sstoken.loading import UsageError, load_sft_datasets, load_tokenizer, pick_split


REPO = Path(__file__).resolve().parent.parent
SENTENCE = "what is two plus three ? sure ! five ."


def write_yaml(path, settings):
    path.write_text(yaml.safe_dump(settings))
    return path


def train_settings(model_dir, data_file, output_dir, **overrides):
    settings = dict(
        model_name_or_path=str(model_dir),
        dataset_name=str(data_file),
        output_dir=str(output_dir),
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=64,
        selection_ratio=0.9,
        history="lagged",
        history_update_steps=1,
        save_strategy="steps",
        save_steps=2,
        seed=0,
    )
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, jsonl_file):
    """`trl-sstoken train --config run.yaml --selection_ratio 0.5 --lora_target_modules all-linear`, run once."""
    folder = tmp_path_factory.mktemp("train")
    config = write_yaml(folder / "run.yaml", train_settings(tiny_model_dir, jsonl_file, folder / "out"))
    status = cli.main(
        ["train", "--config", str(config), "--selection_ratio", "0.5", "--lora_target_modules", "all-linear"]
    )
    return status, folder / "out"


# ----- train -----


def test_train_applies_the_flag_override_and_saves_the_adapter_without_history(trained_run, tokenizer):
    status, out = trained_run
    assert status == 0
    # the override beat the YAML value (0.9), as the saved training arguments and the model card record
    saved_args = torch.load(out / "training_args.bin", weights_only=False)
    assert isinstance(saved_args, SSTokenConfig)
    assert saved_args.selection_ratio == 0.5 and saved_args.history == "lagged"
    card = (out / "README.md").read_text()
    assert "| `selection_ratio` | `0.5` |" in card and "| `history` | `'lagged'` |" in card
    assert "ssToken" in card and "2510.18250" in card
    # and the training logged a kept fraction that ceil(0.5 * n) explains, not ceil(0.9 * n)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    fractions = [
        entry["sstoken/selected_fraction"] for entry in state["log_history"] if "sstoken/selected_fraction" in entry
    ]
    assert len(fractions) == 2 and all(0.5 <= f < 0.7 for f in fractions)
    # the final artifact: the trained adapter only, on every linear layer (the all-linear flag reached PEFT)
    assert not (out / HISTORY_ADAPTER).exists()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any(HISTORY_ADAPTER in key for key in keys)
    assert any("mlp.down_proj.lora_A" in key for key in keys) and any("self_attn.o_proj.lora_B" in key for key in keys)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # the checkpoint keeps the history adapter, for an exact resume
    assert (out / "checkpoint-2" / HISTORY_ADAPTER / "adapter_model.safetensors").exists()
    # the saved tokenizer is the one that was trained with
    assert load_tokenizer(str(out))(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids


def test_train_accepts_dataset_mixtures_from_the_yaml(tmp_path, tiny_model_dir, jsonl_file):
    settings = train_settings(tiny_model_dir, None, tmp_path / "out", max_steps=1, save_strategy="no", history="base")
    del settings["dataset_name"]
    settings["datasets"] = [{"path": "json", "data_files": str(jsonl_file)}]
    assert cli.main(["train", "--config", str(write_yaml(tmp_path / "mix.yaml", settings))]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


# ----- errors name the flag and what is allowed -----


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--selection_ratio", "1.5"], ["selection_ratio=1.5", "(0, 1]", "--selection_ratio"]),
        (["--selection_gamma", "-1"], ["selection_gamma", "[0, 1]", "--selection_gamma"]),
        (["--history_update_steps", "0"], ["history_update_steps", ">= 1", "--history_update_steps"]),
        (["--history_ema_alpha", "1"], ["history_ema_alpha", "[0, 1)"]),
        (["--selection_ration", "0.5"], ["--selection_ration", "did you mean --selection_ratio?"]),
        (["--dataset_name", "missing/folder/train.jsonl"], ["--dataset_name", "no such file", ".jsonl"]),
        (["--model_name_or_path", ""], ["--model_name_or_path is required"]),
        (["--model_name_or_path", "./no/such/model"], ["--model_name_or_path './no/such/model'", "no such folder"]),
        (["--selection_method", "rho1"], ["selection_method='rho1' needs exactly one reference", "--reference_model"]),
        (["--attention_chunk_size", "0"], ["attention_chunk_size=0", ">= 1", "flags: --attention_chunk_size"]),
        (
            ["--selection_positions", "balanced", "--selection_method", "full"],
            ["selection_positions='balanced'", "selection_method='full'", "'sstoken'"],
        ),
        (["--selection_position_buckets", "0"], ["selection_position_buckets=0", ">= 1"]),
        (["--max_length", "-5"], ["max_length=-5", ">= 1", "--max_length"]),  # was accepted, sequences cut
        (["--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps=0", ">= 1"]),  # ZeroDivisionError
        (["--seed", "-1"], ["seed=-1", "[0, 4294967295]", "--seed"]),  # numpy's error, naming no flag
    ],
)
def test_bad_values_fail_early_naming_the_flag(tmp_path, tiny_model_dir, jsonl_file, capsys, overrides, expected):
    config = write_yaml(tmp_path / "run.yaml", train_settings(tiny_model_dir, jsonl_file, tmp_path / "out"))
    assert cli.main(["train", "--config", str(config), *overrides]) == 2
    error = capsys.readouterr().err
    assert error.startswith("trl-sstoken train: error:")
    for text in expected:
        assert text in error
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--selection_method", "best", "'sstoken', 'rel', 'attention', 'random', 'full'"),
        ("--history", "old", "'base', 'lagged', 'ema'"),
        ("--selection_loss_normalization", "mean", "'selected', 'sequence', 'all'"),
    ],
)
def test_choices_are_checked_by_the_parser(tmp_path, capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model_name_or_path", "m", flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and f"invalid choice: '{value}'" in error and allowed in error


def test_unknown_yaml_keys_and_commands_are_errors(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", {"model_name_or_path": "m", "selection_rato": 0.5})
    assert cli.main(["train", "--config", str(config), "--histroy", "base"]) == 2
    error = capsys.readouterr().err
    assert "--selection_rato (in the --config YAML), did you mean --selection_ratio?" in error
    assert "--histroy (on the command line), did you mean --history?" in error
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml': no such file" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2
    assert (
        "unknown command 'trian'; allowed: train, demo, inspect, compare. Did you mean 'train'?"
        in capsys.readouterr().err
    )
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fails the test if the CLI loads a dataset or a tokenizer (the model is loaded after both)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded data or a tokenizer before refusing its arguments")

    monkeypatch.setattr("trl_sstoken.loading.load_sft_datasets", refuse)
    monkeypatch.setattr("trl_sstoken.loading.load_tokenizer", refuse)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        # was a raw numpy TypeError after loading
        ("seed", 1.5, "seed: 1.5 is not an integer; --seed takes an integer."),
        # was PEFT's raw "unhashable type: 'list'" after loading
        (
            "lora_target_modules",
            [["q_proj"], "v_proj"],
            "lora_target_modules: item 0 of the list is a list, ['q_proj']; --lora_target_modules takes a list of",
        ),
        ("selection_method", ["rel", "attention"], "selection_method: ['rel', 'attention'] is a list;"),
        ("learning_rate", True, "learning_rate: True is a boolean, not a number"),
    ],
)
def test_yaml_values_of_the_wrong_shape_are_refused_before_loading(
    tmp_path, tiny_model_dir, jsonl_file, capsys, nothing_loaded, key, value, expected
):
    settings = train_settings(tiny_model_dir, jsonl_file, tmp_path / "out", **{key: value})
    assert cli.main(["train", "--config", str(write_yaml(tmp_path / "run.yaml", settings))]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"trl-sstoken train: error: --config '{tmp_path / 'run.yaml'}': ")
    assert expected in error


def test_yaml_values_that_fit_their_fields_are_accepted(tmp_path, tiny_model_dir, jsonl_file, monkeypatch):
    """The value check refuses only what cannot work: lists for list fields, mappings for dict fields, integers for
    float fields, the `datasets:` mixture and `env:` mapping all pass."""
    settings = train_settings(
        tiny_model_dir,
        jsonl_file,
        tmp_path / "out",
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=1,
        model_init_kwargs={"dtype": "float32"},
        report_to=["none"],
        env={"SSTOKEN_TEST_VARIABLE": 1},
    )
    monkeypatch.setenv("SSTOKEN_TEST_VARIABLE", "0")  # restored after the test; TRL sets it from `env:`
    parser = cli.make_parser("train")
    parsed = cli.parse_command_args(parser, ["--config", str(write_yaml(tmp_path / "run.yaml", settings))])
    training_args, model_args = parsed[1], parsed[2]
    assert model_args.lora_target_modules == ["q_proj", "v_proj"] and training_args.learning_rate == 1
    assert os.environ["SSTOKEN_TEST_VARIABLE"] == "1"


def test_bad_values_from_the_yaml_are_caught_too(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", {"model_name_or_path": "m", "history": "old", "use_peft": True})
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "history='old' is not supported; allowed values: 'base', 'lagged', 'ema'" in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_written_is_refused_before_loading(
    tmp_path, tiny_model_dir, jsonl_file, random_adapter, capsys, nothing_loaded
):
    """A path under a regular file was a raw NotADirectoryError from Trainer.__init__, after the data and the model
    were loaded (a file in the way stops root too; a read-only folder is tested in test_inputs.py)."""
    (tmp_path / "a-file").write_text("x")
    config = write_yaml(tmp_path / "run.yaml", train_settings(tiny_model_dir, jsonl_file, tmp_path / "a-file" / "out"))
    assert cli.main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert (
        f"--output_dir='{tmp_path / 'a-file' / 'out'}' cannot be created: '{tmp_path / 'a-file'}' is a file" in error
    )
    inspect = ["inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(jsonl_file)]
    report = tmp_path / "a-file" / "report.html"
    assert cli.main([*inspect, "--adapter_path", str(random_adapter), "--report_path", str(report), "--use_cpu"]) == 2
    assert "--report_path's folder=" in capsys.readouterr().err  # was found after scoring every example


# ----- loading by path -----


def test_tokenizer_next_to_a_qwen2_config_loads_as_saved(tiny_model_dir, tokenizer):
    expected = tokenizer(SENTENCE).input_ids
    assert load_tokenizer(str(tiny_model_dir))(SENTENCE).input_ids == expected
    # why load_tokenizer exists: AutoTokenizer builds a Qwen2 tokenizer from config.json and tokenizes differently
    assert AutoTokenizer.from_pretrained(str(tiny_model_dir))(SENTENCE).input_ids != expected


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_data_files_of_every_supported_type(tmp_path, suffix):
    rows = QUICKSTART_ROWS[:5]
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_list(rows)
    {
        ".json": lambda: path.write_text(json.dumps(rows)),
        ".jsonl": lambda: dataset.to_json(str(path)),
        ".csv": lambda: dataset.to_csv(str(path), index=False),
        ".parquet": lambda: dataset.to_parquet(str(path)),
    }[suffix]()
    loaded = pick_split(load_sft_datasets(str(path), train_split="train"), "train", "--dataset_train_split")
    assert loaded.to_list() == rows


def test_saved_datasets_and_bad_paths(tmp_path):
    Dataset.from_list(QUICKSTART_ROWS[:3]).save_to_disk(str(tmp_path / "saved"))
    assert len(load_sft_datasets(str(tmp_path / "saved"))["train"]) == 3
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        UsageError, match=r"unsupported type '.txt'; allowed file types: .json, .jsonl, .csv, .parquet"
    ):
        load_sft_datasets(str(tmp_path / "notes.txt"))
    with pytest.raises(UsageError, match="No dataset given. Pass --dataset_name"):
        load_sft_datasets(None)
    with pytest.raises(
        UsageError, match=r"--dataset_test_split 'test' is not a split of the dataset; its splits are: train"
    ):
        pick_split(load_sft_datasets(str(tmp_path / "saved")), "test", "--dataset_test_split")


def test_a_model_folder_or_unreadable_data_as_dataset_name_is_a_usage_error(tmp_path, tiny_model_dir):
    """Each was a raw datasets error: DatasetGenerationError ("An error occurred while generating the dataset") for
    a model folder (its JSON files read as rows) and a malformed .jsonl, EmptyDatasetError for a folder without data."""
    with pytest.raises(
        UsageError, match=r"--dataset_name '.*' is a saved model, not a dataset \(it holds config.json"
    ):
        load_sft_datasets(str(tiny_model_dir))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(UsageError, match=r"broken.jsonl' could not be read as a dataset: ArrowInvalid: JSON parse"):
        load_sft_datasets(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"--dataset_name '.*empty': .*doesn't contain any data files"):
        load_sft_datasets(str(tmp_path / "empty"))


def test_the_cli_refuses_a_model_folder_as_dataset_before_loading_the_model(
    tmp_path, tiny_model_dir, jsonl_file, capsys, monkeypatch
):
    monkeypatch.setattr("trl_sstoken.loading.load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    config = write_yaml(tmp_path / "run.yaml", train_settings(tiny_model_dir, tiny_model_dir, tmp_path / "out"))
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "is a saved model, not a dataset" in capsys.readouterr().err


# ----- inspect -----


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter with non-zero weights, saved next to nothing else: the adapted model differs from its base."""
    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(lora_dropout=0.0))
    randomize_adapter(model)
    model.save_pretrained(folder)
    return folder


def expected_selection(model_dir, adapter_dir, rows, batch_size, history_weights=None, **config):
    """(response positions, kept positions) per example, straight from SSTokenTrainer.preview_selection."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, is_trainable=True)
    args = SSTokenConfig(output_dir=str(model_dir / "scratch"), report_to="none", use_cpu=True, bf16=False, **config)
    trainer = SSTokenTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(str(model_dir))
    )
    if history_weights is not None:
        cli.inspect._load_history_adapter(trainer.model, str(history_weights))
    expected = []
    for start in range(0, len(rows), batch_size):
        batch = trainer.data_collator(
            [trainer.train_dataset[i] for i in range(start, min(start + batch_size, len(rows)))]
        )
        selection = trainer.preview_selection(batch)
        for response, keep in zip(selection.regions.response.tolist(), selection.keep.tolist(), strict=True):
            expected.append(({j + 1 for j, r in enumerate(response) if r}, {j + 1 for j, k in enumerate(keep) if k}))
    return expected, trainer


def page_selection(page):
    by_example = {}
    for span in parse_spans(page):
        if "data-kept" in span:
            response, kept = by_example.setdefault(span["example"], (set(), set()))
            response.add(int(span["data-pos"]))
            if span["data-kept"] == "1":
                kept.add(int(span["data-pos"]))
    return [by_example[i] for i in sorted(by_example)]


def test_inspect_page_marks_exactly_what_preview_selection_keeps(
    tmp_path, tiny_model_dir, jsonl_file, random_adapter, capsys
):
    report = tmp_path / "report.html"
    status = cli.main(
        [
            "inspect",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--adapter_path",
            str(random_adapter),
            "--dataset_name",
            str(jsonl_file),
            "--num_examples",
            "6",
            "--per_device_train_batch_size",
            "4",
            "--max_length",
            "64",
            "--use_cpu",
            "--report_path",
            str(report),
        ]
    )
    assert status == 0
    assert f"Report written to {report}" in capsys.readouterr().out
    page = report.read_text()
    expected, _ = expected_selection(tiny_model_dir, random_adapter, QUICKSTART_ROWS[:6], 4, max_length=64)
    shown = page_selection(page)
    assert len(shown) == 6
    assert shown == expected
    assert any(len(kept) < len(response) for response, kept in shown)  # something was dropped
    assert "REL " in page and "attention " in page and 'id="by-position"' in page and 'id="by-type"' in page


def test_inspect_a_checkpoint_with_its_lagged_history(tmp_path, trained_run, tiny_model_dir, jsonl_file):
    _, out = trained_run
    checkpoint = out / "checkpoint-2"
    report = tmp_path / "lagged.html"
    arguments = [
        "inspect",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--adapter_path",
        str(checkpoint),
        "--history",
        "lagged",
        "--dataset_name",
        str(jsonl_file),
        "--num_examples",
        "4",
        "--max_length",
        "64",
        "--use_cpu",
        "--report_path",
        str(report),
    ]
    assert cli.main(arguments) == 0
    # the reference: a trainer whose history (a copy of the adapter at first) gets the checkpoint's history weights
    weights = checkpoint / HISTORY_ADAPTER / "adapter_model.safetensors"
    expected, trainer = expected_selection(
        tiny_model_dir, checkpoint, QUICKSTART_ROWS[:4], 8, history_weights=weights, max_length=64, history="lagged"
    )
    saved = load_file(str(weights))  # keys without the adapter name
    loaded = {name: p for name, p in trainer.model.named_parameters() if f".{HISTORY_ADAPTER}." in name}
    assert len(loaded) == len(saved) > 0
    for name, param in loaded.items():
        assert not param.requires_grad
        torch.testing.assert_close(param.detach(), saved[name.replace(f".{HISTORY_ADAPTER}.", ".")])
    assert page_selection(report.read_text()) == expected


def test_inspect_needs_an_adapter_for_rel_and_a_checkpoint_for_lagged(
    tmp_path, tiny_model_dir, jsonl_file, random_adapter, capsys
):
    base = ["inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(jsonl_file), "--use_cpu"]
    assert cli.main(base) == 2
    assert "--selection_method sstoken needs a LoRA adapter" in capsys.readouterr().err
    assert cli.main(base + ["--adapter_path", str(random_adapter), "--history", "ema"]) == 2
    assert "--history ema needs the history adapter saved with a checkpoint" in capsys.readouterr().err
    assert cli.main(base + ["--adapter_path", str(tmp_path)]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert cli.main(base + ["--num_examples", "0", "--selection_method", "attention"]) == 2
    assert "--num_examples=0 is out of range" in capsys.readouterr().err
    assert (
        cli.main(
            ["inspect", "--model_name_or_path", str(random_adapter), "--dataset_name", str(jsonl_file), "--use_cpu"]
        )
        == 2
    )
    assert "holds a PEFT adapter, not a model" in capsys.readouterr().err


def test_inspect_without_adapter_by_attention(tmp_path, tiny_model_dir, jsonl_file):
    report = tmp_path / "attention.html"
    arguments = [
        "inspect",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(jsonl_file),
        "--selection_method",
        "attention",
        "--num_examples",
        "3",
        "--use_cpu",
        "--report_path",
        str(report),
    ]
    assert cli.main(arguments) == 0
    spans = [s for s in parse_spans(report.read_text()) if "data-kept" in s]
    assert spans and all("attention " in s["title"] and "REL" not in s["title"] for s in spans)


# ----- demo -----


def test_demo_runs_offline_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    status = cli.main(
        [
            "demo",
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--num_report_examples",
            "5",
            "--logging_steps",
            "2",
            "--history_update_steps",
            "2",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "Plain NLL over every response token" in printed and "Selection report:" in printed
    assert (out / "adapter_model.safetensors").exists() and not (out / HISTORY_ADAPTER).exists()
    assert (out / "base_model" / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "## ssToken token selection" in card and "| `history` | `'lagged'` |" in card
    page = (out / "selection_report.html").read_text()
    assert len(page_selection(page)) == 5
    assert (out / "selection.svg").read_text().startswith("<svg")
    # the printed "inspect it again" command works on what the demo saved
    command = next(line for line in printed.splitlines() if line.startswith("Inspect it again:"))
    arguments = command.split("trl-sstoken ", 1)[1].split() + [
        "--num_examples",
        "2",
        "--report_path",
        str(tmp_path / "again.html"),
    ]
    assert cli.main(arguments) == 0 and (tmp_path / "again.html").exists()


def test_demo_rejects_bad_values(capsys):
    assert cli.main(["demo", "--hidden_size", "12"]) == 2
    assert "--hidden_size must be a multiple of 8" in capsys.readouterr().err


# ----- the console script -----


@pytest.mark.smoke
def test_console_script_is_declared_and_runs_as_a_module():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["trl-sstoken"].split(":")
    assert (module, function) == ("trl_sstoken.cli", "entry_point")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "trl_sstoken.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0
    assert "usage: trl-sstoken train" in result.stdout
    for field in sstoken_fields():
        assert f"--{field.name}" in result.stdout


@pytest.mark.parametrize("config", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    parser = cli.make_parser("train")
    script_args, training_args, model_args, dataset_args, _ = cli.arguments.parse_command_args(
        parser, ["--config", str(config), "--bf16", "false"]
    )
    assert model_args.model_name_or_path and script_args.dataset_name
    assert training_args.selection_method in ("sstoken", "full") and model_args.use_peft
    assert training_args.assistant_only_loss  # the shipped configs use conversational data


# ----- a machine without a GPU, noise, YAML errors, docs commands -----


def docs_commands(path, program="trl-sstoken inspect", substitute=None):
    """The shell commands of a docs page's bash blocks that start with `program` (continuation lines joined), with the
    `substitute` replacements made."""
    text = (REPO / path).read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #", 1)[0].strip()
            for placeholder, value in (substitute or {}).items():
                command = command.replace(placeholder, value)
            if command.startswith(program):
                commands.append(shlex.split(command)[1:])
    return commands


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_without_a_gpu_the_cli_chooses_cpu_and_precision_unless_set(monkeypatch, tmp_path, bf16_cpu):
    monkeypatch.setattr(cli.devices, "has_accelerator", lambda: False)
    monkeypatch.setattr(cli.devices, "cpu_supports_bf16", lambda: bf16_cpu)

    def parse(command, args):
        parser = cli.make_parser(command)
        chosen = cli.devices.choose_device_defaults(parser, command, cli.arguments.explicit_settings(args))
        return chosen, cli.arguments.parse_command_args(parser, args)[1]

    chosen, args = parse("inspect", ["--model_name_or_path", "m", "--dataset_name", "d"])
    assert chosen == {"use_cpu": True, "bf16": bf16_cpu, "dataloader_pin_memory": False}
    assert args.use_cpu and args.bf16 == bf16_cpu and not args.dataloader_pin_memory
    note = cli.devices._device_note("inspect", args, chosen)
    assert note.startswith("trl-sstoken inspect: no GPU found: running on the CPU in ")
    assert (
        "bf16 mixed precision (this CPU has native bf16)" if bf16_cpu else "float32 (this CPU has no native bf16)"
    ) in note
    # what the user set, on the command line (any spelling) or in the YAML, stands
    chosen, args = parse("train", ["--model_name_or_path", "m", "--bf16=false", "--dataloader-pin-memory", "true"])
    assert chosen == {"use_cpu": True} and not args.bf16
    config = write_yaml(tmp_path / "run.yaml", {"model_name_or_path": "m", "use_cpu": False, "bf16": False})
    chosen, args = parse("train", ["--config", str(config)])
    assert "use_cpu" not in chosen and "bf16" not in chosen and not args.use_cpu
    # the tiny demo keeps float32; a real model gets the CPU's precision
    assert "bf16" not in parse("demo", [])[0] and not parse("demo", [])[1].bf16
    assert parse("demo", ["--model_name_or_path", "m"])[1].bf16 == bf16_cpu
    # with a GPU, TRL's defaults stand
    monkeypatch.setattr(cli.devices, "has_accelerator", lambda: True)
    assert cli.devices.choose_device_defaults(cli.make_parser("train"), "train", set()) == {}


def test_the_docs_inspect_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """docs/quickstart.md's inspect of the demo, as written after the demo (no --use_cpu: the CLI chooses); its
    inspect of a hub model and docs/cli.md's parse (they need the hub)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--max_steps", "2", "--num_report_examples", "2"]) == 0
    printed = capsys.readouterr().out
    data = next(line for line in printed.splitlines() if line.startswith("Inspect it again:")).rsplit(" ", 1)[1]
    local, hub = docs_commands("docs/quickstart.md", substitute={"<path printed by the demo>/quickstart.jsonl": data})
    assert data in local
    assert cli.main(local) == 0
    assert (tmp_path / "sstoken_report.html").exists()
    for arguments in (hub, *docs_commands("docs/cli.md")):
        if "MODEL" in arguments:  # the synopsis
            continue
        parser = cli.make_parser("inspect")
        cli.devices.choose_device_defaults(parser, "inspect", cli.arguments.explicit_settings(arguments[1:]))
        cli.arguments.parse_command_args(parser, arguments[1:])


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nselection_ratio: [0.5\nhistory: base\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith(f"trl-sstoken train: error: --config {config}:3:8: not valid YAML: ")
    assert "Traceback" not in error


def test_train_without_peft_says_it_copies_the_model(tmp_path, tiny_model_dir, jsonl_file, capsys):
    settings = train_settings(tiny_model_dir, jsonl_file, tmp_path / "out", max_steps=1, save_strategy="no")
    del settings["use_peft"]
    assert cli.main(["train", "--config", str(write_yaml(tmp_path / "full.yaml", settings))]) == 0
    printed = capsys.readouterr().out
    assert "trl-sstoken train: history: a lagged copy of the whole model (" in printed
    assert "full fine-tuning, because --use_peft is not set" in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"on the local dataset `{jsonl_file}`" in card and "None" not in card


def test_the_console_script_filters_other_libraries_noise_only(tmp_path):
    """`trl-sstoken` (entry_point) drops bitsandbytes' kernels notice and transformers' gradient_checkpointing
    deprecations; importing the library does not (filters are the CLI's, not global)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    script = "import sys; from trl_sstoken.cli import entry_point; sys.argv[0] = 'trl-sstoken'; entry_point()"
    arguments = ["demo", "--output_dir", str(tmp_path / "demo"), "--max_steps", "1", "--num_report_examples", "1"]
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gemm_4bit_forward" not in result.stderr and "gradient_checkpointing` is deprecated" not in result.stderr
    assert "Selection report:" in result.stdout
    if not cli.devices.has_accelerator():
        assert "no GPU found: running on the CPU in float32" in result.stdout
    library = subprocess.run(
        [
            sys.executable,
            "-W",
            "default",
            "-c",
            "import trl_sstoken; from trl import SFTConfig; SFTConfig('o', use_cpu=True)",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "gradient_checkpointing` is deprecated" in library.stderr
    if cli.devices.cpu_supports_bf16():  # bitsandbytes tries the optional kernels only on such CPUs
        assert "gemm_4bit_forward" in library.stderr
