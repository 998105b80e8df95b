"""The examples run: the TRL-style script, the 24 GB QLoRA script (4-bit on the CPU), the Colab notebook, the configs."""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from trl_sstoken.history import HISTORY_ADAPTER
from trl_sstoken.loading import load_tokenizer
from trl_sstoken.tiny import build_tiny_model


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_flags(model_dir, data_file, output_dir):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data_file),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_length",
        "64",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--save_strategy",
        "no",
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
    ]


def test_sft_sstoken_script_trains_and_saves(tmp_path, tiny_model_dir, jsonl_file):
    example = load_example("sft_sstoken.py")
    parser = example.make_parser()
    flags = tiny_flags(tiny_model_dir, jsonl_file, tmp_path / "out") + ["--selection_ratio", "0.5", "--history", "ema"]
    trainer = example.main(*parser.parse_args_and_config(flags))
    assert trainer.args.selection_ratio == 0.5 and trainer.args.history == "ema"
    assert trainer.state.global_step == 2
    fractions = [e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    assert len(fractions) == 2 and all(0.5 <= f < 0.7 for f in fractions)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and not (
        tmp_path / "out" / HISTORY_ADAPTER
    ).exists()
    assert "## ssToken token selection" in (tmp_path / "out" / "README.md").read_text()


def test_qlora_single_gpu_script_trains_in_4_bits(tmp_path, tiny_model_dir, jsonl_file, capsys):
    """The 24 GB script with its own defaults, except the model, data, length and CPU flags: 4-bit NF4 + LoRA."""
    example = load_example("qlora_single_gpu.py")
    assert example.QLORA_24GB["load_in_4bit"] and example.QLORA_24GB["gradient_checkpointing"]
    flags = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(jsonl_file),
        "--output_dir",
        str(tmp_path / "out"),
        "--assistant_only_loss",
        "false",
        "--max_steps",
        "2",
        "--max_length",
        "64",
        "--gradient_accumulation_steps",
        "1",
        "--dtype",
        "float32",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--lora_r",
        "4",
    ]
    trainer = example.main(flags)
    printed = capsys.readouterr().out
    assert "Estimated GPU memory of one step" in printed and "total (estimate)" in printed
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    assert type(base.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    assert trainer.state.global_step == 2
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 16 and adapter_config["lora_dropout"] == 0.1


def test_memory_estimate_adds_up():
    example = load_example("qlora_single_gpu.py")
    config = type(
        "Config",
        (),
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            tie_word_embeddings=False,
        ),
    )()
    parts = example.estimate_memory_gib(config, lora_r=8, batch_size=2, max_length=16, history="lagged")
    total = parts.pop("total (estimate)")
    assert total == pytest.approx(sum(parts.values()))
    linear = 2 * (64 * 64 + 64 * 32 * 2 + 64 * 64 + 3 * 64 * 128)  # q, k and v (2 KV heads of 16), o, gate/up/down
    assert parts["4-bit linear weights"] == pytest.approx(linear * 0.516 / 1024**3)
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert parts["LoRA weights, gradients, AdamW states (bf16)"] == pytest.approx(lora * 8 / 1024**3)
    assert parts["history adapter (lagged/ema only)"] == pytest.approx(lora * 2 / 1024**3)


def run_notebook(path, parameters, workdir):
    """Executes a notebook with `parameters` injected after its cell tagged "parameters" (as papermill does)."""
    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport torch\ntorch.set_num_threads(1)\n{source}"
    )
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return notebook


@pytest.fixture(scope="module")
def tiny_model_dir_64(tmp_path_factory, tokenizer):
    """A tiny model whose linear layers are at least 64 wide: bitsandbytes' CPU kernel for 4-bit inference (eval
    mode, no grad, on CPUs with AVX512-BF16) repacks weights in blocks of 64 input features and fails below that."""
    folder = tmp_path_factory.mktemp("tiny-model-64")
    build_tiny_model(tokenizer, hidden_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_colab_notebook_runs_against_a_tiny_local_model(tmp_path, tiny_model_dir_64, jsonl_file, tokenizer):
    out = tmp_path / "adapter"
    notebook = run_notebook(
        EXAMPLES / "colab_qlora.ipynb",
        dict(
            INSTALL=False,
            MODEL=str(tiny_model_dir_64),
            DATASET=str(jsonl_file),
            NUM_EXAMPLES=16,
            LOAD_IN_4BIT=True,
            COMPUTE_DTYPE="float32",
            FP16=False,
            DEVICE_MAP="cpu",
            LORA_R=4,
            MAX_LENGTH=64,
            MAX_STEPS=2,
            BATCH_SIZE=4,
            GRADIENT_ACCUMULATION=1,
            LOGGING_STEPS=1,
            OUTPUT_DIR=str(out),
            REPORT_EXAMPLES=3,
        ),
        tmp_path,
    )
    text = "\n".join(
        output.get("text", "") + json.dumps(output.get("data", {}))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "4-bit: True" in text  # QLoRA, on the CPU backend of bitsandbytes
    assert "step    1" in text and "step    2" in text  # the selection metrics were logged each step
    assert 'data-kept=\\"1\\"' in text  # the selection was displayed inline
    assert (out / "adapter_model.safetensors").exists() and not (out / HISTORY_ADAPTER).exists()
    assert (out / "selection_report.html").exists()
    assert "## ssToken token selection" in (out / "README.md").read_text()
    assert load_tokenizer(str(out))("sure !").input_ids == tokenizer("sure !").input_ids


def test_notebook_install_cell_is_skippable_and_parameters_are_tagged():
    notebook = nbformat.read(EXAMPLES / "colab_qlora.ipynb", as_version=4)
    nbformat.validate(notebook)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "INSTALL = True" in tagged[0].source
    install = [cell for cell in notebook.cells if cell.cell_type == "code" and '"pip", "install"' in cell.source]
    assert len(install) == 1 and "if INSTALL:" in install[0].source
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean


@pytest.mark.parametrize("config", sorted((EXAMPLES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 2 and loaded.mixed_precision == "bf16"
    assert str(loaded.distributed_type).split(".")[-1] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert yaml.safe_load(config.read_text())["use_cpu"] is False
