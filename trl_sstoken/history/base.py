"""The interface every history (and every Rho-1 reference) offers, and the helpers they share.

A history is the earlier state of the model that REL compares the current model against. The trainer holds one
`History` and never needs to know which: it asks for log-probs once per micro-batch, tells it about every optimizer
step, and lets it add to and read from checkpoints.
"""

import warnings
from contextlib import contextmanager, nullcontext

import torch


@torch.no_grad()
def fused_log_probs(model, inputs: dict) -> torch.Tensor:
    """Label log-probs of a no-grad, deterministic forward through TRL's fused LM head, (B, T-1).

    Every history and reference forward goes through here, in the middle of a training step, while the trained model
    is in train mode: `eval_mode` keeps dropout and NEFTune's embedding noise out of it.
    """
    with eval_mode(model):
        return model(**inputs, fused_lm_head=True).log_probs


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Every module of `model` in eval mode for the block, then each one's own train/eval flag back, also on errors.

    A history or reference forward must be a function of the weights and the batch alone. In train mode it is not:
    dropout (the base model's, e.g. GPT-2's residual/embedding/attention dropout or `attention_dropout`, and a LoRA
    adapter's), NEFTune's embedding noise (its forward hook adds noise only while the embedding module is
    `training`), MoE router jitter, all draw fresh noise (0.3 nats per token with `neftune_noise_alpha=5`). All of
    them read `module.training`, so that flag is what is switched. The flags are set directly rather than through
    `Module.train()`, which would also set every child to its parent's mode: the exact mixture the owner left (a
    frozen block kept in eval, say) comes back, and overrides of `train()` (transformers re-kernelising a model with
    `use_kernels`) are not run twice per step. Gradient checkpointing is off in eval mode, which a no-grad forward
    does not need. The trained forward runs after the block, with its flags, dropout and NEFTune unchanged.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in flags:
            module.training = False
        yield model
    finally:
        for module, training in flags:
            module.training = training


class History:
    """An earlier state of the trained model.

    - `log_probs(model, inputs, example_index)`: its log-probability of each label, (B, T-1), without gradient.
      `example_index` (the collator's `sstoken_example_ids` and `sstoken_token_example`) says which examples of the
      training set the batch holds and where; only a cached history reads it.
    - `on_optimizer_step(global_step)`: move forward on its schedule (fixed histories do nothing);
    - `save_checkpoint(directory)` / `load_checkpoint(directory)`: state that PEFT's own checkpointing does not cover;
      `checkpoint_files()`: the files that state is in, which a resume requires;
    - `parameter_bytes`: the memory it adds;
    - `prepare(trainer)`: work due before its first use inside `train()` (a cached history loads or builds its
      cache); `describe(args)`: one line for the run's log. Callers ask these instead of testing the class.

    The default `log_probs` runs the trained model itself under `active()`, the context in which the model computes
    the history's predictions (an adapter disabled or swapped); subclasses that hold their own weights override it.
    """

    parameter_bytes: int = 0

    def active(self):
        """The block in which `model` predicts as this history (default: as it is)."""
        return nullcontext()

    def log_probs(self, model, inputs: dict, example_index: dict | None = None) -> torch.Tensor:
        with self.active():
            return fused_log_probs(model, inputs)

    def on_optimizer_step(self, global_step: int) -> None:
        """A fixed history never changes."""

    def on_train_begin(self) -> None:
        """Called once the trainer has prepared (wrapped, sharded) the model, before the first step."""

    def save_checkpoint(self, directory: str) -> None:
        """Nothing to save beyond what `Trainer` and PEFT save."""

    def load_checkpoint(self, directory: str) -> None:
        """Nothing to load beyond what `Trainer` and PEFT restore."""

    def prepare(self, trainer) -> None:
        """Nothing to do before the first use."""

    def describe(self, args) -> str:
        """One line for the run's log: what the history is and what it costs."""
        return f"history: {type(self).__name__}."

    def checkpoint_files(self) -> list[tuple[str, ...]]:
        """The files of a checkpoint that hold this history's state, each as its alternatives: a resume refuses a
        checkpoint whose marker records none of them. A fixed history has none."""
        return []


def parameter_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


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
        for param, flag in zip(trained_params, previous_flags, strict=True):
            param.requires_grad_(flag)
        for param in frozen_params:
            param.requires_grad_(False)
