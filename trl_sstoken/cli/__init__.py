"""`trl-sstoken`: the console script. Four commands, all built on TRL's `TrlParser`:

    trl-sstoken train   --config run.yaml [--any_flag value ...]    # like `trl sft`, with ssToken selection
    trl-sstoken demo    [--output_dir sstoken-demo]                  # offline: tiny model, bundled data, a report
    trl-sstoken inspect --model_name_or_path M [--adapter_path A] --dataset_name D [--report_path r.html]
    trl-sstoken compare --config run.yaml --methods full sstoken rho1 --eval_dataset_name E   # which is best here

Each command takes a YAML file through `--config` (its keys are the flag names) and every flag on the command line
overrides it. `train` accepts every flag of `trl sft` (TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig`,
`DatasetMixtureConfig`) plus the ssToken fields of `SSTokenConfig`. Several GPUs: start it with accelerate,
`accelerate launch --config_file multi_gpu.yaml -m trl_sstoken.cli train --config run.yaml`.

This module is the dispatch; each job has its module: `arguments` (the argument dataclasses, `--config` YAML and
flag checks), `devices` (device and precision on a machine without a GPU), `train`, `inspect`, `demo` and
`compare` (one command each). Heavy imports (torch, TRL) stay inside functions, so `trl-sstoken --help` answers at once.
"""

import difflib
import os
import sys

from ..bounded import bounded_repr, bounded_text
from .arguments import (
    DEMO_DEFAULTS,
    INSPECT_DEFAULTS,
    PROG,
    DemoArguments,
    InspectArguments,
    LoadingArguments,
    _with_flag_hint,
    explicit_settings,
    parse_command_args,
)
from .compare import main as run_compare
from .compare import make_parser as compare_parser
from .demo import run_demo
from .devices import _device_note, choose_device_defaults
from .inspect import run_inspect
from .train import main as run_train


COMMANDS = {
    "train": "Fine-tune a model with ssToken token selection (every `trl sft` flag, plus the ssToken fields).",
    "demo": "Offline demo: fine-tune a tiny local model on the bundled dataset and write a selection report.",
    "inspect": "Score and select the tokens of a dataset with a model/adapter, without training; write an HTML page.",
    "compare": "Train several selection methods on your data (same model, seed, data order), compare them on a "
    "trusted evaluation set: table, plot, JSON, selection reports.",
}


def make_parser(command: str):
    """The `TrlParser` of one command (its dataclasses, in the order `parse_args_and_config` returns them)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from ..config import SSTokenConfig

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
    if command == "compare":
        return compare_parser(prog)
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
        from .. import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        suggestion = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean {suggestion[0]!r}?" if suggestion else ""
        print(
            f"{PROG}: error: unknown command {bounded_repr(command)}; allowed: {', '.join(COMMANDS)}.{hint}",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser(command)
    try:
        explicit = explicit_settings(rest)
        chosen = choose_device_defaults(parser, command, explicit)
        parsed = parse_command_args(parser, rest)
        if chosen:
            print(_device_note(command, parsed[1], chosen))
        if command == "compare":
            run_compare(*parsed, argv=rest)
        else:
            {"train": run_train, "demo": run_demo, "inspect": run_inspect}[command](*parsed)
    except ValueError as error:  # bad flag values: from our checks, the config dataclasses and the trainer's checks
        if os.environ.get("TRL_SSTOKEN_TRACEBACK"):
            raise
        # bounded: a message may echo a value from the YAML, and the flag hint searches it once per flag
        print(f"{PROG} {command}: error: {_with_flag_hint(bounded_text(str(error)), parser)}", file=sys.stderr)
        print("(set TRL_SSTOKEN_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a diverged run (divergence.py): its message, no traceback, exit status 1
        from ..divergence import TrainingDivergedError

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


def _usage() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return (
        f"usage: {PROG} <command> [--config file.yaml] [--flag value ...]\n\ncommands:\n{commands}\n\n"
        f"`{PROG} <command> --help` lists every flag of a command. Docs: docs/cli.md"
    )
