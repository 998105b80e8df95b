"""Saving and resuming an `SSTokenTrainer` run: the bodies of its `Trainer` overrides.

- checkpoints are written by the crash-safe protocol of `checkpoints.py` (a marker recording every file and the
  ssToken settings, written before any older checkpoint is deleted) and keep the history's own state, so a resumed
  run selects exactly as an uninterrupted one; resuming verifies the checkpoint first, and
  `resume_from_checkpoint=True` takes the last one that verifies;
- the final artefact holds only what a user ships: the trained adapter (or model), the tokenizer, and a model card
  with an ssToken section that records the method and its settings (`model_card.py`).
"""

import os
import warnings

from transformers import TrainerCallback

from ..history import is_peft_model
from .checkpoints import adapters_loaded_in_place, resolve_resume
from .checkpoints import save_checkpoint as _save_checkpoint_safely
from .model_card import write_model_card
from .resume import essential_files, run_settings


def save_checkpoint(trainer, write, trial) -> None:
    """`SSTokenTrainer._save_checkpoint`; `write` is `Trainer._save_checkpoint` bound to the trainer and its arguments."""
    _save_checkpoint_safely(trainer, write, run_settings(trainer), trial)


def resolve_resume_checkpoint(trainer, resume_from_checkpoint):
    """The verified checkpoint to resume from, or None: `True` (or "true") -> the last checkpoint of `output_dir`
    that verifies; a path must verify, hold every file the run needs, and the run's settings (its training set
    included) must be the checkpoint's (`checkpoints.resolve_resume`, `resume.py`)."""
    return resolve_resume(
        resume_from_checkpoint, trainer.args.output_dir, run_settings(trainer), essential_files(trainer)
    )


def load_checkpoint(trainer, load, resume_from_checkpoint: str, model=None) -> None:
    """`SSTokenTrainer._load_from_checkpoint`; `load` is `Trainer._load_from_checkpoint` bound to the trainer. The
    adapters are loaded into their existing parameters in their own dtype (`checkpoints.adapters_loaded_in_place`),
    then the history's own state."""
    with adapters_loaded_in_place(trainer.accelerator.unwrap_model(model if model is not None else trainer.model)):
        load(resume_from_checkpoint, model)
    if trainer._history is not None:
        trainer._history.load_checkpoint(resume_from_checkpoint)


class HistoryRestoredAfterEngineLoad(TrainerCallback):
    """Under DeepSpeed, `Trainer` resumes through the engine's own `load_checkpoint` (and never calls
    `_load_from_checkpoint`), whose checkpoint leaves frozen parameters out; under FSDP it loads the active adapter
    only. Either way a lagged or EMA history adapter would resume as it was when the trainer was built. When training
    begins (after the engine loaded), the history adapter is read from the checkpoint's `history/` folder instead."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = getattr(self.trainer, "_resumed_from", None)
        if checkpoint is not None:
            self.trainer._history.restore_from_adapter_folder(checkpoint)


def save_model(trainer, save, output_dir: str | None, _internal_call: bool) -> None:
    """`SSTokenTrainer.save_model`; `save` is `Trainer.save_model` bound to the trainer.

    Checkpoints (`_internal_call`) keep the history (exact resume). The final artefact holds only the trained adapter
    (not the history adapter, not a Rho-1 reference adapter) or model, the tokenizer and the model card.
    """
    if _internal_call:
        save(output_dir, _internal_call)
        if trainer._history is not None and trainer.args.should_save:
            trainer._history.save_checkpoint(output_dir or trainer.args.output_dir)
        return
    output_dir = output_dir or trainer.args.output_dir
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(peft_model) and len(peft_model.peft_config) > 1:
        peft_model.save_pretrained = _with_selected_adapters(peft_model.save_pretrained, [peft_model.active_adapter])
        try:
            save(output_dir, _internal_call)
        finally:
            del peft_model.save_pretrained
    else:
        save(output_dir, _internal_call)
    if not os.path.isdir(output_dir):  # FSDP with SHARDED_STATE_DICT: Trainer.save_model writes no model
        if trainer.is_world_process_zero():
            warnings.warn(
                f"save_model wrote nothing to {output_dir}: under FSDP with fsdp_state_dict_type SHARDED_STATE_DICT, "
                "Trainer saves no final model (the weights are in the checkpoints' sharded pytorch_model_fsdp_*/ "
                "folders). Set fsdp_state_dict_type: FULL_STATE_DICT to get the trained adapter (or model) here.",
                stacklevel=3,
            )
        return
    write_model_card(trainer, output_dir)


def _with_selected_adapters(save_pretrained, adapters):
    def save_only(*args, **kwargs):
        kwargs.setdefault("selected_adapters", adapters)
        return save_pretrained(*args, **kwargs)

    return save_only
