"""The arguments of the `trl-sstoken` commands: their dataclasses and defaults, the `--config` YAML, and the checks
that every flag and YAML key exists (with the closest flag when not) and that names the flags a dataclass check
complained about. The YAML file is read within limits by `config_file`, its values checked by `config_values`."""

import difflib
import re
from dataclasses import dataclass, field

from ..bounded import bounded_text
from .config_file import read_config_file
from .config_values import check_config_values


PROG = "trl-sstoken"


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


def explicit_settings(args: list[str]) -> set[str]:
    """The names of the settings the user gave, in the --config YAML or as flags (`--use-cpu`, `--no_bf16` and
    `--bf16=false` spellings included), so that only the others get a chosen default."""
    names = set()
    if "--config" in args:
        index = args.index("--config")
        if index + 1 < len(args):
            names.update(read_config_file(args[index + 1]))
    for item in args:
        if item.startswith("--") and item != "--config":
            name = item[2:].split("=", 1)[0].replace("-", "_")
            names.update({name, name[3:]} if name.startswith("no_") else {name})
    return names


def parse_command_args(parser, args: list[str]):
    """`parse_args_and_config`, after checking that every flag and YAML key exists (with the closest flag if not)."""
    args = list(args)
    config = {}
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise ValueError("--config needs the path of a YAML file.")
        config = read_config_file(args[index + 1])
        rest = args[:index] + args[index + 2 :]
    else:
        rest = args
    config_keys = list(config)
    destinations = {action.dest for action in parser._actions}
    unknown = [(f"--{key}", "in the --config YAML") for key in config_keys if key != "env" and key not in destinations]
    _, unknown_cli = parser.parse_known_args(rest)
    unknown += [(item.split("=", 1)[0], "on the command line") for item in unknown_cli]
    unknown = [(bounded_text(flag, 100), where) for flag, where in unknown]  # difflib below is quadratic in length
    if unknown:
        names = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
        messages = []
        for flag, where in unknown:
            close = difflib.get_close_matches(flag, names, n=1) if flag.startswith("--") else []
            messages.append(f"{flag} ({where})" + (f", did you mean {close[0]}?" if close else "."))
        raise ValueError(
            f"unknown flag(s) or stray value(s): {'; '.join(messages)} See `{parser.prog} --help` for every flag."
        )
    if config:
        check_config_values(parser, config, args[index + 1])
    return parser.parse_args_and_config(args)


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
