"""The configuration reference of the docs, generated from the ssToken fields of `SSTokenConfig` (a development tool
of the docs build, `tools/docs_hooks.py`; not installed with the package).

The reference is read off the dataclass itself, from each field's default, type, `help` and `group` metadata
(`config.field_groups`: the groups the class docstring and the field declarations follow), so nothing about a field
is written twice; the model card's settings section reads the same
fields (`trl_sstoken.saving.model_card`).
"""

import dataclasses

from trl_sstoken import config
from trl_sstoken.config import field_groups
from trl_sstoken.saving.resume import TOTAL_BATCH


ON_RESUME = {
    config.RESUME_MUST_MATCH: "must match",
    config.RESUME_WHETHER_SET: "set or unset as before",
    config.RESUME_FREE: "may change",
}


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
    """Markdown tables of every ssToken field: flag / YAML key, type, default, allowed values, description, and
    what a resume requires of it."""
    parts = []
    for group, fields in field_groups().items():
        parts.append(f"### {group}\n")
        parts.append("| Field (YAML key / `--flag`) | Type | Default | Description | On resume |")
        parts.append("|---|---|---|---|---|")
        for field in fields:
            help_text = field.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
            choices = field.metadata.get("choices")
            if choices:
                help_text += " Allowed: " + ", ".join(f"`{choice}`" for choice in choices) + "."
            on_resume = ON_RESUME[config.resume_rule(field)]
            parts.append(
                f"| `{field.name}` | `{type_name(field)}` | `{default_value(field)!r}` | {help_text} | {on_resume} |"
            )
        parts.append("")
    return "\n".join(parts)


def resume_settings_markdown() -> str:
    """The table of what a resume must match besides the ssToken fields: `config.SFT_RESUME_MUST_MATCH` and the
    examples per optimizer step, with the reason for each."""
    rows = ["| Setting | Why a resume must match it |", "|---|---|"]
    rows += [f"| `{name}` | {reason} |" for name, reason in config.SFT_RESUME_MUST_MATCH.items()]
    rows.append(
        f"| `{TOTAL_BATCH}` = `per_device_train_batch_size` x `gradient_accumulation_steps` x processes | the "
        "examples per optimizer step: the position in the data is counted in steps (how the product is split may "
        "change) |"
    )
    fields = [field.name for field in config.sstoken_fields() if config.resume_rule(field) != config.RESUME_FREE]
    rows.append(
        "| the ssToken fields marked *must match* in the [configuration reference](configuration.md) ("
        + ", ".join(f"`{name}`" for name in fields)
        + ") | they decide what is selected and what state the checkpoint holds |"
    )
    return "\n".join(rows) + "\n"
