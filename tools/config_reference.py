"""The configuration reference of the docs, generated from the ssToken fields of `SSTokenConfig` (a development tool
of the docs build, `tools/docs_hooks.py`; not installed with the package).

The reference is read off the dataclass itself, from each field's default, type and `help` metadata and from
`config.FIELD_GROUPS` (the groups the class docstring and the field declarations follow, read by
`config.field_groups`), so nothing about a field is written twice; the model card's settings section reads the same
fields (`trl_sstoken.saving.model_card`).
"""

import dataclasses

from trl_sstoken.config import field_groups


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
