"""History models: the earlier state of the model that REL compares the current model against.

Every history offers the same small interface, so the trainer never needs to know which one it holds:
- `log_probs(model, inputs) -> (B, T-1)`: the history's log-probability of each label, without gradient;
- `on_optimizer_step(global_step)`: move forward on its schedule (a no-op for fixed histories);
- `save_checkpoint(directory)` / `load_checkpoint(directory)`: state that PEFT's own checkpointing does not cover;
- `parameter_bytes`: the memory it adds.

Which one is built depends on how the model is held: with a PEFT adapter the history never copies the base model
(`adapter.py`); with full fine-tuning it is a copy of the whole model (`model_copy.py`); a fixed `base` history can
instead be precomputed once and read from disk (`cache.py`).
"""

from transformers import TrainerCallback

from .adapter import HISTORY_ADAPTER, AdapterHistory, FrozenBaseHistory
from .model_copy import ModelCopyHistory


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def build_history(model, mode: str, update_steps: int, ema_alpha: float, device=None, max_copy_gb=None):
    """The history object for `mode` and the way `model` is held (PEFT adapter or full weights)."""
    if not is_peft_model(model):
        return ModelCopyHistory(model, mode, update_steps, ema_alpha, device=device, max_copy_gb=max_copy_gb)
    if model.peft_config[model.active_adapter].is_prompt_learning:
        raise ValueError("ssToken's history needs an adapter on the model's layers (e.g. LoRA), not prompt learning.")
    if mode == "base":
        return FrozenBaseHistory(model)
    return AdapterHistory(model, mode, update_steps, ema_alpha)


class HistoryUpdateCallback(TrainerCallback):
    """Moves the history forward after each optimizer step, on the schedule the history defines."""

    def __init__(self, history):
        self.history = history

    def on_step_end(self, args, state, control, **kwargs):
        self.history.on_optimizer_step(state.global_step)


__all__ = [
    "HISTORY_ADAPTER",
    "AdapterHistory",
    "FrozenBaseHistory",
    "HistoryUpdateCallback",
    "ModelCopyHistory",
    "build_history",
    "is_peft_model",
]
