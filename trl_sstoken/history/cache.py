"""A fixed `base` history, precomputed once: per-token history log-probs on disk, so training runs no history forward.

The base model's log-probs never change during training, so one no-grad pass over the prepared training set
computes them all. They are stored as safetensors (never pickle): a flat float32 tensor of every example's label
log-probs in prediction space (length L - 1 for an example of L tokens) plus int64 offsets, with metadata that
identifies what they were computed from: the prepared dataset's fingerprint, the model's weights and config, and the
tokenizer. A later run with the same three reuses the file; any difference is refused, naming the part that
differs, and a truncated or corrupt file is detected by its checksum (over the payload and the metadata) instead
of being read as garbage. The destination is checked when the trainer is built, before the caching pass. Files are
written to a temporary name (mode 0666 minus the umask) and renamed, so an interrupted pass never leaves a
half-written cache behind.

During training, the collator hook (`trl_sstoken.collator`) carries each example's index through TRL's shuffling
and collation, and `CachedHistory.log_probs` gathers the stored values into the batch's padded layout.
"""

import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..collator import EXAMPLE_IDS_KEY, TOKEN_EXAMPLE_KEY, pop_selection_fields

CACHE_FILE = "history_logprobs.safetensors"
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


def check_cache_destination(path: str) -> None:
    """Refuses, before any caching pass, a cache path that cannot be used: its directory is a file, cannot be
    created, or (when the cache does not exist yet) cannot be written. An existing cache only needs to be readable,
    so a read-only shared cache directory works."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise HistoryCacheError(f"The history cache {path} exists but is not a readable file; remove it or fix its permissions.")
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise HistoryCacheError(
            f"history_cache_dir={directory!r} is a file, not a directory. Point history_cache_dir at a directory."
        )
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".history_logprobs.probe-{os.getpid()}")
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
    metadata = {"format": FORMAT, "identity": identity_text, "sha256": _checksum(values, offsets, FORMAT, identity_text)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".history_logprobs.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        save_file({"log_probs": values, "offsets": offsets}, temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~_umask())  # safetensors creates its files 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
        details = "; ".join(f"{part}: cached {stored.get(part)!r}, now {expected_identity.get(part)!r}" for part in differing)
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
    if not isinstance(identity_text, str) or metadata.get("sha256") != _checksum(values, offsets, FORMAT, identity_text):
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
    for text in (format_tag, identity_text, f"{values.dtype}{tuple(values.shape)}{offsets.dtype}{tuple(offsets.shape)}"):
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
        check_cache_destination(path)  # when the trainer is built, long before the caching pass
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
        check_cache_destination(self.path)  # again: the directory may have changed since the trainer was built
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
