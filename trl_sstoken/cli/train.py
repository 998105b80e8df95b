"""`trl-sstoken train`: `trl sft` with `SSTokenTrainer`. `main` is what `examples/sft_sstoken.py` runs, as TRL's
`trl sft` runs `trl/scripts/sft.py`."""

import os

from ..bounded import bounded_repr
from .arguments import PROG


def main(script_args, training_args, model_args, dataset_args, loading_args):
    """`trl sft` with `SSTokenTrainer`: load, train, save the adapter (or model) and a model card. The output_dir is
    locked before anything is loaded, until the run has saved (and pushed) its results (`saving/output_lock.py`)."""
    from ..saving.output_lock import run_locked
    from ..saving.writable import check_writable_dir

    check_writable_dir(training_args.output_dir, "--output_dir")  # the trained model is saved there at the end
    with run_locked(training_args, owner=None):
        return _train(script_args, training_args, model_args, dataset_args, loading_args)


def _train(script_args, training_args, model_args, dataset_args, loading_args):
    from trl import get_quantization_config

    from ..loading import load_sft_datasets, load_tokenizer, pick_split
    from ..saving.checkpoints import resolve_resume
    from ..saving.resume import DATA_SETTINGS, checkpoint_settings
    from ..trainer import SSTokenTrainer

    _require_model(model_args)
    # --resume_from_checkpoint arrives as a string: "true"/"false" or a path, checked before anything is loaded
    # (the training set's identity and the files the trainer needs are checked again by train(), with the data)
    resume = resolve_resume(
        training_args.resume_from_checkpoint,
        training_args.output_dir,
        checkpoint_settings(training_args),
        pending=DATA_SETTINGS,
    )
    training_args.model_init_kwargs = {
        **_model_init_kwargs(model_args, training_args),
        **(training_args.model_init_kwargs or {}),
    }
    datasets = load_sft_datasets(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        script_args.dataset_streaming,
        mixture=dataset_args,
    )
    train_dataset = pick_split(datasets, script_args.dataset_train_split, "--dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = pick_split(datasets, script_args.dataset_test_split, "--dataset_test_split")
    tokenizer = load_tokenizer(
        loading_args.tokenizer_name_or_path or model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    trainer = SSTokenTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config_from(model_args),
    )
    print(f"{PROG} train: {describe_history(trainer)}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    dataset_name = (
        script_args.dataset_name if script_args.dataset_name and not os.path.exists(script_args.dataset_name) else None
    )
    # the card names a local dataset too (without a hub link)
    trainer.create_model_card(
        model_name=os.path.basename(os.path.normpath(training_args.output_dir)), dataset_name=script_args.dataset_name
    )
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    trainer.end()
    return trainer


def describe_history(trainer) -> str:
    """One line: which history model REL compares with, and what it costs (a model copy without --use_peft)."""
    args, history = trainer.args, trainer._history
    if history is None:
        return f"no history model (--selection_method {args.selection_method} does not use REL)."
    return history.describe(args)


def make_parser():
    """The `TrlParser` of `train`: `trl sft`'s dataclasses with `SSTokenConfig` for `SFTConfig`, and
    `LoadingArguments`; `main` takes what its `parse_args_and_config` returns."""
    from . import make_parser as command_parser

    return command_parser("train")


def peft_config_from(model_args):
    """TRL's `get_peft_config`, except that `--lora_target_modules all-linear` means PEFT's "all-linear" shorthand.

    On the command line the flag is a list (`["all-linear"]`), which PEFT would read as a module *named* all-linear
    and fail to find; only the plain string selects every linear layer.
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, list, tuple)) and {str(target).lower() for target in targets} == {"all-linear"}:
        config.target_modules = "all-linear"
    return config


def _model_init_kwargs(model_args, training_args) -> dict:
    return dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )


def _require_model(model_args):
    path = model_args.model_name_or_path
    if not path:
        raise ValueError(
            "--model_name_or_path is required: a hub id (e.g. Qwen/Qwen2.5-0.5B) or a local model folder."
        )
    from ..loading import looks_like_a_path

    if not os.path.exists(path) and looks_like_a_path(path):
        raise ValueError(
            f"--model_name_or_path {bounded_repr(path)} looks like a local path, but no such folder exists. Pass a "
            "folder written by save_pretrained, or a hub id such as Qwen/Qwen2.5-0.5B."
        )
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    ):
        raise ValueError(
            f"--model_name_or_path {bounded_repr(path)} holds a PEFT adapter, not a model. Pass the base model as "
            "--model_name_or_path and the adapter folder as --adapter_path (inspect)."
        )
