"""Saving and resuming an `SSTokenTrainer` run: the bodies of its `Trainer` overrides.

- checkpoints get a completion marker after everything else (`checkpoints.py`) and keep the history's own state,
  so a resumed run selects exactly as an uninterrupted one; `resume_from_checkpoint=True` takes the last complete
  checkpoint;
- the final artefact holds only what a user ships: the trained adapter (or model), the tokenizer, and a model card
  with an ssToken section that records the method and its settings (`config_reference.py`).
"""

import os
import shutil

from .checkpoints import CHECKPOINT_MARKER, is_checkpoint_complete, last_complete_checkpoint, mark_checkpoint_complete
from .config_reference import add_to_model_card
from .history import is_peft_model
from .model_card import CardNames, name_base_model_and_dataset


def mark_saved_checkpoint(trainer, trial) -> None:
    """After `Trainer._save_checkpoint`: mark the checkpoint it just wrote as complete."""
    if trainer.args.should_save:
        checkpoint = os.path.join(trainer._get_output_dir(trial=trial), f"checkpoint-{trainer.state.global_step}")
        mark_checkpoint_complete(checkpoint, trainer.state.global_step)


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir: str):
    """`True` -> the last *complete* checkpoint of `output_dir` (one a crash interrupted is skipped, never loaded); a
    path must be complete; anything else is returned as is."""
    if resume_from_checkpoint is True:
        return last_complete_checkpoint(output_dir)
    if isinstance(resume_from_checkpoint, str) and not is_checkpoint_complete(resume_from_checkpoint):
        raise ValueError(
            f"The checkpoint {resume_from_checkpoint} is incomplete: it has no {CHECKPOINT_MARKER}, which "
            "SSTokenTrainer writes after everything else, so writing it was interrupted. Resume from an earlier "
            "checkpoint, or pass resume_from_checkpoint=True to take the last complete one."
        )
    return resume_from_checkpoint


def add_sstoken_section_to_card(trainer, names: CardNames | None = None) -> None:
    """After TRL's `create_model_card`: add the ssToken section to the card it wrote into `args.output_dir`, and
    state the base model and the dataset from `names` (model_card.py) instead of TRL's hub links."""
    path = os.path.join(trainer.args.output_dir, "README.md")
    if trainer.is_world_process_zero() and os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            card = file.read()
        if names is not None:
            card = name_base_model_and_dataset(card, names)
        with open(path, "w", encoding="utf-8") as file:
            file.write(add_to_model_card(card, trainer.args))


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
    _write_model_card(trainer, output_dir)


def _write_model_card(trainer, output_dir: str) -> None:
    """TRL writes its card into `args.output_dir`; the saved artefact gets that card, with the ssToken section."""
    if not trainer.is_world_process_zero():
        return
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
    card = os.path.join(trainer.args.output_dir, "README.md")
    target = os.path.join(output_dir, "README.md")
    if os.path.isfile(card) and os.path.abspath(card) != os.path.abspath(target):
        shutil.copyfile(card, target)


def _with_selected_adapters(save_pretrained, adapters):
    def save_only(*args, **kwargs):
        kwargs.setdefault("selected_adapters", adapters)
        return save_pretrained(*args, **kwargs)

    return save_only
