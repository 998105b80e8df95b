"""The values of the `--config` YAML against the types of the fields they set, checked before anything is loaded.

A flag's value is a string that argparse converts with the field's type, so `--seed 1.5` is refused at once. A YAML
value arrives already typed and argparse passes it through as the field's default unconverted: `seed: 1.5` reached
numpy as a float (a raw TypeError naming no field) and `lora_target_modules: [[q_proj], v_proj]` reached PEFT as a
list inside a list (a raw "unhashable type" error), both after the model and data were loaded. YAML strings still go
through argparse like flags; the other values are checked here against the field's type hint, refusing only what
can never work, since TRL and transformers accept more than their hints say (`fsdp: false`, `bf16: 1`):

- a list or a mapping for a field that takes neither (`selection_method: [rel]`);
- a list or a mapping as an item of a list of plain values (`lora_target_modules: [[q_proj], v_proj]`);
- a fraction or a boolean for a field that takes an integer (`seed: 1.5`), a boolean for one that takes a number.
"""

import dataclasses
import enum
import types
import typing

from ..bounded import bounded_repr


def check_config_values(parser, config: dict, path: str) -> None:
    """Raises a `ValueError` naming the first YAML key whose value cannot fit its field, the value and what the
    flag takes. Keys that name no field (`env`, unknown keys) are left to the callers."""
    hints = _field_hints(parser)
    for key, value in config.items():
        if key in hints and not isinstance(value, str):
            problem = _problem(hints[key], value)
            if problem:
                raise ValueError(
                    f"--config {bounded_repr(path)}: {key}: {problem}; --{key} takes {_describe(hints[key])}."
                )


def _field_hints(parser) -> dict:
    hints = {}
    for dataclass_type in getattr(parser, "dataclass_types", ()):
        try:
            resolved = typing.get_type_hints(dataclass_type)
        except Exception:  # an unresolvable annotation: that dataclass's fields stay unchecked
            continue
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(dataclass_type) if f.name in resolved})
    return hints


def _members(hint) -> list:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(hint) for member in _members(arg)]
    return [hint]


def _is_plain(hint) -> bool:
    """A type whose values are single YAML scalars."""
    return (
        hint in (bool, int, float, str, type(None))
        or typing.get_origin(hint) is typing.Literal
        or (isinstance(hint, type) and issubclass(hint, enum.Enum))
    )


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def _problem(hint, value) -> str | None:
    members = _members(hint)
    if isinstance(value, (list, dict)):
        if not _takes_container(members, value):
            return f"{bounded_repr(value)} is {_kind(value)}"
        if isinstance(value, list):
            item_types = [
                typing.get_args(m)[0] for m in members if typing.get_origin(m) is list and typing.get_args(m)
            ]
            if item_types and all(_is_plain(item) for item_type in item_types for item in _members(item_type)):
                for position, item in enumerate(value):
                    if isinstance(item, (list, dict)):
                        return f"item {position} of the list is {_kind(item)}, {bounded_repr(item)}"
        return None
    numbers = {member for member in members if member is not type(None)}
    if numbers == {int} and isinstance(value, (bool, float)):
        return f"{bounded_repr(value)} is not an integer"
    if numbers and numbers <= {int, float} and isinstance(value, bool):
        return f"{bounded_repr(value)} is a boolean, not a number"
    return None


def _takes_container(members, value) -> bool:
    """Whether a field of these types can take this list or mapping: a list for a list type, a mapping for a dict
    or dataclass type, anything for a type this check does not know (`Any`, a class: its dataclass decides)."""
    for member in members:
        if _is_plain(member):
            continue
        origin = typing.get_origin(member) or member
        if origin is list:
            if isinstance(value, list):
                return True
        elif origin is dict or dataclasses.is_dataclass(member):
            if isinstance(value, dict):
                return True
        else:
            return True
    return False


def _describe(hint) -> str:
    names = []
    for member in _members(hint):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if member is type(None):
            name = "null"
        elif origin is list or member is list:
            items = [_describe(arg) for arg in args]
            name = f"a list of {items[0].removeprefix('an ').removeprefix('a ')}s" if items else "a list"
        elif origin is dict or member is dict or dataclasses.is_dataclass(member):
            name = "a mapping"
        elif origin is typing.Literal:
            name = " or ".join(str(arg).lower() if isinstance(arg, bool) else repr(arg) for arg in args)
        elif member in (bool, int, float):
            name = {bool: "true or false", int: "an integer", float: "a number"}[member]
        elif member is str or (isinstance(member, type) and issubclass(member, enum.Enum)):
            name = "a string"
        else:
            name = getattr(member, "__name__", str(member))
        if name not in names:
            names.append(name)
    return " or ".join(names)
