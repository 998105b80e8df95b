"""The ssToken fields of `SSTokenConfig`, read off the dataclass itself.

The configuration reference in the docs and the settings section of a model card are generated from here, from
each field's default, type and `help` metadata and from `config.FIELD_GROUPS` (the groups the class docstring and
the field declarations follow), so nothing about a field is written twice.
"""

import dataclasses
import re
from importlib.metadata import PackageNotFoundError, version

from trl import SFTConfig

from . import config
from .config import SSTokenConfig


OTHER_GROUP = "Other ssToken parameters"


def sstoken_fields() -> list[dataclasses.Field]:
    """The fields `SSTokenConfig` adds to `SFTConfig`, in declaration order."""
    inherited = {field.name for field in dataclasses.fields(SFTConfig)}
    return [field for field in dataclasses.fields(SSTokenConfig) if field.name not in inherited]


def field_groups() -> dict[str, list[dataclasses.Field]]:
    """The ssToken fields under the group headings of `config.FIELD_GROUPS` ("Parameters that ..."), in order.

    A field no group lists lands in OTHER_GROUP, so a new field is never left out of the reference.
    """
    by_name = {field.name: field for field in sstoken_fields()}
    groups = {
        heading: [by_name.pop(name) for name in names if name in by_name]
        for heading, names in config.FIELD_GROUPS.items()
    }
    if by_name:
        groups.setdefault(OTHER_GROUP, []).extend(by_name.values())
    return {name: fields for name, fields in groups.items() if fields}


def type_name(field: dataclasses.Field) -> str:
    kind = field.type
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind)).replace("typing.", "")


def default_value(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_reference_markdown() -> str:
    """Markdown tables of every ssToken field: flag / YAML key, type, default, allowed values, description."""
    parts = []
    for group, fields in field_groups().items():
        parts.append(f"### {group}\n")
        parts.append("| Field (YAML key / `--flag`) | Type | Default | Description |")
        parts.append("|---|---|---|---|")
        for field in fields:
            help_text = field.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
            choices = field.metadata.get("choices")
            if choices:
                help_text += " Allowed: " + ", ".join(f"`{choice}`" for choice in choices) + "."
            parts.append(f"| `{field.name}` | `{type_name(field)}` | `{default_value(field)!r}` | {help_text} |")
        parts.append("")
    return "\n".join(parts)


def _card_value(value) -> str:
    return "not set" if value is None else f"`{value!r}`"


def model_card_section(args: SSTokenConfig) -> str:
    """The model card section that records the method and every ssToken setting of a run."""
    try:
        package = f"trl-sstoken {version('trl-sstoken')}"
    except PackageNotFoundError:
        package = "trl-sstoken"
    rows = "\n".join(f"| `{field.name}` | {_card_value(getattr(args, field.name))} |" for field in sstoken_fields())
    return (
        "## ssToken token selection\n\n"
        f"This model was fine-tuned with ssToken token selection ({package}): each training step trained on the "
        "top `selection_ratio` of every response's tokens, ranked by `selection_gamma * minmax(REL) + "
        "(1 - selection_gamma) * attention to the prompt`, where REL is the retrospective excess loss against the "
        "`history` model ([Qin et al., 2025](https://arxiv.org/abs/2510.18250)). Evaluation losses are plain NLL over "
        "every response token.\n\n"
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
