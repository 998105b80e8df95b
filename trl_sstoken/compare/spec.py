"""The candidates of a comparison: `--methods full sstoken rho1 "sstoken:selection_ratio=0.8"`.

A candidate is a selection method, optionally followed by `:` and comma-separated `field=value` settings of
`SSTokenConfig` (`sstoken:selection_ratio=0.8,selection_gamma=0.25`). Values are converted by the field's type. Every
candidate is checked here, before any model or data is loaded: unknown methods and fields are refused with the
closest name, bad values with the field's own check.
"""

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One entry of `--methods`: its label (as given), the method and its setting overrides."""

    label: str
    method: str
    settings: dict = field(default_factory=dict)

    @property
    def overrides(self) -> dict:
        return {"selection_method": self.method, **self.settings}

    @property
    def slug(self) -> str:
        """A folder name for the candidate's runs."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label.replace(":", "__")).strip("_")[:120]


def parse_candidates(specs: list[str]) -> list[Candidate]:
    """The candidates of `--methods`, in order; an error names the entry and says what is allowed."""
    from ..config import SSTokenConfig
    from ..selection.methods import method_names

    if not specs:
        raise ValueError("--methods needs at least one candidate, e.g. --methods full sstoken rho1.")
    fields = {f.name: f for f in dataclasses.fields(SSTokenConfig) if f.init}
    hints = typing.get_type_hints(SSTokenConfig)
    allowed = method_names()  # the live registry: a method registered outside the package is a candidate too
    candidates, labels = [], set()
    for spec in specs:
        text = str(spec).strip()
        method, _, rest = text.partition(":")
        method = method.strip()
        if method not in allowed:
            close = difflib.get_close_matches(method, allowed, n=1)
            raise ValueError(
                f"--methods {text[:80]!r}: unknown selection method {method[:40]!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; allowed: {', '.join(allowed)}, each optionally with ':field=value,...'."
            )
        settings = {}
        for item in filter(None, (part.strip() for part in rest.split(","))) if rest else []:
            name, equals, value = item.partition("=")
            name = name.strip()
            if not equals or not name:
                raise ValueError(f"--methods {text[:80]!r}: {item[:60]!r} is not field=value.")
            if name not in fields or name in ("output_dir", "seed", "selection_method"):
                close = difflib.get_close_matches(name, list(fields), n=1)
                raise ValueError(
                    f"--methods {text[:80]!r}: {name[:40]!r} is not a setting a candidate can change"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                    + "; use SSTokenConfig / SFTConfig field names (output_dir, seed and selection_method are set "
                    "by compare)."
                )
            settings[name] = convert(name, value.strip(), hints.get(name, str))
        if text in labels:
            raise ValueError(f"--methods lists {text[:80]!r} twice.")
        labels.add(text)
        candidates.append(Candidate(text, method, settings))
    return candidates


def convert(name: str, value: str, annotation):
    """`value` (text) as the field's type: bool, int, float or str; None for 'none'/'null' where allowed."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    types = [a for a in args if a is not type(None)] or [annotation]
    if optional and value.lower() in ("none", "null"):
        return None
    target = types[0] if len(types) == 1 else (str if str in types else types[0])
    try:
        if target is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if target is int:
            return int(value)
        if target is float:
            return float(value)
    except ValueError:
        raise ValueError(f"--methods: {name}={value[:40]!r} is not a {target.__name__}.") from None
    return value
