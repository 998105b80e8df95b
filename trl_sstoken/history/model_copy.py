"""History for full fine-tuning (no PEFT adapter): a second copy of the whole model.

This costs one more model in memory (its parameters; no gradients, no optimizer state). The copy can live on
another device (`history_device="cpu"`, or a second GPU) at the price of moving each batch there and back, and
`history_copy_max_gb` refuses a copy larger than the user allows. A fixed `base` history needs no copy at all when
its log-probs are cached (`history_cache_dir`).
- `base`: a frozen copy of the weights the trainer was given;
- `lagged`: a copy refreshed from the trained weights every K optimizer steps;
- `ema`: `copy <- alpha * copy + (1 - alpha) * weights` every K optimizer steps.
"""

import copy
import os

import torch
from safetensors.torch import load_file, save_file

from .base import History, all_finite, fused_log_probs, parameter_bytes, skip_refresh_warning
from .modes import history_mode


CHECKPOINT_FILE = "sstoken_history_model.safetensors"


class ModelCopyHistory(History):
    """A copy of the whole model: frozen (`base`), refreshed (`lagged`) or averaged (`ema`), on `device`."""

    def __init__(self, model, mode: str, update_steps: int, ema_alpha: float, device=None, max_copy_gb=None):
        if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            raise ValueError(
                f"history={mode!r} with a quantized model and no PEFT adapter cannot work: a quantized model cannot "
                "be fully fine-tuned, and a lagged or EMA copy of quantized weights cannot be updated. Train a LoRA "
                "adapter on it (QLoRA: pass peft_config), whose history costs only adapter weights."
            )
        self.mode = mode
        self.rule = history_mode(mode).update  # None: a fixed copy
        self.update_steps = update_steps
        self.ema_alpha = ema_alpha
        self.parameter_bytes = parameter_bytes(model.parameters())
        if max_copy_gb is not None and self.parameter_bytes > max_copy_gb * 2**30:
            raise ValueError(
                f"history={mode!r} without a PEFT adapter copies the whole model ({self.parameter_bytes / 2**30:.2f} "
                f"GiB of parameters), more than history_copy_max_gb={max_copy_gb}. Raise history_copy_max_gb, place "
                "the copy elsewhere with history_device, cache a base history with history_cache_dir, or train a "
                "LoRA adapter (peft_config)."
            )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        copies = dict(self.model.named_parameters())
        self.trained_params = [p for _, p in model.named_parameters()]
        self.copy_params = [copies[name] for name, _ in model.named_parameters()]

    def log_probs(self, model, inputs, example_index=None) -> torch.Tensor:
        """The copy's log-probs, computed on its own device and returned on the batch's."""
        device = next(iter(v for v in inputs.values() if torch.is_tensor(v))).device
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        return fused_log_probs(self.model, moved).to(device)

    @torch.no_grad()
    def refresh(self) -> None:
        """The mode's update rule (modes.py), one tensor at a time across devices, so the update never holds a
        second full copy in transit. Never from non-finite weights."""
        if not all_finite(p.detach() for p in self.trained_params):
            skip_refresh_warning(self.mode)
            return
        for copy_param, param in zip(self.copy_params, self.trained_params, strict=True):
            source = param.detach().to(device=copy_param.device, dtype=copy_param.dtype)
            self.rule([copy_param], [source], self.ema_alpha)

    def on_optimizer_step(self, global_step: int) -> None:
        if self.rule is not None and global_step % self.update_steps == 0:
            self.refresh()

    def describe(self, args) -> str:
        size = f"{self.parameter_bytes / 2**30:.2f} GiB"
        return (
            f"history: a {self.mode} copy of the whole model ({size}), {history_mode(self.mode).schedule(args)}: full "
            "fine-tuning, because --use_peft is not set (with --use_peft the history costs no copy)."
        )

    def save_checkpoint(self, directory: str) -> None:
        """A moving copy is part of the training state; a `base` copy is rebuilt from the model on resume."""
        if self.rule is not None:
            state = {name: tensor.contiguous() for name, tensor in self.model.state_dict().items()}
            save_file(_untie(state), os.path.join(directory, CHECKPOINT_FILE))

    def checkpoint_files(self) -> list[tuple[str, ...]]:
        return [] if self.mode == "base" else [(CHECKPOINT_FILE,)]

    def load_checkpoint(self, directory: str) -> None:
        path = os.path.join(directory, CHECKPOINT_FILE)
        if self.rule is None:
            return
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Resuming a history={self.mode!r} run needs {CHECKPOINT_FILE} in the checkpoint {directory}, but it "
                "is missing: the checkpoint was not written by SSTokenTrainer with this history mode."
            )
        state = load_file(path, device=str(self.device))
        expected = set(_untie(dict(self.model.state_dict())))  # saved without tied duplicates, loaded likewise
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{CHECKPOINT_FILE} in the checkpoint {directory} is not this model's history: "
                f"{len(missing)} weight(s) missing (e.g. {missing[:3]}), {len(unexpected)} unknown (e.g. "
                f"{unexpected[:3]}). Resume with the model the checkpoint was made with."
            )
        self.model.load_state_dict(state, strict=False)  # strict would count the tied duplicates as missing


def _untie(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): keep one name per storage."""
    seen, untied = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            untied[name] = tensor
    return untied
