"""MkDocs hooks: pages that are generated from the code, so that nothing is written twice.

- `<!-- sstoken:config-reference -->` becomes the reference of every ssToken field of `SSTokenConfig` (name, type,
  default, allowed values, and the `help` text of the field's metadata), grouped by each field's `group` metadata
  (`config.field_groups`, the order of the class docstring).
- `<!-- sstoken:resume-settings -->` becomes the table of the inherited settings a resume must match, with why
  (`config.SFT_RESUME_MUST_MATCH`).
- `<!-- sstoken:cli-options COMMAND -->` becomes the table of the options a `trl-sstoken` command adds to TRL's.
- `<!-- sstoken:demo-defaults -->` becomes the table of the settings `trl-sstoken demo` changes.
"""

import dataclasses
import os
import re
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_MARKER = re.compile(r"<!-- sstoken:([a-z-]+)(?: ([a-z]+))? -->")


def _options_table(*dataclass_types) -> str:
    from tools.config_reference import default_value, type_name

    rows = ["| Flag | Type | Default | Description |", "|---|---|---|---|"]
    for dataclass_type in dataclass_types:
        for field in dataclasses.fields(dataclass_type):
            help_text = field.metadata.get("help", "").replace("|", "\\|")
            rows.append(f"| `--{field.name}` | `{type_name(field)}` | `{default_value(field)!r}` | {help_text} |")
    return "\n".join(rows) + "\n"


def _replacement(match) -> str:
    from tools.config_reference import config_reference_markdown, resume_settings_markdown
    from trl_sstoken.cli import arguments

    kind, argument = match.group(1), match.group(2)
    if kind == "config-reference":
        return config_reference_markdown()
    if kind == "resume-settings":
        return resume_settings_markdown()
    if kind == "cli-options":
        return _options_table(
            *{
                "train": (arguments.LoadingArguments,),
                "inspect": (arguments.LoadingArguments, arguments.InspectArguments),
                "demo": (arguments.DemoArguments,),
            }[argument]
        )
    if kind == "demo-defaults":
        rows = ["| Setting | `demo` default |", "|---|---|"]
        rows += [f"| `{name}` | `{value!r}` |" for name, value in arguments.DEMO_DEFAULTS.items()]
        return "\n".join(rows) + "\n"
    raise ValueError(f"Unknown docs marker {match.group(0)}")


def on_page_markdown(markdown, page, config, files):
    return _MARKER.sub(_replacement, markdown)
