"""Fingerprints of what a cached history was computed from: the base model, the prepared dataset, the tokenizer.

A history cache (`cache.py`) stores them in its metadata and refuses to be reused when any of them differs.
"""

import hashlib
import json

import numpy as np
import torch

from .cache import HistoryCacheError


def model_fingerprint(model, skip_substrings=("lora_", "modules_to_save", "trainable_tokens")) -> str:
    """A fingerprint of a model's config and weights (adapter weights excluded).

    Hashing every byte of an 8B model would take minutes, so each parameter contributes its name, shape, dtype and
    up to 1024 evenly spaced values. Two models that differ in any config field or in any sampled value differ here.
    """
    digest = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters()):
        if any(part in name for part in skip_substrings):
            continue
        flat = param.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 1024), device=flat.device).long()
        sample = flat[index].to(torch.float64).cpu()
        digest.update(f"{_strip_peft_prefix(name)}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


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
