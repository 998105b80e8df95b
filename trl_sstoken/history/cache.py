"""A fixed `base` history, precomputed once: per-token history log-probs on disk, so training runs no history forward.

The base model's log-probs never change during training, so one no-grad pass over the prepared training set
computes them all. They are stored as safetensors (never pickle): a flat float32 tensor of every example's label
log-probs in prediction space (length L - 1 for an example of L tokens) plus int64 offsets, with metadata that
identifies what they were computed from: the prepared dataset's fingerprint, the model's weights and config, and the
tokenizer (`fingerprints.py`). A later run with the same three reuses the file; any difference is refused, naming
the part that differs, and a truncated or corrupt file is detected by its checksum instead of being read as garbage.
Files are written to a temporary name and renamed, so an interrupted pass never leaves a half-written cache behind.

During training, the collator hook (`trl_sstoken.collator`) carries each example's index through TRL's shuffling
and collation, and `CachedHistory.log_probs` gathers the stored values into the batch's padded layout.
"""

import hashlib
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..collator import EXAMPLE_IDS_KEY, TOKEN_EXAMPLE_KEY, pop_example_index
from .base import History


CACHE_FILE = "history_logprobs.safetensors"
FORMAT = "trl_sstoken.history_cache/1"
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


def write_cache(path: str, identity: dict, per_example: list[torch.Tensor]) -> None:
    lengths = torch.tensor([0] + [len(v) for v in per_example], dtype=torch.int64)
    offsets = lengths.cumsum(0)
    values = torch.cat(per_example).float().contiguous() if per_example else torch.zeros(0)
    metadata = {
        "format": FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "sha256": _checksum(values, offsets),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".history_logprobs.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({"log_probs": values, "offsets": offsets}, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_cache(path: str, expected_identity: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs, offsets) from a cache file, after checking it is intact and matches `expected_identity`."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            values, offsets = handle.get_tensor("log_probs"), handle.get_tensor("offsets")
    except Exception as error:  # safetensors raises its own error types for truncated headers and payloads
        raise HistoryCacheError(
            f"The history cache {path} is truncated or corrupt and cannot be read ({error}). Delete it to recompute."
        ) from error
    if metadata.get("format") != FORMAT:
        raise HistoryCacheError(f"{path} is not a trl_sstoken history cache (format {metadata.get('format')!r}).")
    if metadata.get("sha256") != _checksum(values, offsets):
        raise HistoryCacheError(
            f"The history cache {path} is corrupt: its checksum does not match. Delete it to recompute."
        )
    stored = json.loads(metadata["identity"])
    differing = [part for part in IDENTITY_PARTS if stored.get(part) != expected_identity.get(part)]
    if differing:
        details = "; ".join(
            f"{part}: cached {stored.get(part)!r}, now {expected_identity.get(part)!r}" for part in differing
        )
        raise HistoryCacheError(
            f"The history cache {path} was computed for a different {' and '.join(differing)} ({details}). Delete it "
            "to recompute, or point history_cache_dir at another directory."
        )
    if offsets.numel() < 1 or int(offsets[-1]) != values.numel() or bool((offsets[1:] < offsets[:-1]).any()):
        raise HistoryCacheError(f"The history cache {path} is corrupt: its offsets do not describe its values.")
    return values, offsets


def _checksum(values: torch.Tensor, offsets: torch.Tensor) -> str:
    digest = hashlib.sha256(values.contiguous().numpy().tobytes())
    digest.update(offsets.contiguous().numpy().tobytes())
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
        self.source = source  # computes the fixed history when the cache has to be built
        self.path = path
        self.identity = identity
        self.values = None
        self.offsets = None

    @property
    def ready(self) -> bool:
        return self.values is not None

    def load_or_build(self, model, dataset, collate, batch_size: int, device) -> None:
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
