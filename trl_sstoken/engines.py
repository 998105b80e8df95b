"""Which distributed engine holds the model, and what a history needs from it.

Accelerate can hand the trainer to DDP, FSDP1, FSDP2, DeepSpeed ZeRO-2 or ZeRO-3. They differ in what the model's
parameters are between steps, which decides whether a history works as on one process:

- DDP and ZeRO-2 keep whole parameters on every process: everything works as on one process. ZeRO-2 leaves the
  frozen history adapter out of its own checkpoint, so its resume reads the adapter from `history/` (saving/).
- FSDP2 (`fully_shard`) replaces every parameter by a sharded DTensor when the model is prepared, after the trainer
  paired the history adapter with the trained one: the pairing is renewed when training starts
  (`AdapterHistory.pair_parameters`), and the refresh then runs shard by shard on identically sharded adapters.
- FSDP1 flattens each wrapped block's parameters into one sharded buffer: the model must be called through its
  wrapper (the unwrapped model sees 1-D shards), and the two adapters' shards do not line up, so a lagged or EMA
  refresh cannot run shard by shard: refused, with FSDP2 as the alternative.
- ZeRO-3 partitions every parameter outside the forward: a refresh of partitioned placeholders does nothing, and
  its checkpoint leaves the frozen history adapter out; a lagged or EMA history is refused, and so is a cached
  history (the caching pass runs before the engine is set up, on parameters ZeRO-3 has not gathered).

FSDP2 with `SHARDED_STATE_DICT` resumes the trained adapter only (the history adapter is left out of the load), so a
lagged or EMA history is refused there; FSDP1 with `SHARDED_STATE_DICT` resumes a PEFT adapter wrong (plain
SFTTrainer too), so such a resume is refused (`check_resume`). The other refusals are raised when the trainer is
built, before any step runs (`check_history`).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Engine:
    """`name`: ddp, fsdp1, fsdp2, zero2, zero3 or none (one process, or data parallel without an engine)."""

    name: str
    sharded_state_dict: bool = False  # FSDP with fsdp_state_dict_type SHARDED_STATE_DICT

    @property
    def calls_through_wrapper(self) -> bool:
        """Forwards outside the training step (history, reference) must go through the wrapped model."""
        return self.name == "fsdp1"

    @property
    def label(self) -> str:
        return {"fsdp1": "FSDP1", "fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}.get(
            self.name, self.name
        )


def engine_of(trainer) -> Engine:
    """The engine accelerate will wrap `trainer`'s model in, known once `Trainer.__init__` built its accelerator."""
    state = trainer.accelerator.state
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        sharded = "SHARDED_STATE_DICT" in str(getattr(plugin, "state_dict_type", ""))
        return Engine("fsdp2" if version == 2 else "fsdp1", sharded_state_dict=sharded)
    if getattr(trainer, "is_deepspeed_enabled", False):
        stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", 0)
        return Engine(f"zero{stage}")
    return Engine("ddp" if trainer.accelerator.num_processes > 1 else "none")


def check_history(engine: Engine, args) -> None:
    """Refuses a history `engine` cannot keep correct, naming the engine and what to use instead."""
    cached = getattr(args, "history_cache_dir", None) is not None
    moving = args.history in ("lagged", "ema")
    if engine.name == "fsdp1" and moving:
        raise ValueError(
            f"history={args.history!r} under FSDP1 is not supported: FSDP1 flattens the trained and the history "
            "adapter into shards that do not line up, so the history could not follow the adapter. Use FSDP2 "
            "(fsdp_config={'fsdp_version': 2}, accelerate's fsdp_version: 2), or history='base'."
        )
    if engine.name == "fsdp2" and moving and engine.sharded_state_dict:
        raise ValueError(
            f"history={args.history!r} under FSDP2 with fsdp_state_dict_type SHARDED_STATE_DICT is not supported: a "
            "resume loads the trained adapter only from the sharded checkpoint, so the history would resume wrong. "
            "Use fsdp_state_dict_type FULL_STATE_DICT, or history='base'."
        )
    if engine.name == "zero3" and moving:
        raise ValueError(
            f"history={args.history!r} under DeepSpeed ZeRO-3 is not supported: ZeRO-3 partitions the history "
            "adapter outside the forward pass and leaves it out of its checkpoints, so the history would be wrong "
            "after a refresh or a resume. Use DeepSpeed ZeRO-2 or FSDP2 (fsdp_version: 2), or history='base'."
        )
    if engine.name == "zero3" and cached:
        raise ValueError(
            "history_cache_dir under DeepSpeed ZeRO-3 is not supported: the caching pass and the model fingerprint "
            "would read parameters that ZeRO-3 has partitioned. Unset history_cache_dir (history='base' computed on "
            "the fly selects the same tokens), or use DeepSpeed ZeRO-2 or FSDP2 (fsdp_version: 2)."
        )


def check_resume(engine: Engine, model) -> None:
    """Refuses a resume the engine itself restores wrong: with FSDP1 and SHARDED_STATE_DICT, a PEFT adapter resumes
    with other weights than it was saved with (plain SFTTrainer too, on the CPU: the loss after the resume is not
    the uninterrupted run's)."""
    if engine.name == "fsdp1" and engine.sharded_state_dict and hasattr(model, "peft_config"):
        raise ValueError(
            "Resuming a PEFT adapter under FSDP1 with fsdp_state_dict_type SHARDED_STATE_DICT is refused: "
            "accelerate's FSDP1 load restores the adapter wrong from a sharded checkpoint (plain SFTTrainer "
            "resumes another run than the uninterrupted one too). Use FSDP2 (fsdp_version: 2), or "
            "fsdp_state_dict_type FULL_STATE_DICT."
        )
