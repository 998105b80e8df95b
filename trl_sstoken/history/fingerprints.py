"""Fingerprints of what a cached history was computed from: the base model, the prepared dataset, the tokenizer.

A history cache (`cache.py`) stores them in its metadata and refuses to be reused when any of them differs.
"""

import hashlib
import json

import numpy as np
import torch

from .cache import HistoryCacheError


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
        "backend": _backend_rules(backend) if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _backend_rules(backend) -> dict:
    """A fast tokenizer's serialised rules without `padding` and `truncation`: the backend keeps the settings of its
    last call there (a padded batch, a truncated one), which say nothing about how text becomes ids."""
    rules = json.loads(backend.to_str())
    rules.pop("padding", None)
    rules.pop("truncation", None)
    return rules


def dataset_fingerprint(dataset, columns=("input_ids", "labels", "seq_lengths")) -> str:
    """A fingerprint of the prepared training set's content: every row's input ids, labels and packed sequence
    lengths (or the other integer `columns` given, those it has), in order.

    Hashing the content rather than trusting `Dataset._fingerprint` keeps the key stable across runs even when
    `datasets` cannot hash a preparation function (it then draws a random fingerprint).
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "select_columns"):
        raise HistoryCacheError(
            "history_cache_dir needs a map-style datasets.Dataset (the cache is keyed by its rows); an "
            f"IterableDataset or {type(dataset).__name__} cannot be indexed. Unset history_cache_dir to compute the "
            "base history on the fly."
        )
    return f"{len(dataset)} rows, sha256 {_rows_digest(dataset, columns)}"


def dataset_sample_fingerprint(
    dataset, sample_rows: int = 1024, columns=("input_ids", "labels", "seq_lengths")
) -> str:
    """The prepared training set's identity for a resume check: its length and a SHA-256 over up to `sample_rows`
    evenly spaced rows (the first and the last included), in order.

    A resume continues at a position in the data, so another order or other content would train on other examples
    than the checkpoint's run. Hashing a sample keeps this cheap at any size; another
    order, length or content is caught unless it only moves or edits rows between the sampled ones (a training set
    of up to `sample_rows` rows is hashed whole). An iterable dataset has no rows to sample; it is described by type.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "select"):
        return f"{type(dataset).__name__} (not fingerprinted: it cannot be indexed)"
    total = len(dataset)
    count = min(total, sample_rows)
    rows = sorted({i * (total - 1) // (count - 1) for i in range(count)}) if count > 1 else list(range(total))
    return f"{total} rows, sha256 of {len(rows)} rows {_rows_digest(dataset.select(rows), columns)}"


def _rows_digest(dataset, columns) -> str:
    """SHA-256 over the integer `columns` (those the dataset has) of every row, in order."""
    digest = hashlib.sha256()
    columns = [c for c in columns if c in dataset.column_names]
    for batch in dataset.select_columns(columns).with_format("numpy").iter(batch_size=1024):
        for column in columns:
            for row in batch[column]:
                array = np.asarray(row, dtype=np.int64)
                digest.update(np.int64(array.size).tobytes())
                digest.update(array.tobytes())
    return digest.hexdigest()


def _strip_peft_prefix(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")
