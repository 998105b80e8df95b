"""A fixed `base` history, precomputed once: per-token history log-probs on disk, so training runs no history forward.

The base model's log-probs never change during training, so one no-grad pass over the prepared training set
computes them all. They are stored as safetensors (never pickle): a flat float32 tensor of every example's label
log-probs in prediction space (length L - 1 for an example of L tokens) plus int64 offsets, with metadata that
identifies what they were computed from: the prepared dataset's fingerprint, the model's weights and config, and the
tokenizer (`fingerprints.py`). A later run with the same three reuses the file; any difference is refused, naming
the part that differs, and a truncated or corrupt file is detected by its checksum (over the payload and the
metadata) instead of being read as garbage. The destination is checked when the trainer is built, before the
caching pass. Files are written to a temporary name (mode 0666 minus the umask) and renamed, so an interrupted pass
never leaves a half-written cache behind; the temporary name says which process writes it (`saving/temporary_files.py`), and
every later load or build removes the ones whose writer is dead (a write killed before its rename leaves a file as
large as the cache).

During training, the collator hook (`trl_sstoken.data.collator`) carries each example's index through TRL's shuffling
and collation, and `CachedHistory.log_probs` gathers the stored values into the batch's padded layout.
"""

import hashlib
import json
import os
import re
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.collator import EXAMPLE_IDS_KEY, TOKEN_EXAMPLE_KEY, pop_example_index
from ..saving.temporary_files import remove_stale, temporary_name
from .base import History


CACHE_FILE = "history_logprobs.safetensors"
TEMPORARY_PREFIX = ".history_logprobs"  # temporary files: `.history_logprobs.{writer}.{random}.tmp`
# what earlier versions named them, without the host: such a file cannot be told dead or alive
_UNATTRIBUTED_TEMPORARY = re.compile(r"^\.history_logprobs\.(\d+\.[0-9a-f]{8}\.tmp|probe-\d+)$")
FORMAT = "trl_sstoken.history_cache/2"  # /2: the checksum covers the metadata too
IDENTITY_PARTS = ("dataset", "model", "tokenizer")


class HistoryCacheError(ValueError):
    """A history cache that cannot be used: stale, truncated or corrupt."""


def example_predictions(token_example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, owner), both (B, T-1): the prediction columns inside one example (L - 1 per example of L tokens), and
    which example of the batch each belongs to. Row-major order of the masked columns is example order, in padded
    and in padding-free batches alike."""
    owner = token_example[:, 1:]
    mask = (owner >= 0) & (owner == token_example[:, :-1])
    return mask, owner


def check_cache_destination(path: str) -> None:
    """Refuses, before any caching pass, a cache path that cannot be used: its directory is a file, cannot be
    created, or (when the cache does not exist yet) cannot be written. An existing cache only needs to be readable,
    so a read-only shared cache directory works."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise HistoryCacheError(
                f"The history cache {path} exists but is not a readable file; remove it or fix its permissions."
            )
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise HistoryCacheError(
            f"history_cache_dir={directory!r} is a file, not a directory. Point history_cache_dir at a directory."
        )
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, temporary_name(TEMPORARY_PREFIX))
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.remove(probe)
    except OSError as error:
        raise HistoryCacheError(
            f"history_cache_dir={directory!r} cannot be written ({error.strerror or error}); the cache would be lost "
            "after the caching pass. Point history_cache_dir at a writable directory, or unset it."
        ) from None


def write_cache(path: str, identity: dict, per_example: list[torch.Tensor]) -> None:
    """Writes the cache to a temporary file in its directory and renames it into place. The file gets the usual mode
    of a new file (0644 under umask 022: readable by a team sharing the directory)."""
    lengths = torch.tensor([0] + [len(v) for v in per_example], dtype=torch.int64)
    offsets = lengths.cumsum(0)
    values = torch.cat(per_example).float().contiguous() if per_example else torch.zeros(0)
    identity_text = json.dumps(identity, sort_keys=True)
    metadata = {
        "format": FORMAT,
        "identity": identity_text,
        "sha256": _checksum(values, offsets, FORMAT, identity_text),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, temporary_name(TEMPORARY_PREFIX))
    try:
        save_file({"log_probs": values, "offsets": offsets}, temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~_umask())  # safetensors creates its files 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_stale_temporary_files(path: str) -> None:
    """Removes the temporary files that dead writers left next to the cache `path` (never a live run's), and names in
    a warning those of an earlier trl_sstoken, whose names do not say which host wrote them."""
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale(directory, TEMPORARY_PREFIX)
    try:
        unattributed = sorted(name for name in os.listdir(directory) if _UNATTRIBUTED_TEMPORARY.match(name))
    except OSError:
        return
    if unattributed:
        shown = ", ".join(unattributed[:5]) + (f" and {len(unattributed) - 5} more" if len(unattributed) > 5 else "")
        warnings.warn(
            f"{directory} holds temporary files of an interrupted history cache write by an earlier trl_sstoken "
            f"({shown}); their names do not say which process wrote them, so they are kept. Delete them if no other "
            "run is writing a cache there.",
            stacklevel=3,
        )


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def read_cache(path: str, expected_identity: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs, offsets) from a cache file, after checking it is intact and matches `expected_identity`. Any
    damage, in the payload or in the metadata, is a `HistoryCacheError`."""
    try:
        values, offsets, stored = _read_intact(path)
    except HistoryCacheError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated headers and payloads
        raise HistoryCacheError(
            f"The history cache {path} is truncated or corrupt and cannot be read ({error}). Delete it to recompute."
        ) from error
    differing = [part for part in IDENTITY_PARTS if stored.get(part) != expected_identity.get(part)]
    if differing:
        details = "; ".join(
            f"{part}: cached {stored.get(part)!r}, now {expected_identity.get(part)!r}" for part in differing
        )
        raise HistoryCacheError(
            f"The history cache {path} was computed for a different {' and '.join(differing)} ({details}). Delete it "
            "to recompute, or point history_cache_dir at another directory."
        )
    return values, offsets


def _read_intact(path: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    corrupt = f"The history cache {path} is corrupt"
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if set(handle.keys()) != {"log_probs", "offsets"}:
            raise HistoryCacheError(f"{corrupt}: it holds tensors {sorted(handle.keys())}. Delete it to recompute.")
        values, offsets = handle.get_tensor("log_probs"), handle.get_tensor("offsets")
    if metadata.get("format") != FORMAT:
        raise HistoryCacheError(
            f"{path} is not a history cache of this trl_sstoken (format {metadata.get('format')!r}, expected "
            f"{FORMAT!r}). Delete it to recompute."
        )
    identity_text = metadata.get("identity")
    if not isinstance(identity_text, str) or metadata.get("sha256") != _checksum(
        values, offsets, FORMAT, identity_text
    ):
        raise HistoryCacheError(f"{corrupt}: its checksum does not match. Delete it to recompute.")
    # the checksum covers the identity text, so what follows only fails for a file this code did not write
    stored = json.loads(identity_text)
    if not isinstance(stored, dict):
        raise HistoryCacheError(f"{corrupt}: its identity is not a JSON object. Delete it to recompute.")
    if values.dtype != torch.float32 or offsets.dtype != torch.int64 or values.dim() != 1 or offsets.dim() != 1:
        raise HistoryCacheError(f"{corrupt}: unexpected tensor types. Delete it to recompute.")
    if offsets.numel() < 1 or int(offsets[-1]) != values.numel() or bool((offsets[1:] < offsets[:-1]).any()):
        raise HistoryCacheError(f"{corrupt}: its offsets do not describe its values.")
    return values, offsets, stored


def _checksum(values: torch.Tensor, offsets: torch.Tensor, format_tag: str, identity_text: str) -> str:
    """SHA-256 over everything the cache holds: format tag, identity, and both tensors with their dtypes and shapes."""
    digest = hashlib.sha256()
    for text in (
        format_tag,
        identity_text,
        f"{values.dtype}{tuple(values.shape)}{offsets.dtype}{tuple(offsets.shape)}",
    ):
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(offsets.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_log_probs(history, model, dataset, collate, batch_size: int, device) -> list[torch.Tensor]:
    """One no-grad pass of `history` over `dataset` in index order: each example's label log-probs, (L - 1,)."""
    per_example = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Caching history log-probs", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
        example_index = pop_example_index(batch)
        if example_index[EXAMPLE_IDS_KEY].tolist() != list(range(start, start + len(rows))):
            raise RuntimeError("The caching pass must see the training set in index order.")
        log_probs = history.log_probs(model, batch).float().cpu()
        mask, owner = example_predictions(example_index[TOKEN_EXAMPLE_KEY].cpu())
        lengths = torch.bincount(owner[mask], minlength=len(rows)).tolist()
        per_example.extend(torch.split(log_probs[mask], lengths))
    return per_example


class CachedHistory(History):
    """A `base` history read from the cache: `log_probs` gathers stored values, no forward pass. The cache lives in
    history_cache_dir, is found by its identity and reused on resume: nothing goes into checkpoints."""

    def __init__(self, source, path: str, identity: dict):
        check_cache_destination(path)  # when the trainer is built, long before the caching pass
        self.source = source  # computes the fixed history when the cache has to be built
        self.path = path
        self.identity = identity
        self.values = None
        self.offsets = None

    @property
    def ready(self) -> bool:
        return self.values is not None

    def prepare(self, trainer) -> None:
        """Loads the cache, or builds it in one no-grad pass over the trainer's training set (once)."""
        if self.ready:
            return
        from .base import eval_mode
        from .fingerprints import dataset_fingerprint, model_fingerprint, tokenizer_fingerprint

        model = trainer.accelerator.unwrap_model(trainer.model)
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.identity = {
            "dataset": dataset_fingerprint(trainer.train_dataset),
            "model": model_fingerprint(base_model),
            "tokenizer": tokenizer_fingerprint(trainer.processing_class),
        }
        batch_size = trainer.args.history_cache_batch_size or 2 * trainer.args.per_device_train_batch_size
        with eval_mode(model), trainer.accelerator.main_process_first():
            dataset = trainer._remove_unused_columns(trainer.train_dataset, description="history cache")
            self.load_or_build(model, dataset, trainer.data_collator, batch_size, trainer.accelerator.device)

    def describe(self, args) -> str:
        return (
            f"history: the base model's log-probs, cached in {args.history_cache_dir} (no history forward while "
            "training)."
        )

    def load_or_build(self, model, dataset, collate, batch_size: int, device) -> None:
        check_cache_destination(self.path)  # again: the directory may have changed since the trainer was built
        remove_stale_temporary_files(self.path)
        if os.path.exists(self.path):
            self.values, self.offsets = read_cache(self.path, self.identity)
            if self.offsets.numel() - 1 != len(dataset):
                raise HistoryCacheError(
                    f"The history cache {self.path} holds {self.offsets.numel() - 1} examples but the training set "
                    f"has {len(dataset)}. Delete it to recompute."
                )
            return
        per_example = compute_log_probs(self.source, model, dataset, collate, batch_size, device)
        write_cache(self.path, self.identity, per_example)
        self.values, self.offsets = read_cache(self.path, self.identity)

    def log_probs(self, model, inputs, example_index=None) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError("The history cache is not loaded; SSTokenTrainer.train() builds or loads it first.")
        example_index = example_index or {}
        if EXAMPLE_IDS_KEY not in example_index or TOKEN_EXAMPLE_KEY not in example_index:
            raise ValueError(
                "A cached history needs each example's index and position in the batch (`sstoken_example_ids`, "
                "`sstoken_token_example`), which the trainer's collator hook adds; this batch has none. Was the data "
                "collator replaced after the trainer was built?"
            )
        mask, owner = example_predictions(example_index[TOKEN_EXAMPLE_KEY])
        ids = example_index[EXAMPLE_IDS_KEY].cpu().long()
        starts, stops = self.offsets[ids], self.offsets[ids + 1]
        lengths = torch.bincount(owner[mask].cpu(), minlength=len(ids))
        if not torch.equal(lengths, stops - starts):
            bad = int((lengths != stops - starts).nonzero()[0, 0])
            raise HistoryCacheError(
                f"The history cache does not match this batch: example {int(ids[bad])} has "
                f"{int(stops[bad] - starts[bad])} cached log-probs but {int(lengths[bad])} predicted tokens in the "
                "batch. The training set changed after the cache was built; delete it to recompute."
            )
        example_offsets = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(example_offsets, lengths)
        gathered = self.values[torch.repeat_interleave(starts, lengths) + within]
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        out[mask] = gathered.to(mask.device)
        return out


class UntrainedModelHistory(History):
    """The trained model itself, as it is before its first update: the `base` history of a full fine-tuning run, valid
    only for the pass that builds its cache (no copy needed)."""
