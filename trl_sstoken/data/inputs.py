"""What `SSTokenTrainer` is given, checked when it is built: errors that name the field or column and what to do.

Two calls from the trainer's constructor:
- `check_trainer_inputs`, before `SFTTrainer` prepares anything (tokenizing a large dataset takes minutes): the
  config again (an `SSTokenConfig` can be edited after it was built), a writable `output_dir` when checkpoints will
  be written there, `history_device`, `reference_model`, an empty training set, None values in the text columns,
  the reserved example-id column, and the model's weights when the model is given as an object;
- `check_prepared_inputs`, after it: a training set that preparation emptied (every example truncated away by
  `max_length`), and the weights of a model `SFTTrainer` loaded from a name.

A model with a NaN or infinite weight is refused here, at construction: otherwise every batch would be skipped as
non-finite and the run would "succeed" with loss 0.
"""

import os

import datasets
import torch

from ..bounded import bounded_repr, bounded_text
from ..saving.writable import check_writable_dir
from ..selection.methods import METHODS
from .collator import check_reserved_column


TEXT_COLUMNS = ("prompt", "completion", "text", "messages")


def check_trainer_inputs(args, model, train_dataset, eval_dataset=None) -> None:
    args.validate()
    if args.should_save and (args.save_strategy != "no" or args.push_to_hub):
        check_writable_dir(args.output_dir, "output_dir")  # Trainer creates it here too, but writes only later
    check_history_device(args.history_device)
    if METHODS[args.selection_method].needs_reference:  # the method's declared needs, not its name
        check_reference_model(args.reference_model)
    if train_dataset is not None:
        check_dataset(train_dataset, "train_dataset")
        check_reserved_column(train_dataset)
    if eval_dataset is not None:
        for name, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
            check_dataset(dataset, f"eval_dataset[{bounded_repr(name)}]" if name else "eval_dataset")
    if isinstance(model, torch.nn.Module):
        check_finite_weights(model)


def check_prepared_inputs(trainer, original_model, original_dataset) -> None:
    prepared = trainer.train_dataset
    if prepared is not None and hasattr(prepared, "__len__") and len(prepared) == 0:
        given = f"all {len(original_dataset)}" if hasattr(original_dataset, "__len__") else "every one"
        raise ValueError(
            f"{given} training examples were dropped while preparing the dataset: none has a response token left "
            f"(e.g. every response truncated away by max_length={trainer.args.max_length}, or empty completions). "
            "Raise max_length, or shorten the prompts."
        )
    if not isinstance(original_model, torch.nn.Module):
        check_finite_weights(trainer.model)


def check_history_device(value) -> None:
    """`history_device` must name a device this machine has."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"history_device={bounded_repr(value)} is not a device ({bounded_text(error, 300)}). Use e.g. 'cpu' or "
            "'cuda:1'."
        ) from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    count = (backend.device_count() if hasattr(backend, "device_count") else 1) if available else 0
    if not available or (device.index is not None and device.index >= count):
        raise ValueError(
            f"history_device={bounded_repr(value)}, but this machine has {count} {device.type} device(s)"
            f"{f' (indices 0 to {count - 1})' if count else ''}. Use 'cpu', another device, or None (the model's "
            "device)."
        )


def check_reference_model(value) -> None:
    """`reference_model` must be an existing local model folder, or a hub id that can be loaded."""
    if value is None or os.path.isdir(value):
        return
    if os.path.exists(value):
        raise ValueError(f"reference_model={bounded_repr(value)} is a file; it must be a model folder or a hub id.")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(
            f"reference_model={bounded_repr(value)} does not exist: there is no such local folder (and it is not a "
            "hub id). Check the path."
        ) from None
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(value, "config.json"), str):
        raise ValueError(
            f"reference_model={bounded_repr(value)} is neither a local folder nor in the hub cache, and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded. Check the path, or download the model first."
        )


def check_dataset(dataset, name: str) -> None:
    """Not empty, and no None in the columns TRL reads text from."""
    if hasattr(dataset, "__len__"):
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty (0 rows); there is nothing to train on. Check the dataset and split.")
    elif isinstance(dataset, datasets.IterableDataset) and next(iter(dataset), None) is None:
        raise ValueError(f"{name} is empty (it yields no rows); there is nothing to train on.")
    columns = [c for c in TEXT_COLUMNS if c in (getattr(dataset, "column_names", None) or [])]
    if not columns or not hasattr(dataset, "with_format") or not hasattr(dataset, "__len__"):
        return  # an IterableDataset is not read ahead of training
    start = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=65536):
        for column in columns:
            values = batch.column(column)
            if values.null_count:
                row = start + next(i for i, v in enumerate(values.is_null().to_pylist()) if v)
                raise ValueError(
                    f"{name} has None in its {column!r} column (first in row {row}). Every example needs a "
                    f"{column}: fill or drop those rows, e.g. dataset.filter(lambda row: row[{column!r}] is not None)."
                )
        start += batch.num_rows


@torch.no_grad()
def check_finite_weights(model) -> None:
    """Refuses a model with a NaN or infinite floating-point weight: one pass over the parameters, no forward."""
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.numel() == 0 or param.device.type == "meta":
            continue
        if not bool(torch.isfinite(param).all()):
            count = int((~torch.isfinite(param)).sum())
            raise ValueError(
                f"The model's weight {name} holds {count} non-finite value(s) (NaN or inf): every training batch "
                "would be skipped and nothing would be trained. Load an intact checkpoint of the model."
            )
