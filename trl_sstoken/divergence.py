"""The divergence rule: a run that has diverged stops with `TrainingDivergedError`, and nothing non-finite is saved.

Without it a diverging run looks like a success: with `learning_rate=1e6` the update of step 2 turns every adapter
weight into NaN, every later batch is skipped as non-finite (loss 0.0), one warning is printed, the run exits 0 and
saves a NaN adapter. The rule (docs/reliability.md, "Divergence"):

- after every optimizer step the trained weights (those with `requires_grad`) are checked; a NaN or inf stops the
  run at that step, before the history moves, before any checkpoint of that step and before any final save;
- a micro-batch whose log-probabilities are non-finite is skipped (no gradient), as before: one bad batch is not a
  divergence. An optimizer step in which every micro-batch, on every process, was skipped had no training signal
  at all; `max_consecutive_skipped_steps` such steps in a row stop the run (None: never for skips alone);
- `check_savable` refuses to write a checkpoint or the final model from non-finite weights, so the last good
  checkpoint stays the newest one (none is rotated away) and is the one to resume from.

Both stop conditions are agreed across processes (one gather of two numbers per optimizer step), so every process
raises at the same step instead of one of them leaving the others waiting in their next collective. The weight check
is one fused max-abs reduction over the trained weights (`torch._foreach_norm` with ord=inf: NaN and inf propagate
through it, finite values never overflow) and one host sync; with LoRA it reads only the adapter.
"""

import os

import torch
from transformers import TrainerCallback


class TrainingDivergedError(RuntimeError):
    """Training diverged (non-finite trained weights, or every batch skipped for too many steps in a row); nothing
    was saved from the diverged state."""


def trained_parameters(model) -> list[tuple[str, torch.Tensor]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def nonfinite_mask(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(N,) bool: which of `tensors` hold a NaN or inf. One fused reduction per device and dtype, no host sync."""
    local = [_local(t).detach() for t in tensors]
    present = [i for i, t in enumerate(local) if t.numel()]  # ZeRO-3 leaves empty placeholders on some processes
    if not present:
        return torch.zeros(len(tensors), dtype=torch.bool)
    norms = torch._foreach_norm([local[i] for i in present], float("inf"))
    device = norms[0].device
    mask = torch.zeros(len(tensors), dtype=torch.bool, device=device)
    mask[torch.tensor(present, device=device)] = torch.stack([~torch.isfinite(n).to(device) for n in norms])
    return mask


def first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor of `named` that holds a NaN or inf, or None."""
    mask = nonfinite_mask([t for _, t in named]).cpu()
    return named[int(mask.nonzero()[0, 0])][0] if bool(mask.any()) else None


def check_savable(trainer, what: str) -> None:
    """Refuses to save `what` (a checkpoint, the model) from non-finite trained weights."""
    name = first_nonfinite(trained_parameters(trainer.accelerator.unwrap_model(trainer.model)))
    if name is not None:
        raise TrainingDivergedError(
            f"Refusing to save {what}: the trained weight {name} holds NaN or inf, so the run diverged (see "
            f"docs/reliability.md, 'Divergence'). {last_good_checkpoint_note(trainer.args.output_dir)}"
        )


def last_good_checkpoint_note(output_dir: str) -> str:
    from .saving.checkpoints import checkpoint_problem, numbered_checkpoints

    if os.path.isdir(output_dir):
        for _, path in reversed(numbered_checkpoints(output_dir)):
            if checkpoint_problem(path) is None:
                return (
                    f"The newest checkpoint, {path}, verifies and is untouched (its weights are finite; check its "
                    "logged loss before resuming from it)."
                )
    return "No checkpoint of this run was written before it diverged."


class DivergenceGuard(TrainerCallback):
    """Applies the divergence rule: counts the skipped micro-batches of each optimizer step (`record_batch`, from
    `compute_loss`) and checks the trained weights right after the optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.limit = trainer.args.max_consecutive_skipped_steps
        self._parameters = None
        self._batches = self._skipped = 0
        self.skipped_steps = 0  # consecutive optimizer steps with every micro-batch skipped

    def record_batch(self, skipped: bool) -> None:
        self._batches += 1
        self._skipped += int(skipped)

    def on_train_begin(self, args, state, control, **kwargs):
        self._parameters = trained_parameters(self.trainer.accelerator.unwrap_model(self.trainer.model))
        self._batches = self._skipped = self.skipped_steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._parameters is None:
            self.on_train_begin(args, state, control)
        step = state.global_step + 1  # the step whose update just ran
        mask = nonfinite_mask([p for _, p in self._parameters])
        all_skipped = self._batches > 0 and self._skipped == self._batches
        local = torch.stack([mask.any().float(), torch.tensor(float(all_skipped), device=mask.device)])
        gathered = self.trainer.accelerator.gather(local[None].to(self.trainer.accelerator.device)).view(-1, 2)
        any_nonfinite, everywhere_skipped = (gathered[:, 0].amax() > 0).item(), (gathered[:, 1].amin() > 0).item()
        skipped, batches = self._skipped, self._batches
        self._batches = self._skipped = 0
        if any_nonfinite:
            name = self._parameters[int(mask.cpu().nonzero()[0, 0])][0] if bool(mask.any()) else None
            where = f"the trained weight {name}" if name else "a trained weight (on another process)"
            raise TrainingDivergedError(
                f"Training diverged at optimizer step {step}: {where} holds NaN or inf after the update "
                f"(learning_rate={args.learning_rate!r}, weight_decay={args.weight_decay!r}, "
                f"max_grad_norm={args.max_grad_norm!r}). Nothing was saved from this state. "
                f"{last_good_checkpoint_note(args.output_dir)} Lower learning_rate, keep gradient clipping on "
                "(max_grad_norm > 0), or train in bf16 rather than fp16."
            )
        self.skipped_steps = self.skipped_steps + 1 if everywhere_skipped else 0
        if self.limit is not None and self.skipped_steps >= self.limit:
            raise TrainingDivergedError(
                f"Training diverged: every micro-batch of the last {self.skipped_steps} optimizer steps (up to step "
                f"{step}; {skipped} of {batches} on this process in the last one) had non-finite log-probabilities "
                f"and was skipped, so nothing was trained (max_consecutive_skipped_steps={self.limit}). Nothing was "
                f"saved from this state. {last_good_checkpoint_note(args.output_dir)} Lower learning_rate, or train "
                "in bf16 rather than fp16; max_consecutive_skipped_steps=None never stops for skips alone."
            )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
