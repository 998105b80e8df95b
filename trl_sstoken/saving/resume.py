"""What a resume must match: the settings a checkpoint's marker records and a resume compares, and the files every
checkpoint of a run holds.

A checkpoint continues one run. Resuming it with settings that change what is selected, which data is trained on and
in which order, or what the optimizer and scheduler states mean would continue another experiment from this one's
state, often silently (a new learning rate is ignored: the optimizer and scheduler states come from the checkpoint).
`checkpoint_settings(args)` are those settings, read off the configuration: every `SSTokenConfig` field whose
metadata says `"resume": "must_match"` (or `"must_match_whether_set"`: only whether it is set), the inherited fields
of `config.SFT_RESUME_MUST_MATCH`, and the examples per optimizer step (`total_train_batch_size`). Nothing here
keeps its own list of fields. `run_settings(trainer)` adds the training set's identity (`train_dataset`), known only
once the data is loaded.

`essential_files(trainer)` are the files every checkpoint of the run holds (weights, optimizer, scheduler, trainer
state, RNG states, the history's own state): a marker must record each, so a marker that leaves one out (written by
other code, or edited together with a deleted file) is refused instead of resuming without it.
"""

import json

from .. import config
from ..history import is_peft_model
from ..history.fingerprints import dataset_sample_fingerprint


TOTAL_BATCH = "total_train_batch_size"
TRAIN_DATASET = "train_dataset"
DATA_SETTINGS = (TRAIN_DATASET,)  # known once the data is loaded: the CLI checks the others before loading it

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def checkpoint_settings(args) -> dict:
    """The settings of a run that a resume must match, as recorded in (and compared with) a checkpoint's marker."""
    settings = {}
    for field in config.sstoken_fields():
        rule = config.resume_rule(field)
        if rule == config.RESUME_MUST_MATCH:
            settings[field.name] = getattr(args, field.name)
        elif rule == config.RESUME_WHETHER_SET:
            settings[f"{field.name} set"] = getattr(args, field.name) is not None
    for name in config.SFT_RESUME_MUST_MATCH:
        settings[name] = getattr(args, name)
    settings[TOTAL_BATCH] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return {name: stored_form(value) for name, value in settings.items()}


def run_settings(trainer) -> dict:
    """`checkpoint_settings` of the trainer's arguments plus the identity of its training set, computed once per
    dataset (`fingerprints.dataset_sample_fingerprint`: its length and a hash of up to 1024 evenly spaced rows)."""
    dataset = trainer.train_dataset
    cached = getattr(trainer, "_sstoken_dataset_identity", None)
    if cached is None or cached[0] is not dataset:
        cached = (dataset, dataset_sample_fingerprint(dataset))
        trainer._sstoken_dataset_identity = cached
    return {**checkpoint_settings(trainer.args), TRAIN_DATASET: cached[1]}


def essential_files(trainer) -> list[tuple[str, ...]]:
    """The files every checkpoint of this run holds, each as its alternatives (the marker must record one of them).

    Under DeepSpeed or FSDP the engine writes the weights, the optimizer and the scheduler in its own layout; only
    the trainer state, the RNG states and the history's state are required then.
    """
    files = [("trainer_state.json",)]
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        model = trainer.accelerator.unwrap_model(trainer.model)
        files += [ADAPTER_WEIGHTS if is_peft_model(model) else MODEL_WEIGHTS, ("optimizer.pt",), ("scheduler.pt",)]
    world_size = trainer.args.world_size
    files += [("rng_state.pth",)] if world_size <= 1 else [(f"rng_state_{rank}.pth",) for rank in range(world_size)]
    if trainer._history is not None:
        files += trainer._history.checkpoint_files()
    return files


def stored_form(value):
    """`value` as the marker's JSON gives it back (enums as their strings, tuples as lists, a `datasets.Dataset` as
    its description), so that a recorded and a current value compare equal exactly when they are the same."""
    return json.loads(json.dumps(value, default=str))
