"""The base model: a small Llama-style model pretrained here, on raw task text and filler, never on chat text.

Pretraining teaches the skills (reverse, add, lookup, replace) in the raw surface form of `tasks.py` and the
boilerplate sentence of `noise.py`; SFT must then teach the chat format. The result is cached on disk under a hash of
its recipe (every number below, the vocabulary and the code version), so every run of the benchmark with the same
scale reuses it.
"""

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from trl_sstoken.tiny import build_tiny_model

from .data import build_tokenizer, pretraining_sentence, vocabulary_text


# Bump when the pretraining code changes in a way the recipe numbers do not capture.
RECIPE_VERSION = 1


def recipe(scale: dict) -> dict:
    """Everything that determines the base model's weights."""
    keys = (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "pretrain_steps", "pretrain_batch_size",
        "pretrain_block_size", "pretrain_lr", "pretrain_seed",
    )  # fmt: skip
    return {
        "recipe_version": RECIPE_VERSION,
        "architecture": "llama",
        **{key: scale[key] for key in keys},
        "vocabulary_sha256": hashlib.sha256(vocabulary_text().encode()).hexdigest(),
        "torch": torch.__version__.split("+")[0],
    }


def recipe_hash(scale: dict) -> str:
    return hashlib.sha256(json.dumps(recipe(scale), sort_keys=True).encode()).hexdigest()[:16]


def _block(rng: random.Random, vocab: dict, block_size: int) -> list[int]:
    """Whole sentences, concatenated, cut to `block_size` tokens."""
    ids: list[int] = []
    while len(ids) < block_size:
        ids += [vocab[word] for word in pretraining_sentence(rng).split()]
    return ids[:block_size]


def pretrain(scale: dict, device: str = "cpu", log=print) -> tuple[LlamaForCausalLM, dict]:
    """Trains the base model from scratch with AdamW, linear warm-up and cosine decay; returns (model, stats)."""
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    model = build_tiny_model(
        tokenizer,
        architecture="llama",
        hidden_size=scale["hidden_size"],
        num_layers=scale["num_layers"],
        num_heads=scale["num_heads"],
        num_kv_heads=scale["num_kv_heads"],
        max_positions=max(256, scale["pretrain_block_size"]),
        seed=scale["pretrain_seed"],
    ).to(device)
    steps, batch_size, block = scale["pretrain_steps"], scale["pretrain_batch_size"], scale["pretrain_block_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=scale["pretrain_lr"], weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    rng = random.Random(scale["pretrain_seed"])
    model.train()
    start, losses = time.time(), []
    for step in range(steps):
        batch = torch.tensor([_block(rng, vocab, block) for _ in range(batch_size)], device=device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            recent = losses[-max(1, steps // 10) :]
            log(
                f"  pretrain step {step + 1}/{steps}: loss {sum(recent) / len(recent):.3f} ({time.time() - start:.0f}s)"
            )
    model.eval()
    stats = {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.time() - start, "steps": steps}
    return model, stats


def load_or_pretrain(scale: dict, cache_dir: str | os.PathLike, device: str = "cpu", log=print):
    """(model, tokenizer, info): from `cache_dir/base-<hash>/` if it is there, else pretrained and saved there."""
    digest = recipe_hash(scale)
    path = Path(cache_dir) / f"base-{digest}"
    info_file = path / "recipe.json"
    if info_file.exists():
        log(f"base model: cached at {path}")
        info = json.loads(info_file.read_text())
        info["cached"] = True
    else:
        log(f"base model: pretraining (recipe {digest}), to be cached at {path}")
        model, stats = pretrain(scale, device=device, log=log)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
        info = {"recipe": recipe(scale), "recipe_hash": digest, "pretraining": stats}
        (tmp / "recipe.json").write_text(json.dumps(info, indent=2))
        if path.exists():  # another process finished first; theirs is identical
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(path)
        info["cached"] = False
    info["path"] = str(path)
    return load_cached(path, device), load_tokenizer(path), info


def load_cached(path, device: str = "cpu") -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    # Not AutoTokenizer: next to a model config it would pick a model-specific class (see LIBRARIES.md section 4)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    expected = build_tokenizer()
    if tokenizer.get_vocab() != expected.get_vocab():
        raise RuntimeError(f"cached tokenizer at {path} does not match the benchmark's vocabulary; delete the cache")
    tokenizer.chat_template = expected.chat_template
    return tokenizer
