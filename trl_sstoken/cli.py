"""`trl-sstoken`: the console script. Three commands, all built on TRL's `TrlParser`:

    trl-sstoken train   --config run.yaml [--any_flag value ...]    # like `trl sft`, with ssToken selection
    trl-sstoken demo    [--output_dir sstoken-demo]                  # offline: tiny model, bundled data, a report
    trl-sstoken inspect --model_name_or_path M [--adapter_path A] --dataset_name D [--report_path r.html]

Each command takes a YAML file through `--config` (its keys are the flag names) and every flag on the command line
overrides it. `train` accepts every flag of `trl sft` (TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig`,
`DatasetMixtureConfig`) plus the ssToken fields of `SSTokenConfig`. Several GPUs: start it with accelerate,
`accelerate launch --config_file multi_gpu.yaml -m trl_sstoken.cli train --config run.yaml`.
"""

import difflib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from types import SimpleNamespace


PROG = "trl-sstoken"
COMMANDS = {
    "train": "Fine-tune a model with ssToken token selection (every `trl sft` flag, plus the ssToken fields).",
    "demo": "Offline demo: fine-tune a tiny local model on the bundled dataset and write a selection report.",
    "inspect": "Score and select the tokens of a dataset with a model/adapter, without training; write an HTML page.",
}
BUNDLED_DATASET = "data/quickstart.jsonl"


@dataclass
class LoadingArguments:
    """Options of `train` and `inspect` beyond `trl sft`'s."""

    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer to use: a hub id or a local folder. Defaults to --model_name_or_path. A generic fast "
            "tokenizer saved from the `tokenizers` library is loaded as such, whatever the model config says."
        },
    )


@dataclass
class InspectArguments:
    """Options of `inspect`."""

    adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained PEFT adapter to inspect: a folder with adapter_config.json, e.g. the output_dir of "
            "`trl-sstoken train` or a checkpoint-N folder. REL needs it: without an adapter only "
            "--selection_method attention, random or full can be inspected."
        },
    )
    num_examples: int = field(
        default=32, metadata={"help": "How many examples (from the start of the split) to score and show. At least 1."}
    )
    report_path: str = field(default="sstoken_report.html", metadata={"help": "Where to write the HTML page."})


@dataclass
class DemoArguments:
    """Options of `demo`."""

    num_report_examples: int = field(
        default=24, metadata={"help": "How many examples the selection report shows. At least 1."}
    )
    hidden_size: int = field(
        default=64, metadata={"help": "Hidden size of the tiny model the demo builds (2 layers, 4 heads). At least 8."}
    )
    num_eval_examples: int | None = field(
        default=None,
        metadata={
            "help": "On how many bundled examples the plain NLL before and after training is measured (all "
            "by default). At least 1."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tune this causal LM (a hub id or a local folder) instead of the tiny model built on the "
            "spot. The bundled data is rendered in its chat template (as prompt-completion text if it has none)."
        },
    )


# Settings of `demo` that differ from SSTokenConfig's defaults: a one-minute CPU run that shows selection at work
DEMO_DEFAULTS = dict(
    output_dir="sstoken-demo",
    max_steps=60,
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    logging_steps=20,
    report_to="none",
    bf16=False,
    save_strategy="no",
    max_length=128,
    history="lagged",
    history_update_steps=10,
    seed=0,
)
INSPECT_DEFAULTS = dict(report_to="none", per_device_train_batch_size=8)


def make_parser(command: str):
    """The `TrlParser` of one command (its dataclasses, in the order `parse_args_and_config` returns them)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .config import SSTokenConfig

    prog = f"{PROG} {command}"
    if command == "train":
        return TrlParser(
            (ScriptArguments, SSTokenConfig, ModelConfig, DatasetMixtureConfig, LoadingArguments), prog=prog
        )
    if command == "inspect":
        parser = TrlParser(
            (ScriptArguments, SSTokenConfig, ModelConfig, DatasetMixtureConfig, LoadingArguments, InspectArguments),
            prog=prog,
        )
        parser.set_defaults(**INSPECT_DEFAULTS)
        return parser
    if command == "demo":
        parser = TrlParser((DemoArguments, SSTokenConfig), prog=prog)
        parser.set_defaults(**DEMO_DEFAULTS)
        return parser
    raise ValueError(f"Unknown command {command!r}; allowed: {', '.join(COMMANDS)}.")


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (2 for a usage error, with a message naming the flag; 1 for a
    diverged training run, with the step and what to change)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        suggestion = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean {suggestion[0]!r}?" if suggestion else ""
        print(f"{PROG}: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}.{hint}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser(command)
    try:
        explicit = explicit_settings(rest)
        chosen = choose_device_defaults(parser, command, explicit)
        parsed = parse_command_args(parser, rest)
        if chosen:
            print(_device_note(command, parsed[1], chosen))
        runner = {"train": run_train, "demo": run_demo, "inspect": run_inspect}[command]
        runner(*parsed)
    except ValueError as error:  # bad flag values: from our checks, the config dataclasses and the trainer's checks
        if os.environ.get("TRL_SSTOKEN_TRACEBACK"):
            raise
        print(f"{PROG} {command}: error: {_with_flag_hint(str(error), parser)}", file=sys.stderr)
        print("(set TRL_SSTOKEN_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a diverged run (divergence.py): its message, no traceback, exit status 1
        from .divergence import TrainingDivergedError

        if not isinstance(error, TrainingDivergedError) or os.environ.get("TRL_SSTOKEN_TRACEBACK"):
            raise
        print(f"{PROG} {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def entry_point():
    """The `trl-sstoken` console script. Only here, not for library users: silences the warnings that other libraries
    print on every run and that are not about the user's run (see `quiet_third_party_warnings`)."""
    quiet_third_party_warnings()
    sys.exit(main())


def quiet_third_party_warnings():
    """Filters, for this process, two kinds of noise that trl_sstoken does not cause and a user cannot act on:

    - bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported on a
      CPU with AVX512-BF16 and the optional `kernels` package is absent, 4-bit or not (a logging record of the
      `bitsandbytes.backends.cpu.ops` logger, at import; filtered on that logger before anything imports it);
    - transformers' FutureWarnings that `gradient_checkpointing` and `is_gradient_checkpointing` are deprecated
      aliases, raised by TRL's SFTConfig default and by PEFT, whatever the user passes.
    """
    import logging
    import warnings

    class _DropKernelsNotice(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())
    warnings.filterwarnings(
        "ignore", message=r"`(is_)?gradient_checkpointing(_kwargs)?` is deprecated", category=FutureWarning
    )


# ----- train -----


def run_train(script_args, training_args, model_args, dataset_args, loading_args):
    """`trl sft` with `SSTokenTrainer`: load, train, save the adapter (or model) and a model card."""
    from trl import get_quantization_config

    from .checkpoints import checkpoint_settings, resolve_resume
    from .loading import load_sft_datasets, load_tokenizer, pick_split
    from .trainer import SSTokenTrainer

    _require_model(model_args)
    # --resume_from_checkpoint arrives as a string: "true"/"false" or a path, checked before anything is loaded
    resume = resolve_resume(
        training_args.resume_from_checkpoint, training_args.output_dir, checkpoint_settings(training_args)
    )
    training_args.model_init_kwargs = {
        **_model_init_kwargs(model_args, training_args),
        **(training_args.model_init_kwargs or {}),
    }
    datasets = load_sft_datasets(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        script_args.dataset_streaming,
        mixture=dataset_args,
    )
    train_dataset = pick_split(datasets, script_args.dataset_train_split, "--dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = pick_split(datasets, script_args.dataset_test_split, "--dataset_test_split")
    tokenizer = load_tokenizer(
        loading_args.tokenizer_name_or_path or model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    trainer = SSTokenTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config_from(model_args),
    )
    print(f"{PROG} train: {describe_history(trainer)}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    dataset_name = (
        script_args.dataset_name if script_args.dataset_name and not os.path.exists(script_args.dataset_name) else None
    )
    # the card names a local dataset too (without a hub link)
    trainer.create_model_card(
        model_name=os.path.basename(os.path.normpath(training_args.output_dir)), dataset_name=script_args.dataset_name
    )
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    trainer.end()
    return trainer


def describe_history(trainer) -> str:
    """One line: which history model REL compares with, and what it costs (a model copy without --use_peft)."""
    from .history.adapter import AdapterDisabledHistory, AdapterHistory
    from .history.cache import CachedHistory
    from .history.model_copy import ModelCopyHistory

    args, history = trainer.args, trainer._history
    if history is None:
        return f"no history model (--selection_method {args.selection_method} does not use REL)."
    if isinstance(history, CachedHistory):
        return f"history: the base model's log-probs, cached in {args.history_cache_dir} (no history forward while training)."
    if isinstance(history, AdapterDisabledHistory):
        return "history: the base weights with the LoRA adapter disabled (no copy)."
    schedule = {
        "base": "frozen at the start",
        "lagged": f"updated every {args.history_update_steps} optimizer steps",
        "ema": f"an EMA with alpha {args.history_ema_alpha}",
    }[args.history]
    if isinstance(history, AdapterHistory):
        return f"history: the base weights plus a {args.history} copy of the LoRA adapter, {schedule}."
    if isinstance(history, ModelCopyHistory):
        size = f"{history.parameter_bytes / 2**30:.2f} GiB"
        return (
            f"history: a {args.history} copy of the whole model ({size}), {schedule}: full fine-tuning, because "
            "--use_peft is not set (with --use_peft the history costs no copy)."
        )
    return f"history: {type(history).__name__}."


# ----- inspect -----


def run_inspect(script_args, sstoken_args, model_args, dataset_args, loading_args, inspect_args):
    """Scores and selects the first `num_examples` examples with the given model/adapter; writes the HTML page."""
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    from .loading import load_sft_datasets, load_tokenizer, pick_split
    from .report import collect_examples, report_settings, special_tokens_of, write_report
    from .trainer import SSTokenTrainer

    _require_model(model_args)
    _check_at_least("--num_examples", inspect_args.num_examples, 1)
    _check_rel_has_adapter(sstoken_args.selection_method, inspect_args.adapter_path is not None, "--adapter_path")
    if inspect_args.adapter_path is not None and not os.path.isfile(
        os.path.join(inspect_args.adapter_path, "adapter_config.json")
    ):
        raise ValueError(
            f"--adapter_path {inspect_args.adapter_path!r} holds no adapter_config.json; pass the folder a PEFT "
            "adapter was saved to (the output_dir of `trl-sstoken train`, or one of its checkpoint-N folders)."
        )
    history_weights = _history_weights(sstoken_args, inspect_args.adapter_path)

    datasets = load_sft_datasets(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        script_args.dataset_streaming,
        mixture=dataset_args,
    )
    dataset = pick_split(datasets, script_args.dataset_train_split, "--dataset_train_split")
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        dataset = dataset.select(range(min(inspect_args.num_examples, len(dataset))))
    else:
        dataset = dataset.take(inspect_args.num_examples)
    tokenizer = load_tokenizer(
        loading_args.tokenizer_name_or_path or model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=sstoken_args.trust_remote_code,
    )
    init_kwargs = {**_model_init_kwargs(model_args, sstoken_args), **(sstoken_args.model_init_kwargs or {})}
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    model = create_model_from_path(model_args.model_name_or_path, **init_kwargs)
    if inspect_args.adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, inspect_args.adapter_path, is_trainable=True)

    with tempfile.TemporaryDirectory() as scratch:
        sstoken_args.output_dir = scratch  # inspect writes nothing but its report
        sstoken_args.model_init_kwargs = None
        trainer = SSTokenTrainer(model=model, args=sstoken_args, train_dataset=dataset, processing_class=tokenizer)
        if history_weights is not None:
            _load_history_adapter(trainer.model, history_weights)
        examples = collect_examples(trainer, inspect_args.num_examples, sstoken_args.per_device_train_batch_size)
        settings = report_settings(
            trainer,
            model=model_args.model_name_or_path,
            adapter=inspect_args.adapter_path or "(none)",
            dataset=script_args.dataset_name or "(datasets mixture)",
        )
        summary = write_report(inspect_args.report_path, examples, settings, special_tokens_of(tokenizer))
    print(_summary_text(summary))
    print(f"Report written to {inspect_args.report_path}")
    return summary


def _history_weights(sstoken_args, adapter_path):
    """The saved history adapter a lagged/ema inspection needs: `<adapter_path>/history/` of a checkpoint."""
    from .history import HISTORY_ADAPTER
    from .methods import REL_METHODS

    if sstoken_args.selection_method not in REL_METHODS or sstoken_args.history == "base":
        return None
    folder = os.path.join(adapter_path, HISTORY_ADAPTER)
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(
            f"--history {sstoken_args.history} needs the history adapter saved with a checkpoint ({folder}/ with "
            "adapter_model.safetensors), and --adapter_path has none. Pass a checkpoint-N folder of a run that used "
            "this history, or use --history base (the adapter against its base weights)."
        )
    return weights


def _load_history_adapter(peft_model, weights_path):
    """Overwrites the trainer's freshly built history adapter with the weights a checkpoint saved."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .history import HISTORY_ADAPTER

    result = set_peft_model_state_dict(peft_model, load_file(weights_path), adapter_name=HISTORY_ADAPTER)
    missing = [key for key in result.missing_keys if f".{HISTORY_ADAPTER}." in key]
    if missing:
        raise ValueError(f"The saved history adapter {weights_path} does not match the model: missing {missing[:3]}.")
    for name, param in peft_model.named_parameters():
        if f".{HISTORY_ADAPTER}." in name:
            param.requires_grad_(False)


# ----- demo -----


def run_demo(demo_args, sstoken_args):
    """Fine-tunes with ssToken on the bundled data, writes a report and a figure: a tiny model and tokenizer built on
    the spot by default, or the causal LM of `--model_name_or_path` with the data in its chat template."""
    import json

    from datasets import Dataset
    from peft import LoraConfig

    from .report import collect_examples, report_settings, special_tokens_of, write_figure, write_report
    from .trainer import SSTokenTrainer

    _check_at_least("--num_report_examples", demo_args.num_report_examples, 1)
    _check_at_least("--hidden_size", demo_args.hidden_size, 8)
    if demo_args.num_eval_examples is not None:
        _check_at_least("--num_eval_examples", demo_args.num_eval_examples, 1)
    if demo_args.hidden_size % 8:
        raise ValueError(f"--hidden_size must be a multiple of 8 (4 heads of even size), got {demo_args.hidden_size}.")
    data_file = resources.files("trl_sstoken").joinpath(BUNDLED_DATASET)
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    output_dir = sstoken_args.output_dir
    method = (
        f"with ssToken ({sstoken_args.selection_method}, keeping {sstoken_args.selection_ratio:.0%} of each response, "
        f"history={sstoken_args.history})"
    )
    if demo_args.model_name_or_path is None:
        model, tokenizer, base_dir = _tiny_demo_model(rows, demo_args, sstoken_args, output_dir)
        model_label = "tiny model built by `trl-sstoken demo`"
        print(
            f"{PROG} demo: a tiny {model.config.model_type} model ({model.num_parameters():,} parameters, built "
            f"locally) learns {len(rows)} bundled examples {method}."
        )
    else:
        model, tokenizer, rows, data_format = _real_demo_model(demo_args.model_name_or_path, rows, sstoken_args)
        base_dir = model_label = demo_args.model_name_or_path
        print(f"{PROG} demo: {model_label} learns {len(rows)} bundled examples ({data_format}) {method}.")
    trainer = SSTokenTrainer(
        model=model,
        args=sstoken_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    eval_rows = trainer.train_dataset
    if demo_args.num_eval_examples is not None:
        eval_rows = eval_rows.select(range(min(demo_args.num_eval_examples, len(eval_rows))))
    before = trainer.evaluate(eval_rows)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_rows)["eval_loss"]
    trainer.save_model(output_dir)
    trainer.create_model_card(
        model_name=os.path.basename(os.path.normpath(output_dir)), dataset_name=f"trl_sstoken/{BUNDLED_DATASET}"
    )

    examples = collect_examples(trainer, demo_args.num_report_examples, sstoken_args.per_device_train_batch_size)
    report_path = os.path.join(output_dir, "selection_report.html")
    settings = report_settings(trainer, model=model_label, dataset=f"trl_sstoken/{BUNDLED_DATASET}")
    summary = write_report(
        report_path, examples, settings, special_tokens_of(tokenizer), title="ssToken demo: selection report"
    )
    write_figure(
        os.path.join(output_dir, "selection.svg"), examples[:3], title="What ssToken keeps (trl-sstoken demo)"
    )

    fractions = [
        entry["sstoken/selected_fraction"]
        for entry in trainer.state.log_history
        if "sstoken/selected_fraction" in entry
    ]
    over = "" if len(eval_rows) == len(rows) else f" of the first {len(eval_rows)} examples"
    print(f"\nPlain NLL over every response token{over}: {before:.3f} before training, {after:.3f} after.")
    if fractions:
        print(f"Fraction of response tokens trained on: {sum(fractions) / len(fractions):.3f}")
    print(_summary_text(summary))
    print("\nWhat ssToken keeps now ([kept] tokens are trained on; the prompt is never trained on):")
    for example in examples[:3]:
        shown = [f"[{token.text}]" if token.role == "kept" else token.text for token in example.response]
        print("  " + " ".join(shown))
    print(f"\nSelection report: {report_path}")
    print(f"Adapter, tokenizer and model card: {output_dir}/   base model: {base_dir}")
    if demo_args.model_name_or_path is None:
        print(
            f"Inspect it again: {PROG} inspect --model_name_or_path {base_dir} --adapter_path {output_dir} "
            f"--dataset_name {data_file}"
        )
    return trainer, summary


def _tiny_demo_model(rows, demo_args, sstoken_args, output_dir):
    """The demo's default: a tiny model and tokenizer built for the bundled data, saved so `inspect` can load them."""
    from .tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in rows])
    model = build_tiny_model(tokenizer, hidden_size=demo_args.hidden_size, seed=sstoken_args.seed)
    base_dir = os.path.join(output_dir, "base_model")
    model.config._name_or_path = base_dir  # what the model card names as the base model
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return model, tokenizer, base_dir + "/"


def _real_demo_model(name_or_path, rows, sstoken_args):
    """A causal LM and its tokenizer, with the bundled rows as conversations when the tokenizer has a chat template
    (TRL applies it, and trains on the assistant turn), as prompt-completion text when it has none."""
    from .loading import load_tokenizer

    _require_model(SimpleNamespace(model_name_or_path=name_or_path))
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=sstoken_args.trust_remote_code)
    if getattr(tokenizer, "chat_template", None):
        rows = [
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["completion"].strip()}],
            }
            for row in rows
        ]
        data_format = "as conversations in its chat template"
    else:
        data_format = "as prompt-completion text: its tokenizer has no chat template"
    sstoken_args.model_init_kwargs = {"dtype": "float32", **(sstoken_args.model_init_kwargs or {})}
    return name_or_path, tokenizer, rows, data_format


# ----- device and precision on a machine without a GPU -----

# What a CPU-only machine needs instead of TRL's defaults (bf16=True, which TrainingArguments refuses without a GPU
# unless use_cpu is set; pinned memory, which only a GPU uses). Each is chosen only if the user set none of its flags.
CPU_SETTINGS = {"use_cpu": ("use_cpu",), "bf16": ("bf16", "fp16"), "dataloader_pin_memory": ("dataloader_pin_memory",)}


def has_accelerator() -> bool:
    """A GPU (or another torch accelerator: XPU, MPS, ...) that Trainer would use."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX): bf16 autocast is then faster than float32, not an
    emulation that is slower."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def explicit_settings(args: list[str]) -> set[str]:
    """The names of the settings the user gave, in the --config YAML or as flags (`--use-cpu`, `--no_bf16` and
    `--bf16=false` spellings included), so that only the others get a chosen default."""
    names = set()
    if "--config" in args:
        index = args.index("--config")
        if index + 1 < len(args):
            names.update(_read_yaml_config(args[index + 1]))
    for item in args:
        if item.startswith("--") and item != "--config":
            name = item[2:].split("=", 1)[0].replace("-", "_")
            names.update({name, name[3:]} if name.startswith("no_") else {name})
    return names


def choose_device_defaults(parser, command: str, explicit: set[str]) -> dict:
    """On a machine without a GPU: use_cpu=True, bf16 only where the CPU has native bf16 (float32 otherwise), no
    pinned memory; each unless the user set it. Sets them as parser defaults (the YAML and the flags still override)
    and returns what was chosen ({} on a GPU machine, where TRL's defaults stand). The demo's tiny model keeps
    float32 (its own default) unless --model_name_or_path names a real model."""
    if has_accelerator():
        return {}
    values = {"use_cpu": True, "bf16": cpu_supports_bf16(), "dataloader_pin_memory": False}
    chosen = {name: values[name] for name, flags in CPU_SETTINGS.items() if not explicit.intersection(flags)}
    if command == "demo" and "model_name_or_path" not in explicit:
        chosen.pop("bf16", None)  # DEMO_DEFAULTS: the tiny model trains in float32 everywhere
    parser.set_defaults(**chosen)
    return chosen


def _device_note(command: str, args, chosen: dict) -> str:
    """The one line that says where and in which precision the command runs, when it chose either."""
    if args.bf16:
        precision = "bf16 mixed precision (this CPU has native bf16)" if "bf16" in chosen else "bf16 mixed precision"
    else:
        precision = "float32" + (" (this CPU has no native bf16)" if "bf16" in chosen else "")
    where = "on the CPU" if args.use_cpu else "on the default device"
    return f"{PROG} {command}: no GPU found: running {where} in {precision}; --use_cpu and --bf16 choose otherwise."


# ----- shared helpers -----


def peft_config_from(model_args):
    """TRL's `get_peft_config`, except that `--lora_target_modules all-linear` means PEFT's "all-linear" shorthand.

    On the command line the flag is a list (`["all-linear"]`), which PEFT would read as a module *named* all-linear
    and fail to find; only the plain string selects every linear layer.
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, list, tuple)) and {str(target).lower() for target in targets} == {"all-linear"}:
        config.target_modules = "all-linear"
    return config


def parse_command_args(parser, args: list[str]):
    """`parse_args_and_config`, after checking that every flag and YAML key exists (with the closest flag if not)."""
    args = list(args)
    config_keys = []
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise ValueError("--config needs the path of a YAML file.")
        config_keys = list(_read_yaml_config(args[index + 1]))
        rest = args[:index] + args[index + 2 :]
    else:
        rest = args
    destinations = {action.dest for action in parser._actions}
    unknown = [(f"--{key}", "in the --config YAML") for key in config_keys if key != "env" and key not in destinations]
    _, unknown_cli = parser.parse_known_args(rest)
    unknown += [(item.split("=", 1)[0], "on the command line") for item in unknown_cli]
    if unknown:
        names = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
        messages = []
        for flag, where in unknown:
            close = difflib.get_close_matches(flag, names, n=1) if flag.startswith("--") else []
            messages.append(f"{flag} ({where})" + (f", did you mean {close[0]}?" if close else "."))
        raise ValueError(
            f"unknown flag(s) or stray value(s): {'; '.join(messages)} See `{parser.prog} --help` for every flag."
        )
    return parser.parse_args_and_config(args)


def _read_yaml_config(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file. Pass the path of a YAML file whose keys are flag names.")
    with open(path) as file:
        try:
            config = yaml.safe_load(file)
        except yaml.YAMLError as error:  # one line with file, line and column, not a parser traceback
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            context = getattr(error, "context", None)
            raise ValueError(
                f"--config {where}: not valid YAML: {problem}" + (f" ({context})" if context else "")
            ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"--config {path!r} must hold a YAML mapping of flag names to values, got {type(config).__name__}."
        )
    return config


def _model_init_kwargs(model_args, training_args) -> dict:
    return dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )


def _require_model(model_args):
    path = model_args.model_name_or_path
    if not path:
        raise ValueError(
            "--model_name_or_path is required: a hub id (e.g. Qwen/Qwen2.5-0.5B) or a local model folder."
        )
    from .loading import looks_like_a_path

    if not os.path.exists(path) and looks_like_a_path(path):
        raise ValueError(
            f"--model_name_or_path {path!r} looks like a local path, but no such folder exists. Pass a folder written "
            "by save_pretrained, or a hub id such as Qwen/Qwen2.5-0.5B."
        )
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    ):
        raise ValueError(
            f"--model_name_or_path {path!r} holds a PEFT adapter, not a model. Pass the base model as "
            "--model_name_or_path and the adapter folder as --adapter_path (inspect)."
        )


def _check_rel_has_adapter(method: str, has_adapter: bool, flag: str):
    """`inspect` of REL without an adapter would compare the model with itself: every REL would be 0."""
    from .methods import REL_METHODS

    if method in REL_METHODS and not has_adapter:
        raise ValueError(
            f"--selection_method {method} needs a LoRA adapter, because REL compares the model with an earlier state "
            f"of its adapter: add {flag}, or choose --selection_method attention, random or full."
        )


def _check_at_least(flag: str, value: int, minimum: int):
    if value < minimum:
        raise ValueError(f"{flag}={value} is out of range; it must be an integer >= {minimum}.")


def _with_flag_hint(message: str, parser) -> str:
    """Names the flags that set the fields a dataclass check complained about ("selection_ratio=2 is ..." ->
    --selection_ratio), in the order the message mentions them."""
    if re.search(r"(^|\s)--\w", message):
        return message
    fields = {action.dest for action in parser._actions if action.option_strings}
    mentioned = sorted(
        (match.start(), name)
        for name in fields
        for match in [re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)]
        if match
    )
    if not mentioned:
        return message
    flags = ", ".join(f"--{name}" for _, name in mentioned[:4])
    return f"{message} (flags: {flags}; the same names are keys of the --config YAML)"


def _summary_text(summary) -> str:
    lines = [
        f"{summary.examples} examples, {summary.response_tokens} response tokens, {summary.kept_tokens} kept "
        f"({summary.kept_fraction:.1%})."
    ]
    by_position = ", ".join(f"{kept / total:.0%}" if total else "-" for kept, total in summary.by_position)
    lines.append(f"Kept by tenth of the response (first to last): {by_position}")
    by_type = ", ".join(f"{name} {kept / total:.0%} of {total}" for name, (kept, total) in summary.by_type.items())
    lines.append(f"Kept by token type: {by_type}")
    return "\n".join(lines)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return (
        f"usage: {PROG} <command> [--config file.yaml] [--flag value ...]\n\ncommands:\n{commands}\n\n"
        f"`{PROG} <command> --help` lists every flag of a command. Docs: docs/cli.md"
    )


if __name__ == "__main__":
    entry_point()
