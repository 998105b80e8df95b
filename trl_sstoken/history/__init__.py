"""History models: the earlier state of the model that REL compares the current model against.

Every history is a `History` (`base.py`), so the trainer never needs to know which one it holds. Which one is built
depends on `history` and on how the model is held:

The modes and their update rules are one table, `modes.py` (`HISTORY_MODES`): a fixed mode (no rule) is the
weights before training, a moving mode applies its rule to a copy every `history_update_steps` steps.

| `history` | PEFT adapter (LoRA, QLoRA)            | full fine-tuning                        |
|-----------|---------------------------------------|-----------------------------------------|
| `base`    | `AdapterDisabledHistory` (no weights) | `ModelCopyHistory(mode="base")` (a copy) |
| `lagged`  | `AdapterHistory(mode="lagged")`       | `ModelCopyHistory(mode="lagged")`        |
| `ema`     | `AdapterHistory(mode="ema")`          | `ModelCopyHistory(mode="ema")`           |

A fixed `base` history can instead be precomputed once and read from disk (`CachedHistory`, `cache.py`): its
building pass runs `AdapterDisabledHistory`, or with full fine-tuning `UntrainedModelHistory` (the model itself,
before training, so no copy). `fingerprints.py` identifies what a cache was computed from. `reference.py` holds
the Rho-1 reference model (a second adapter or a separate model), which is read like a frozen history.
"""

from transformers import TrainerCallback

from .adapter import HISTORY_ADAPTER, AdapterDisabledHistory, AdapterHistory
from .base import History
from .model_copy import ModelCopyHistory
from .modes import HISTORY_MODES, HistoryMode, history_mode


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def build_history(model, mode: str, update_steps: int, ema_alpha: float, device=None, max_copy_gb=None) -> History:
    """The history object for `mode` and the way `model` is held (PEFT adapter or full weights)."""
    if not is_peft_model(model):
        return ModelCopyHistory(model, mode, update_steps, ema_alpha, device=device, max_copy_gb=max_copy_gb)
    if model.peft_config[model.active_adapter].is_prompt_learning:
        raise ValueError("ssToken's history needs an adapter on the model's layers (e.g. LoRA), not prompt learning.")
    if history_mode(mode).fixed:
        return AdapterDisabledHistory(model)
    return AdapterHistory(model, mode, update_steps, ema_alpha)


class HistoryUpdateCallback(TrainerCallback):
    """Moves the history forward after each optimizer step, on the schedule the history defines."""

    def __init__(self, history: History):
        self.history = history

    def on_train_begin(self, args, state, control, **kwargs):
        self.history.on_train_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.history.on_optimizer_step(state.global_step)


__all__ = [
    "HISTORY_ADAPTER",
    "HISTORY_MODES",
    "AdapterDisabledHistory",
    "AdapterHistory",
    "History",
    "HistoryMode",
    "HistoryUpdateCallback",
    "ModelCopyHistory",
    "build_history",
    "history_mode",
    "is_peft_model",
]
