"""Values echoed in error messages, bounded in length.

An error message repeats what it was given so the user sees what was wrong, but a value can be huge: a YAML alias
bomb of 1 KB expands to millions of list items, and its full `repr` took minutes and 28 MB of text (the CLI then
searched that text for every flag name). Every message that echoes a value goes through `bounded_repr`, which never
looks at more than a few levels and items of a container (`reprlib`), so its cost and length are bounded whatever
the value; `bounded_text` cuts a finished message (an exception's text, argparse's errors) to a limit.
"""

import reprlib


REPR_LIMIT = 300  # characters of one echoed value
TEXT_LIMIT = 2000  # characters of one message

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = 240
_repr.maxlong = 60
for _name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_repr, _name, 8)


def bounded_repr(value, limit: int = REPR_LIMIT) -> str:
    """`repr(value)`, identical for short values; for long ones a prefix ending in `...` (strings keep both ends and
    say how long they are), at most `limit` characters plus that note."""
    text = _repr.repr(value)
    if isinstance(value, str) and len(value) > _repr.maxstring:
        text += f" ({len(value)} characters)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text`, or its first `limit` characters and a note of how many were cut."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters cut)"
