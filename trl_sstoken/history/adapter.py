"""Histories for a model trained through a PEFT adapter (LoRA, QLoRA): no second copy of the base model.

- `base`: the base weights alone, i.e. the model with its adapter disabled (no extra memory);
- `lagged`: the base weights plus a frozen copy of the adapter, refreshed every K optimizer steps;
- `ema`: the base weights plus an exponential moving average of the adapter, updated every K optimizer steps.
The copy is a second PEFT adapter named `history` on the same (possibly 4-bit or 8-bit) base layers, so it costs one
more set of adapter weights, in the trained adapter's dtype, and nothing else: no gradients, no optimizer state, no
dropout. Because it is a real adapter, `Trainer` checkpoints save it under `checkpoint-N/history/` and resuming
restores it.
"""

import copy
import warnings
from contextlib import contextmanager

import torch

HISTORY_ADAPTER = "history"


@torch.no_grad()
def history_forward_log_probs(model, inputs) -> torch.Tensor:
    """Label log-probs of a no-grad forward through TRL's fused LM head, (B, T-1)."""
    return model(**inputs, fused_lm_head=True).log_probs


class FrozenBaseHistory:
    """`base`: the pre-SFT model, obtained by disabling the adapter for the history forward."""

    parameter_bytes = 0

    def __init__(self, peft_model):
        self.peft_model = peft_model

    @contextmanager
    def active(self):
        with self.peft_model.disable_adapter():
            yield

    def log_probs(self, model, inputs, fields=None) -> torch.Tensor:
        with self.active():
            return history_forward_log_probs(model, inputs)

    def on_optimizer_step(self, global_step: int) -> None:
        """The base weights never change."""

    def save_checkpoint(self, directory: str) -> None:
        """Nothing to save: the base weights are the model's own."""

    def load_checkpoint(self, directory: str) -> None:
        """Nothing to load."""


class AdapterHistory:
    """`lagged` or `ema`: a frozen second adapter that follows the trained one every `update_steps` steps."""

    def __init__(self, peft_model, mode: str, update_steps: int, ema_alpha: float):
        if mode not in ("lagged", "ema"):
            raise ValueError(f"AdapterHistory mode must be 'lagged' or 'ema', got {mode!r}.")
        self.peft_model = peft_model
        self.mode = mode
        self.update_steps = update_steps
        self.ema_alpha = ema_alpha
        self.trained_adapter = peft_model.active_adapter
        if HISTORY_ADAPTER in peft_model.peft_config:
            raise ValueError(
                f"The model already has an adapter named {HISTORY_ADAPTER!r}; ssToken needs that name for its "
                "history adapter. Rename or delete the existing adapter."
            )
        history_config = copy.deepcopy(peft_model.peft_config[self.trained_adapter])
        if hasattr(history_config, "lora_dropout"):
            history_config.lora_dropout = 0.0  # the history forward runs in train mode; it must be deterministic
        history_config.inference_mode = True
        peft_model.add_adapter(HISTORY_ADAPTER, history_config)
        self.history_params, self.trained_params = _pair_adapter_parameters(
            peft_model, HISTORY_ADAPTER, self.trained_adapter
        )
        with torch.no_grad():
            for history, trained in zip(self.history_params, self.trained_params):
                history.data = history.data.to(device=trained.device, dtype=trained.dtype)
                history.requires_grad_(False)
        self.refresh()
        if getattr(history_config, "modules_to_save", None):
            extra = sum(p.numel() for n, p in peft_model.named_parameters() if _is_full_module_copy(n))
            warnings.warn(
                f"The adapter has modules_to_save={history_config.modules_to_save}: a {mode} history keeps a full "
                f"copy of those modules ({extra:,} extra parameters). Use history='base' to avoid that cost.",
                stacklevel=3,
            )

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.history_params)

    @contextmanager
    def active(self):
        """Runs the block with the history adapter active and the trained adapter's flags untouched."""
        with adapter_activated(
            self.peft_model, HISTORY_ADAPTER, self.trained_adapter, self.trained_params, self.history_params
        ):
            yield

    def log_probs(self, model, inputs, fields=None) -> torch.Tensor:
        with self.active():
            return history_forward_log_probs(model, inputs)

    @torch.no_grad()
    def refresh(self) -> None:
        """lagged: history <- adapter. ema: history <- alpha * history + (1 - alpha) * adapter. Never from a
        non-finite adapter: the history keeps its last good state instead."""
        trained = [p.detach() for p in self.trained_params]
        if not all_finite(trained):
            skip_refresh_warning(self.mode)
            return
        if self.mode == "lagged":
            torch._foreach_copy_(self.history_params, trained)
        else:
            torch._foreach_lerp_(self.history_params, trained, 1.0 - self.ema_alpha)

    def on_optimizer_step(self, global_step: int) -> None:
        if global_step % self.update_steps == 0:
            self.refresh()

    def save_checkpoint(self, directory: str) -> None:
        """PEFT saves every adapter in a checkpoint, the history one under `history/`."""

    def load_checkpoint(self, directory: str) -> None:
        """`Trainer._load_from_checkpoint` restores every adapter saved in the checkpoint, the history one too."""


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def skip_refresh_warning(mode: str) -> None:
    warnings.warn(
        f"The trained weights hold NaN or inf: the {mode} history is not updated from them and keeps its last "
        "finite state.",
        stacklevel=3,
    )


@contextmanager
def adapter_activated(peft_model, name: str, trained_adapter: str, trained_params: list, frozen_params: list):
    """Makes `name` the active adapter for the block, then restores `trained_adapter` with its exact
    `requires_grad` flags (PEFT's `set_adapter` would mark every trained parameter trainable) and keeps `name`'s
    parameters (`frozen_params`) frozen."""
    previous_flags = [p.requires_grad for p in trained_params]
    peft_model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(trained_adapter)
        for param, flag in zip(trained_params, previous_flags):
            param.requires_grad_(flag)
        for param in frozen_params:
            param.requires_grad_(False)


def _pair_adapter_parameters(peft_model, history_name: str, trained_name: str):
    """(history params, trained params), paired by name once, so every sync is one fused foreach call."""
    named = dict(peft_model.named_parameters())
    marker, trained_marker = f".{history_name}.", f".{trained_name}."
    history_params, trained_params = [], []
    for name, param in named.items():
        if marker not in name:
            continue
        trained_name_full = name.replace(marker, trained_marker)
        if trained_name_full not in named:
            raise RuntimeError(f"History parameter {name} has no trained counterpart {trained_name_full}.")
        history_params.append(param)
        trained_params.append(named[trained_name_full])
    if not history_params:
        raise RuntimeError("The history adapter has no parameters; is the trained adapter a LoRA-style tuner?")
    return history_params, trained_params


def _is_full_module_copy(name: str) -> bool:
    return f"modules_to_save.{HISTORY_ADAPTER}." in name
