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
import os
import warnings
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from .base import History, adapter_activated, all_finite, parameter_bytes, skip_refresh_warning
from .modes import history_mode


HISTORY_ADAPTER = "history"


class AdapterDisabledHistory(History):
    """`base` with a PEFT adapter: the pre-SFT model, obtained by disabling the adapter for the history forward. No
    extra weights."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def active(self):
        return self.peft_model.disable_adapter()

    def describe(self, args) -> str:
        return "history: the base weights with the LoRA adapter disabled (no copy)."


class AdapterHistory(History):
    """`lagged` or `ema`: a frozen second adapter that follows the trained one every `update_steps` steps."""

    def __init__(self, peft_model, mode: str, update_steps: int, ema_alpha: float):
        self.rule = history_mode(mode).update
        if self.rule is None:
            raise ValueError(f"AdapterHistory needs a moving history mode (one with an update rule), got {mode!r}.")
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
            history_config.lora_dropout = 0.0  # no dropout module at all (the forward also runs in eval mode)
        history_config.inference_mode = True
        peft_model.add_adapter(HISTORY_ADAPTER, history_config)
        self.history_params, self.trained_params = _pair_adapter_parameters(
            peft_model, HISTORY_ADAPTER, self.trained_adapter
        )
        with torch.no_grad():
            for history, trained in zip(self.history_params, self.trained_params, strict=True):
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
        return parameter_bytes(self.history_params)

    @contextmanager
    def active(self):
        """Runs the block with the history adapter active and the trained adapter's flags untouched."""
        with adapter_activated(
            self.peft_model, HISTORY_ADAPTER, self.trained_adapter, self.trained_params, self.history_params
        ):
            yield

    @torch.no_grad()
    def refresh(self) -> None:
        """The mode's update rule (modes.py) on the adapter, one fused call. Never from a non-finite adapter: the
        history keeps its last good state instead."""
        # Under FSDP2 both adapters are DTensors sharded alike: the update runs on each process's own shards
        trained = [_local(p).detach() for p in self.trained_params]
        if not all_finite(trained):
            skip_refresh_warning(self.mode)
            return
        self.rule([_local(p) for p in self.history_params], trained, self.ema_alpha)

    def on_optimizer_step(self, global_step: int) -> None:
        if global_step % self.update_steps == 0:
            self.refresh()

    def describe(self, args) -> str:
        schedule = history_mode(self.mode).schedule(args)
        return f"history: the base weights plus a {self.mode} copy of the LoRA adapter, {schedule}."

    def on_train_begin(self) -> None:
        """Pairs the adapters again as the prepared model holds them: FSDP2's `fully_shard` replaces every parameter
        by a sharded one when the trainer prepares the model, after this history was built, and a refresh of the
        old pairs would update orphaned tensors (the history would silently stay the initial adapter)."""
        self.history_params, self.trained_params = _pair_adapter_parameters(
            self.peft_model, HISTORY_ADAPTER, self.trained_adapter
        )

    def restore_from_adapter_folder(self, checkpoint: str) -> None:
        """Loads the history adapter from `checkpoint/history/` into its parameters, in place.

        For engines whose resume leaves it out: DeepSpeed's checkpoint excludes frozen parameters, and FSDP's adapter
        load (`load_fsdp_model(adapter_only=True)`) restores the active adapter only; either way the history would
        resume as it was when the trainer was built. Under FSDP2 each process writes its own shard of each tensor."""
        path = os.path.join(checkpoint, HISTORY_ADAPTER, "adapter_model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming a history={self.mode!r} run needs the history adapter {path}, but it is missing: the "
                "checkpoint was not written by SSTokenTrainer with this history mode."
            )
        state = load_file(path)
        marker = f".{HISTORY_ADAPTER}."
        targets = {name.replace(marker, "."): p for name, p in self.peft_model.named_parameters() if marker in name}
        missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"{path} is not this model's history adapter: {len(missing)} tensor(s) missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unknown (e.g. {unexpected[:2]}). Resume with the model and adapter configuration "
                "the checkpoint was made with."
            )
        with torch.no_grad():
            for key, param in targets.items():
                value = state[key].to(device=_local(param).device, dtype=param.dtype)
                if hasattr(param, "device_mesh"):  # a DTensor: this process's shard, cut locally (no communication)
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                    value = value.to_local()
                _local(param).copy_(value)

    # save_checkpoint / load_checkpoint: nothing to do. PEFT saves every adapter in a checkpoint, the history one
    # under `history/`, and `Trainer._load_from_checkpoint` restores them all (DeepSpeed excepted:
    # `restore_from_adapter_folder`)

    def checkpoint_files(self) -> list[tuple[str, ...]]:
        return [(f"{HISTORY_ADAPTER}/adapter_model.safetensors", f"{HISTORY_ADAPTER}/adapter_model.bin")]


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


def _local(param: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the parameter), or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def _is_full_module_copy(name: str) -> bool:
    return f"modules_to_save.{HISTORY_ADAPTER}." in name
