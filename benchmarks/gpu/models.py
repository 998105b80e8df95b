"""Random-weight models of real shapes for the GPU check: a checkpoint written once per shape, loaded in QLoRA NF4
(bf16 compute) or plain, on the device. Random weights are as good as trained ones for speed and memory."""

import copy
import hashlib
import json
import os
import shutil
import time

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from benchmarks.perf.harness import llama_config, synthetic_data
from trl_sstoken.tiny import build_tiny_tokenizer


def dtype_of(settings):
    return getattr(torch, settings["dtype"])


def data(vocab: int, seq_len: int, examples: int, seed: int = 0):
    """(rows, tokenizer): fixed-length prompt/completion rows of `seq_len` tokens over a `vocab`-token vocabulary."""
    rows, words = synthetic_data(vocab - 8, seq_len, examples, seed=seed)
    return rows, build_tiny_tokenizer([" ".join(words)])


def random_checkpoint(
    work: str,
    label: str,
    shape: dict,
    tokenizer,
    max_positions: int,
    device: str,
    dtype,
    seed: int = 0,
    wait_seconds: float = 600,
) -> str:
    """The folder of a saved random-weight Llama of `shape`, written once and reused by later stages.

    Written under a lock file into `<folder>.partial`, then renamed: a reader never sees half a checkpoint. If another
    process (the check's background `prepare`) holds the lock, this waits for it, up to `wait_seconds`; a lock whose
    process has died is taken over."""
    key = hashlib.sha256(json.dumps([shape, len(tokenizer), max_positions, str(dtype), seed], sort_keys=True).encode())
    directory = os.path.join(work, f"ckpt-{label}-{key.hexdigest()[:10]}")
    lock = directory + ".lock"
    deadline = time.time() + wait_seconds
    while not os.path.exists(os.path.join(directory, "config.json")):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _lock_alive(lock) or time.time() > deadline:
                _remove(lock)
            else:
                time.sleep(1.0)
            continue
        try:
            os.write(handle, str(os.getpid()).encode())
            os.close(handle)
            _write_checkpoint(directory, shape, tokenizer, max_positions, device, dtype, seed)
        finally:
            _remove(lock)
    return directory


def _write_checkpoint(directory, shape, tokenizer, max_positions, device, dtype, seed):
    config = llama_config(shape, tokenizer, max_positions=max_positions)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the GPU: seconds, not minutes, for 8B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    partial = directory + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    os.replace(partial, directory)


def _lock_alive(lock) -> bool:
    try:
        with open(lock) as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return True  # being written this instant
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def load_model(directory: str, quantization: str, dtype, device: str, attn_implementation: str = "sdpa"):
    """The checkpoint on `device`: quantization "nf4" (QLoRA: NF4, double quantisation, `dtype` compute) or "none"."""
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn_implementation,
        device_map={"": torch.cuda.current_device()} if device == "cuda" else "cpu",
    )
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}")
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)


def clone(model, directory, quantization, dtype, device, attn_implementation="sdpa"):
    """An independent copy of a loaded model: a device-side deepcopy (fast), or a reload if deepcopy fails."""
    try:
        return copy.deepcopy(model), "deepcopy"
    except Exception as error:  # noqa: BLE001 - e.g. a quantized parameter type that cannot be deep-copied
        return load_model(directory, quantization, dtype, device, attn_implementation), f"reload ({error})"[:300]


def is_quantized(model) -> bool:
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def memory_allocated(device) -> int | None:
    return torch.cuda.memory_allocated() if device == "cuda" else None


def free(device):
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
