"""Rho-1's reference adapter, trained by the trainer itself on a small clean set (`reference_dataset`).

Rho-1 needs a reference model trained on trusted data. With `reference_dataset` the trainer builds it before the main
run, by the recipe the quality benchmark used for its Rho-1 references (benchmarks/quality, "Data sizes and seeds"):
a LoRA adapter with the main run's LoRA configuration, trained with full SFT (every response token) at the main run's
learning rate, batch size, gradient accumulation, schedule, warm-up and max length, for `reference_max_steps`
optimizer steps (default 16, the benchmark's: 16 steps of batch 8 on 48 clean examples). That reference is the one
Rho-1 clearly helped with on both real models, which is why it is the default.

The adapter is trained on the trained model's own base weights (a second adapter next to the main one, so no second
copy of the model), saved to `output_dir/_rho1_reference/` with `reference.json`: a fingerprint of the prepared data,
the base model, the tokenizer and the recipe, and a checksum of the adapter's weights. A later run (a resume, a rerun)
reuses the folder only when every part matches; a stale or damaged one is refused with what differs, never silently
used. The random state is saved and restored around the reference's training, so the main run trains the same
whether its reference was trained now or reused.

The leading `_` keeps the folder (and its `.training` and `.partial` scratch) out of `push_to_hub`: both of Trainer's
push paths (the final `push_to_hub()` and the per-save push of `hub_strategy`) upload output_dir with
`ignore_patterns=["_*", "checkpoint-*"]`, as for the output_dir lock (`saving/output_lock.py`). The reference is a
working file of the run, trained from the user's clean data, not part of the model they publish.
"""

import copy
import dataclasses
import gc
import hashlib
import json
import os
import random
import shutil
import time

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from tqdm.auto import tqdm
from transformers import set_seed

from .fingerprints import dataset_fingerprint, model_fingerprint, tokenizer_fingerprint


REFERENCE_FOLDER = "_rho1_reference"  # "_": out of push_to_hub's uploads (Trainer ignores "_*")
IDENTITY_FILE = "reference.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_ADAPTER = "sstoken_reference_training"
RECIPE_VERSION = 1  # bump when the way the reference is trained changes
# What the fingerprint covers: the rows as trained on (ids and which tokens are trained on)
DATA_COLUMNS = ("input_ids", "labels", "completion_mask", "assistant_masks", "seq_lengths")
# SFTConfig / TrainingArguments fields of the main run that the reference's training copies (the recipe)
RECIPE_FIELDS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "max_length",
    "packing",
    "padding_free",
    "completion_only_loss",
    "assistant_only_loss",
    "dataset_text_field",
    "bf16",
    "fp16",
    "seed",
    "dataloader_drop_last",
)


class ReferenceTrainingError(ValueError):
    """A reference folder that cannot be used (stale, damaged) or a reference that cannot be trained here."""


def reference_folder(args) -> str:
    return os.path.join(args.output_dir, REFERENCE_FOLDER)


def load_reference_dataset(value, split: str) -> Dataset:
    """`reference_dataset` as a map-style Dataset: a Dataset as given, or loaded like `--dataset_name` is."""
    from ..loading import UsageError, load_sft_datasets, pick_split

    if isinstance(value, Dataset):
        return value
    if isinstance(value, IterableDataset):
        raise ReferenceTrainingError(
            "reference_dataset must be a map-style datasets.Dataset (its rows are fingerprinted); got an "
            "IterableDataset. Materialise it, e.g. Dataset.from_list(list(dataset))."
        )
    try:
        loaded = pick_split(load_sft_datasets(str(value), train_split=split), split, "reference_dataset_split")
    except UsageError as error:
        raise ReferenceTrainingError(str(error).replace("--dataset_name", "reference_dataset")) from None
    if len(loaded) == 0:
        raise ReferenceTrainingError(f"reference_dataset={str(value)[:200]!r} split {split!r} has 0 rows.")
    return loaded


def recipe(args, peft_config) -> dict:
    """Everything that decides how the reference is trained, as recorded in its fingerprint."""
    lora = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    lora = {k: v for k, v in lora.items() if k not in ("base_model_name_or_path", "revision", "runtime_config")}
    values = {
        "version": RECIPE_VERSION,
        "selection_method": "full",
        "max_steps": args.reference_max_steps,
        **{name: getattr(args, name, None) for name in RECIPE_FIELDS},
        "lora": lora,
    }
    return json.loads(json.dumps(values, sort_keys=True, default=_jsonable))  # as it reads back from reference.json


def _jsonable(value):
    """Sets (LoRA's target modules) sorted, so the fingerprint does not depend on hash order; anything else as text."""
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def training_config(args, output_dir: str):
    """The main run's config with the reference's overrides: full SFT, its steps, nothing saved or reported."""
    return dataclasses.replace(
        args,
        output_dir=output_dir,
        selection_method="full",
        reference_model=None,
        reference_adapter=None,
        reference_dataset=None,
        history_cache_dir=None,
        max_steps=args.reference_max_steps,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        push_to_hub=False,
        resume_from_checkpoint=None,
        model_init_kwargs=None,  # the model is already built
        logging_steps=max(1, args.reference_max_steps // 4),
    )


def prepare_reference(trainer) -> str:
    """The path of the reference adapter for `trainer`: reused from `output_dir/_rho1_reference/` when its
    fingerprint matches, trained there otherwise. Refuses a stale or damaged folder."""
    from ..trainer import SSTokenTrainer
    from . import is_peft_model

    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        raise ReferenceTrainingError(
            "reference_dataset trains Rho-1's reference as a LoRA adapter on the trained model's base, so the trained "
            "model must be a PEFT model: pass peft_config (--use_peft on the command line), or give the reference "
            "as a whole model with reference_model."
        )
    folder = reference_folder(args)
    peft_config = copy.deepcopy(model.peft_config[model.active_adapter])
    dataset = trainer._reference_dataset
    identity_parts = {
        "base_model": model_fingerprint(model.get_base_model()),
        "tokenizer": tokenizer_fingerprint(trainer.processing_class),
        "recipe": recipe(args, peft_config),
    }
    rng = _random_state()
    trained_adapter = model.active_adapter
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    set_seed(args.seed)  # the reference's LoRA initialisation, data order and dropout follow the run's seed
    model.add_adapter(TRAINING_ADAPTER, peft_config)
    inner = None
    try:
        model.set_adapter(TRAINING_ADAPTER)
        for name, param in model.named_parameters():  # only the reference's adapter learns
            param.requires_grad_(f".{TRAINING_ADAPTER}." in name)
        scratch = folder + ".training"
        inner = SSTokenTrainer(
            model=model,
            args=training_config(args, scratch),
            train_dataset=dataset,
            processing_class=trainer.processing_class,
        )
        identity = {
            **identity_parts,
            "data": dataset_fingerprint(inner.train_dataset, columns=DATA_COLUMNS),
        }
        if os.path.exists(folder):
            verify(folder, identity)
            _print(trainer, f"Rho-1 reference: reusing {folder} (data, base model, tokenizer and recipe match).")
            return folder
        if args.world_size > 1:
            raise ReferenceTrainingError(
                f"reference_dataset: the reference adapter is trained by one process; {folder} does not exist yet. "
                "Run the same command once on one process (or train it with reference_max_steps there), then launch "
                "the distributed run, which reuses it."
            )
        _print(
            trainer,
            f"Rho-1 reference: training a LoRA adapter on {len(inner.train_dataset)} reference examples "
            f"({args.reference_max_steps} steps, full SFT, the main run's recipe) -> {folder}",
        )
        start = time.time()
        output = inner.train()
        _save(model, folder, scratch, identity, output.training_loss, time.time() - start, len(inner.train_dataset))
        _print(
            trainer, f"Rho-1 reference: trained in {time.time() - start:.0f}s (mean loss {output.training_loss:.4f})."
        )
        return folder
    finally:
        del inner
        model.set_adapter(trained_adapter)
        model.delete_adapter(TRAINING_ADAPTER)
        for name, param in model.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])
        _restore_random_state(rng)
        gc.collect()


def verify(folder: str, identity: dict) -> None:
    """Refuses a reference folder that is damaged or was made from other data, base model, tokenizer or recipe."""
    path = os.path.join(folder, IDENTITY_FILE)
    try:
        with open(path) as file:
            stored = json.load(file)
        checksum = _file_sha256(os.path.join(folder, WEIGHTS_FILE))
    except (OSError, ValueError) as error:
        raise ReferenceTrainingError(
            f"The Rho-1 reference folder {folder} is incomplete or damaged ({error}). Delete it to retrain the "
            "reference."
        ) from None
    if stored.get("weights_sha256") != checksum:
        raise ReferenceTrainingError(
            f"The Rho-1 reference adapter in {folder} does not match its recorded checksum (changed or damaged). "
            "Delete the folder to retrain the reference."
        )
    differing = [part for part in ("data", "base_model", "tokenizer", "recipe") if stored.get(part) != identity[part]]
    if differing:
        details = "; ".join(
            f"{part}: stored {_short(stored.get(part))}, now {_short(identity[part])}" for part in differing
        )
        raise ReferenceTrainingError(
            f"The Rho-1 reference in {folder} was trained from a different {' and '.join(differing)} ({details}). "
            "It is not reused: delete the folder to retrain it, or use another output_dir."
        )


def _save(model, folder, scratch, identity, loss, seconds, examples) -> None:
    """Writes the adapter and its fingerprint to a scratch folder, then renames it into place."""
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, selected_adapters=[TRAINING_ADAPTER])
    saved = os.path.join(staging, TRAINING_ADAPTER)  # PEFT puts a non-default adapter in a subfolder
    if os.path.isdir(saved):
        for name in os.listdir(saved):
            os.replace(os.path.join(saved, name), os.path.join(staging, name))
        os.rmdir(saved)
    record = {
        **identity,
        "weights_sha256": _file_sha256(os.path.join(staging, WEIGHTS_FILE)),
        "train_loss_mean": loss,
        "train_seconds": seconds,
        "examples": examples,
    }
    with open(os.path.join(staging, IDENTITY_FILE), "w") as file:
        json.dump(record, file, indent=1, sort_keys=True)
    os.replace(staging, folder)
    shutil.rmtree(scratch, ignore_errors=True)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def _random_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_random_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainedReference:
    """The trainer's Rho-1 reference while it is built from `reference_dataset`: empty until `prepare_reference` has
    trained or reused the adapter (at the start of `train()`), then a `ReferenceAdapter` on the trained model."""

    def __init__(self):
        self.adapter = None

    @property
    def ready(self) -> bool:
        return self.adapter is not None

    @property
    def parameter_bytes(self) -> int:
        return self.adapter.parameter_bytes if self.ready else 0

    def log_probs(self, model, inputs: dict, example_index: dict | None = None) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError("The Rho-1 reference is not built; SSTokenTrainer.train() trains or loads it first.")
        return self.adapter.log_probs(model, inputs, example_index)

    def on_optimizer_step(self, global_step: int) -> None:
        """Fixed: the reference never changes."""


def build_trained_reference(trainer) -> None:
    """Trains or reuses the adapter of `trainer._reference` (a `TrainedReference`), then loads it."""
    from .reference import ReferenceAdapter

    reference = trainer._reference
    if not isinstance(reference, TrainedReference) or reference.ready:
        return
    path = prepare_reference(trainer)
    reference.adapter = ReferenceAdapter(path, trainer.accelerator.unwrap_model(trainer.model))


def _print(trainer, message: str) -> None:
    if trainer.is_world_process_zero():
        tqdm.write(message)  # next to the progress bars, like the cache pass
