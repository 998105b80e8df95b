"""Device and precision of a `trl-sstoken` command on a machine without a GPU."""

from .arguments import PROG


# What a CPU-only machine needs instead of TRL's defaults (bf16=True, which TrainingArguments refuses without a GPU
# unless use_cpu is set; pinned memory, which only a GPU uses). Each is chosen only if the user set none of its flags.
CPU_SETTINGS = {"use_cpu": ("use_cpu",), "bf16": ("bf16", "fp16"), "dataloader_pin_memory": ("dataloader_pin_memory",)}


def has_accelerator() -> bool:
    """A GPU (or another torch accelerator: XPU, MPS, ...) that Trainer would use."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX): bf16 autocast is then faster than float32, not an
    emulation that is slower."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def choose_device_defaults(parser, command: str, explicit: set[str]) -> dict:
    """On a machine without a GPU: use_cpu=True, bf16 only where the CPU has native bf16 (float32 otherwise), no
    pinned memory; each unless the user set it. Sets them as parser defaults (the YAML and the flags still override)
    and returns what was chosen ({} on a GPU machine, where TRL's defaults stand). The demo's tiny model keeps
    float32 (its own default) unless --model_name_or_path names a real model."""
    if has_accelerator():
        return {}
    values = {"use_cpu": True, "bf16": cpu_supports_bf16(), "dataloader_pin_memory": False}
    chosen = {name: values[name] for name, flags in CPU_SETTINGS.items() if not explicit.intersection(flags)}
    if command == "demo" and "model_name_or_path" not in explicit:
        chosen.pop("bf16", None)  # DEMO_DEFAULTS: the tiny model trains in float32 everywhere
    parser.set_defaults(**chosen)
    return chosen


def _device_note(command: str, args, chosen: dict) -> str:
    """The one line that says where and in which precision the command runs, when it chose either."""
    if args.bf16:
        precision = "bf16 mixed precision (this CPU has native bf16)" if "bf16" in chosen else "bf16 mixed precision"
    else:
        precision = "float32" + (" (this CPU has no native bf16)" if "bf16" in chosen else "")
    where = "on the CPU" if args.use_cpu else "on the default device"
    return f"{PROG} {command}: no GPU found: running {where} in {precision}; --use_cpu and --bf16 choose otherwise."
