"""A fixed `base` history, precomputed once: per-token history log-probs on disk, so training runs no history forward.

The base model's log-probs never change during training, so one no-grad pass over the prepared training set
computes them all. They are stored as safetensors (never pickle): a flat float32 tensor of every example's label
log-probs in prediction space (length L - 1 for an example of L tokens) plus int64 offsets, with metadata that
identifies what they were computed from: the prepared dataset's fingerprint, the model's weights and config, and the
tokenizer. A later run with the same three reuses the file; any difference is refused, naming the part that
differs, and a truncated or corrupt file is detected by its checksum instead of being read as garbage. Files are
written to a temporary name and renamed, so an interrupted pass never leaves a half-written cache behind.

During training, the collator hook (`trl_sstoken.collator`) carries each example's index through TRL's shuffling
and collation, and `CachedHistory.log_probs` gathers the stored values into the batch's padded layout.
"""

import hashlib
import json
import os
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..collator import EXAMPLE_IDS_KEY, TOKEN_EXAMPLE_KEY, pop_selection_fields

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


def model_fingerprint(model, skip_substrings=("lora_", "modules_to_save", "trainable_tokens")) -> str:
    """A SHA-256 over a model's config and every byte of its weights and persistent buffers (adapters excluded).

    Any changed weight, at any position, changes the fingerprint, so a cache computed from other weights is never
    taken for this model's. Quantized models are hashed as stored: a bitsandbytes 4-bit layer's packed bytes and its
    quantization state (absmax, code map) are all in `state_dict()`. Tied weights are hashed once. The cost is one
    read of the weights, which the caching pass does anyway (measured in docs/real-models.md).
    """
    digest = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    seen = set()
    for name, tensor in sorted(model.state_dict().items()):
        if any(part in name for part in skip_substrings) or not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{_strip_peft_prefix(name)}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        storage = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and storage in seen:  # a tied weight: its name is hashed, its bytes once
            continue
        seen.add(storage)
        _hash_tensor_bytes(digest, tensor)
    return digest.hexdigest()


def _hash_tensor_bytes(digest, tensor: torch.Tensor, chunk_bytes: int = 1 << 26) -> None:
    """Feeds a tensor's raw bytes to `digest`, in chunks of at most 64 MiB off the accelerator."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    flat = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    for start in range(0, flat.numel(), chunk_bytes):
        digest.update(flat[start : start + chunk_bytes].cpu().numpy().data)


def tokenizer_fingerprint(tokenizer) -> str:
    """A fingerprint of everything that decides how text becomes ids: vocabulary, rules, special tokens, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """A fingerprint of the prepared training set's content: every row's input ids, labels and packed sequence
    lengths, in order.

    Hashing the content rather than trusting `Dataset._fingerprint` keeps the key stable across runs even when
    `datasets` cannot hash a preparation function (it then draws a random fingerprint).
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "select_columns"):
        raise HistoryCacheError(
            "history_cache_dir needs a map-style datasets.Dataset (the cache is keyed by its rows); an "
            f"IterableDataset or {type(dataset).__name__} cannot be indexed. Unset history_cache_dir to compute the "
            "base history on the fly."
        )
    digest = hashlib.sha256()
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in dataset.column_names]
    for batch in dataset.select_columns(columns).with_format("numpy").iter(batch_size=1024):
        for column in columns:
            for row in batch[column]:
                array = np.asarray(row, dtype=np.int64)
                digest.update(np.int64(array.size).tobytes())
                digest.update(array.tobytes())
    return f"{len(dataset)} rows, sha256 {digest.hexdigest()}"


def _strip_peft_prefix(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def write_cache(path: str, identity: dict, per_example: list[torch.Tensor]) -> None:
    lengths = torch.tensor([0] + [len(v) for v in per_example], dtype=torch.int64)
    offsets = lengths.cumsum(0)
    values = torch.cat(per_example).float().contiguous() if per_example else torch.zeros(0)
    metadata = {"format": FORMAT, "identity": json.dumps(identity, sort_keys=True), "sha256": _checksum(values, offsets)}
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
        raise HistoryCacheError(f"The history cache {path} is corrupt: its checksum does not match. Delete it to recompute.")
    stored = json.loads(metadata["identity"])
    differing = [part for part in IDENTITY_PARTS if stored.get(part) != expected_identity.get(part)]
    if differing:
        details = "; ".join(f"{part}: cached {stored.get(part)!r}, now {expected_identity.get(part)!r}" for part in differing)
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
        fields = pop_selection_fields(batch)
        if fields[EXAMPLE_IDS_KEY].tolist() != list(range(start, start + len(rows))):
            raise RuntimeError("The caching pass must see the training set in index order.")
        log_probs = history.log_probs(model, batch).float().cpu()
        mask, owner = example_predictions(fields[TOKEN_EXAMPLE_KEY].cpu())
        lengths = torch.bincount(owner[mask], minlength=len(rows)).tolist()
        per_example.extend(torch.split(log_probs[mask], lengths))
    return per_example


class CachedHistory:
    """A `base` history read from the cache: `log_probs` gathers stored values, no forward pass."""

    parameter_bytes = 0

    def __init__(self, source, path: str, identity: dict):
        self.source = source  # computes the fixed history when the cache has to be built
        self.path = path
        self.identity = identity
        self.values = None
        self.offsets = None
        self.num_forwards = 0  # forwards run by the building pass only

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

    def log_probs(self, model, inputs, fields=None) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError("The history cache is not loaded; SSTokenTrainer.train() builds or loads it first.")
        fields = fields or {}
        if EXAMPLE_IDS_KEY not in fields or TOKEN_EXAMPLE_KEY not in fields:
            raise ValueError(
                "A cached history needs each example's index and position in the batch (`sstoken_example_ids`, "
                "`sstoken_token_example`), which the trainer's collator hook adds; this batch has none. Was the data "
                "collator replaced after the trainer was built?"
            )
        mask, owner = example_predictions(fields[TOKEN_EXAMPLE_KEY])
        ids = fields[EXAMPLE_IDS_KEY].cpu().long()
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

    def on_optimizer_step(self, global_step: int) -> None:
        """The base history never changes."""

    def save_checkpoint(self, directory: str) -> None:
        """The cache lives in history_cache_dir and is reused on resume."""

    def load_checkpoint(self, directory: str) -> None:
        """Nothing to load: the cache is found by its identity."""


class InitialWeightsHistory:
    """The model as it is before training, for building the cache of a full fine-tuning run's `base` history."""

    parameter_bytes = 0

    def log_probs(self, model, inputs, fields=None) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, fused_lm_head=True).log_probs
