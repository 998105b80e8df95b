"""The model card of a run: its ssToken section, and the base model and the dataset, as hub links only when they are
hub ids.

`add_to_model_card` inserts the section that records the method and every ssToken setting (read off
`SSTokenConfig`'s fields, `config.sstoken_fields`); what the method trained on is the method's own sentence
(`SelectionMethod.describe`), so the card is right for every registered method.

TRL's card template links `https://huggingface.co/{base_model}` and `.../datasets/{dataset_name}` whatever they
are, and writes `None` where a name is missing: "Model Card for None" without `model_name`, "a fine-tuned version of
[None](https://huggingface.co/None)" for a model loaded from a local folder, `model="None"` in the quick start
without a hub id. `card_names` works out the names; `name_base_model_and_dataset` rewrites the title, the sentence
and the quick start of the rendered card, and drops `base_model` from its metadata when it is no hub id.

Names and settings come from the user, and TRL renders them raw. So only a strict hub id (`owner/name` of letters,
digits, `-`, `_`, `.`) is linked; anything else is shown as escaped text (`markdown_escape.py`): no `<script>`, no
`javascript:` link, and a backtick or `|` in a setting keeps its code span and its table cell.
"""

import html
import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from ..config import SSTokenConfig, sstoken_fields
from ..loading import looks_like_a_path
from ..markdown_escape import markdown_code, markdown_text, visible_text
from ..selection.methods import METHODS


@dataclass(frozen=True)
class CardNames:
    model_name: str  # the card's title: the given name, else the output folder's name
    base_model: str  # a hub id, a local path, or "" for a model built in memory
    base_is_hub: bool
    dataset: str | None  # a hub id, a local path, or None when not known
    dataset_is_hub: bool
    usage_id: str  # what the quick start loads: the hub id pushed to, else the output folder

    @property
    def hub_dataset(self) -> str | None:
        """The dataset name to give TRL, which links whatever it gets to the hub."""
        return self.dataset if self.dataset_is_hub else None

    @property
    def trl_model_name(self) -> str:
        """The title to give TRL, which renders it raw (in the title and the metadata): on one line, HTML-escaped. The
        title line is then rewritten with markdown escaping too."""
        return html.escape(visible_text(self.model_name), quote=False)


# a hub repository id as the hub allows it, ASCII only: [owner/]name, each part up to 96 letters, digits, "-", "_",
# "." that starts and ends with a letter, digit or "_" (no "--" or "..", no ".git" at the end: checked apart)
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")


def is_hub_id(name: str | None) -> bool:
    """Whether `name` is a hub repository id (and no local path): only those are linked to the hub."""
    return (
        bool(name)
        and _HUB_ID.match(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
        and not os.path.exists(name)
        and not looks_like_a_path(name)
    )


def card_names(trainer, model_name: str | None = None, dataset_name: str | None = None) -> CardNames:
    output_dir = trainer.args.output_dir
    base_model = str(getattr(trainer.model.config, "_name_or_path", "") or "")
    return CardNames(
        model_name=model_name or os.path.basename(os.path.normpath(output_dir)),
        base_model=base_model,
        base_is_hub=is_hub_id(base_model),
        dataset=dataset_name,
        dataset_is_hub=is_hub_id(dataset_name),
        usage_id=trainer.hub_model_id or output_dir,
    )


def name_base_model_and_dataset(card: str, names: CardNames) -> str:
    """The card with its title, its "fine-tuned version of" sentence and its quick-start model id stated from
    `names`, escaped, and no `base_model` in its metadata unless that is a hub id."""
    if names.base_is_hub:
        base = f"[{markdown_text(names.base_model)}](https://huggingface.co/{names.base_model})"
    elif names.base_model:
        where = "a local folder" if os.path.exists(names.base_model) else "not a hub id"
        base = f"{markdown_code(names.base_model)} ({where})"
    else:
        base = "a model built in memory (it has no hub id or path)"
    if names.dataset is None:
        dataset = ""
    elif names.dataset_is_hub:
        dataset = f" on the [{markdown_text(names.dataset)}](https://huggingface.co/datasets/{names.dataset}) dataset"
    elif os.path.exists(names.dataset):
        dataset = f" on the local dataset {markdown_code(names.dataset)}"
    else:
        dataset = f" on the dataset {markdown_code(names.dataset)} (not a hub id)"
    sentence = f"This model is a fine-tuned version of {base}{dataset}."
    # TRL's sentence holds the raw name, which may run over several lines: up to the template's next sentence
    card, replaced = re.subn(
        r"^This model is a fine-tuned version of .*?\n(?=It has been trained using )",
        lambda _: sentence + "\n",
        card,
        count=1,
        flags=re.M | re.S,
    )
    if not replaced:
        card = re.sub(r"^This model is a fine-tuned version of .*$", lambda _: sentence, card, count=1, flags=re.M)
    title = f"# Model Card for {markdown_text(names.model_name)}"
    card = re.sub(r"^# Model Card for .*$", lambda _: title, card, count=1, flags=re.M)
    usage = json.dumps(names.usage_id, ensure_ascii=not names.usage_id.isprintable())  # a Python string literal
    card = card.replace('model="None"', f"model={usage}")
    return card if names.base_is_hub else _without_base_model(card)


def _without_base_model(card: str) -> str:
    """The card without `base_model` in its metadata (TRL puts any name that is no local folder there)."""
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)
    if getattr(parsed.data, "base_model", None) is None:
        return card
    parsed.data.base_model = None
    return str(parsed)


def _card_value(value) -> str:
    return "not set" if value is None else markdown_code(repr(value))


def model_card_section(args: SSTokenConfig) -> str:
    """The model card section that records the method and every ssToken setting of a run."""
    try:
        package = f"trl-sstoken {version('trl-sstoken')}"
    except PackageNotFoundError:
        package = "trl-sstoken"
    rows = "\n".join(f"| `{field.name}` | {_card_value(getattr(args, field.name))} |" for field in sstoken_fields())
    method = METHODS[args.selection_method](args)
    return (
        "## ssToken token selection\n\n"
        f"This model was fine-tuned with {package}, `selection_method={args.selection_method!r}`: each training step "
        f"trained on {method.describe()}. Evaluation losses are plain NLL over every response token.\n\n"
        "| Setting | Value |\n|---|---|\n"
        f"{rows}\n"
    )


def add_to_model_card(card_text: str, args: SSTokenConfig) -> str:
    """`card_text` with the ssToken section inserted before its "Citations" section (appended if it has none),
    replacing an ssToken section written earlier."""
    section = model_card_section(args)
    card_text = re.sub(r"## ssToken token selection\n.*?(?=\n## |\Z)", "", card_text, flags=re.S).rstrip("\n") + "\n"
    marker = "\n## Citations"
    if marker in card_text:
        head, tail = card_text.split(marker, 1)
        return f"{head.rstrip()}\n\n{section}{marker}{tail}"
    return f"{card_text.rstrip()}\n\n{section}"


def add_sstoken_section_to_card(trainer, names: CardNames | None = None) -> None:
    """After TRL's `create_model_card`: add the ssToken section to the card it wrote into `args.output_dir`, and
    state the base model and the dataset from `names` (model_card.py) instead of TRL's hub links."""
    path = os.path.join(trainer.args.output_dir, "README.md")
    if trainer.is_world_process_zero() and os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            card = file.read()
        if names is not None:
            card = name_base_model_and_dataset(card, names)
        with open(path, "w", encoding="utf-8") as file:
            file.write(add_to_model_card(card, trainer.args))


def write_model_card(trainer, output_dir: str) -> None:
    """TRL writes its card into `args.output_dir`; the saved artefact gets that card, with the ssToken section."""
    if not trainer.is_world_process_zero():
        return
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
    card = os.path.join(trainer.args.output_dir, "README.md")
    target = os.path.join(output_dir, "README.md")
    if os.path.isfile(card) and os.path.abspath(card) != os.path.abspath(target):
        shutil.copyfile(card, target)
