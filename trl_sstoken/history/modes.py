"""The history modes (`SSTokenConfig.history`): one table, read by the config, both history classes and the CLI.

A mode is its update rule, applied every `history_update_steps` optimizer steps to the history's weights (an
adapter copy with PEFT, a whole-model copy without), and a few words for the run's description. `base` has no rule:
it is the weights before training, fixed. The rules work on lists of tensors (one fused `torch._foreach_*` call for
an adapter; one tensor at a time across devices for a model copy), so the adapter and the full-copy histories
share them instead of each branching on the mode's name.

Adding a mode: one `HistoryMode` in `HISTORY_MODES` (its rule, and its schedule text), its tests, and the docs.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


def copy_rule(history: list[torch.Tensor], trained: list[torch.Tensor], ema_alpha: float) -> None:
    """lagged: history <- trained."""
    torch._foreach_copy_(history, trained)


def ema_rule(history: list[torch.Tensor], trained: list[torch.Tensor], ema_alpha: float) -> None:
    """ema: history <- alpha * history + (1 - alpha) * trained."""
    torch._foreach_lerp_(history, trained, 1.0 - ema_alpha)


@dataclass(frozen=True)
class HistoryMode:
    name: str
    update: Callable[[list, list, float], None] | None  # None: fixed, the weights before training
    schedule: Callable[[object], str]  # the update schedule in words, from the run's SSTokenConfig

    @property
    def fixed(self) -> bool:
        return self.update is None


HISTORY_MODES: dict[str, HistoryMode] = {
    mode.name: mode
    for mode in (
        HistoryMode("base", None, lambda args: "frozen at the start"),
        HistoryMode("lagged", copy_rule, lambda args: f"updated every {args.history_update_steps} optimizer steps"),
        HistoryMode(
            "ema",
            ema_rule,
            lambda args: (
                f"an EMA with alpha {args.history_ema_alpha}, every {args.history_update_steps} optimizer steps"
            ),
        ),
    )
}


def history_mode(name: str) -> HistoryMode:
    if name not in HISTORY_MODES:
        raise ValueError(f"history={name!r} is not supported; allowed values: {', '.join(map(repr, HISTORY_MODES))}.")
    return HISTORY_MODES[name]
