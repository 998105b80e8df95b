"""The parts an `SSTokenTrainer` holds besides the model, built from its config and the model as the trainer holds it:
the history (REL), the Rho-1 reference, the attention capture, and the history cache's building pass."""

import os
import warnings

from .attention.capture import PACKING_IMPLEMENTATIONS, AttentionCapture, AttentionUnavailableError
from .config import SSTokenConfig
from .history import AdapterDisabledHistory, History, build_history, is_peft_model
from .history.cache import CACHE_FILE, CachedHistory, UntrainedModelHistory
from .history.reference import ReferenceAdapter, ReferenceModel
from .history.reference_training import TrainedReference, load_reference_dataset
from .selection.methods import METHODS


def check_prompt_learning(model, method) -> None:
    """PEFT prompt learning (prompt tuning, p-tuning, prefix tuning) puts virtual tokens or prefix keys in front of
    the sequence: there is no adapter on the layers to disable for a history, and the attention capture would see
    keys that belong to no region. Only methods that need neither can train with it."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if config is None or not config.is_prompt_learning:
        return
    if method.needs_history or method.needs_attention or method.needs_reference:
        usable = [
            name
            for name, cls in METHODS.items()
            if not (cls.needs_history or cls.needs_attention or cls.needs_reference)
        ]
        raise ValueError(
            f"selection_method={method.name!r} cannot be used with PEFT prompt learning ({config.peft_type.value}): "
            "its history and attention capture need an adapter on the model's layers (e.g. LoRA) and a sequence "
            f"without virtual tokens. With prompt learning use selection_method {' or '.join(map(repr, usable))}, "
            "or train a LoRA adapter."
        )


def make_history(model, args: SSTokenConfig, sharded: bool) -> History:
    """The history `args` asks for; `sharded`: FSDP or DeepSpeed, where a full model copy would not shard."""
    if args.history_cache_dir is None:
        if not is_peft_model(model) and sharded:
            raise ValueError(
                f"history={args.history!r} with full fine-tuning under FSDP or DeepSpeed would copy the whole, "
                "unsharded model on every process. Use history='base' with history_cache_dir (no copy at all) "
                "or train a LoRA adapter (peft_config), whose history shards with the model."
            )
        return build_history(
            model,
            args.history,
            args.history_update_steps,
            args.history_ema_alpha,
            device=args.history_device,
            max_copy_gb=args.history_copy_max_gb,
        )
    source = AdapterDisabledHistory(model) if is_peft_model(model) else UntrainedModelHistory()
    return CachedHistory(source, os.path.join(args.history_cache_dir, CACHE_FILE), identity=None)


def reference_dataset_of(args: SSTokenConfig, model, peft_config):
    """The loaded `reference_dataset` of a rho1 run (None without one), checked before the model is loaded: it
    trains a LoRA adapter, so the run needs one (`peft_config`, or a PEFT model)."""
    if args.reference_dataset is None or not METHODS[args.selection_method].needs_reference:
        return None
    if peft_config is None and not is_peft_model(model):
        raise ValueError(
            "reference_dataset trains Rho-1's reference as a LoRA adapter on the trained model's base, so the run "
            "needs a PEFT adapter: pass peft_config (--use_peft on the command line), or give the reference as a "
            "whole model with reference_model."
        )
    from .data.inputs import check_dataset

    dataset = load_reference_dataset(args.reference_dataset, args.reference_dataset_split)
    check_dataset(dataset, "reference_dataset")
    return dataset


def make_reference(model, unwrapped_model, args: SSTokenConfig, processing_class) -> History:
    """Rho-1's reference: a frozen adapter on the trained model's base, or a separate frozen model; with
    `reference_dataset`, an adapter trained at the start of `train()` (`history/reference_training.py`)."""
    if args.reference_dataset is not None:
        return TrainedReference()
    if args.reference_adapter is not None:
        return ReferenceAdapter(args.reference_adapter, model)
    return ReferenceModel(args.reference_model, unwrapped_model, processing_class, args.trust_remote_code)


def make_attention_capture(model, unwrapped_model, args: SSTokenConfig, padding_free: bool) -> AttentionCapture | None:
    """The capture of `attention_layer`; None where it is unavailable and `allow_rel_fallback` allows REL alone."""
    implementation = unwrapped_model.config._attn_implementation
    if padding_free and implementation not in PACKING_IMPLEMENTATIONS:
        raise ValueError(
            f"padding-free batches (padding_free=True or packing with a 'bfd' strategy) need an attention "
            f"implementation that keeps packed sequences apart; {implementation!r} does not. Use one of "
            f"{list(PACKING_IMPLEMENTATIONS)} (attn_implementation when loading the model)."
        )
    try:
        return AttentionCapture(model, args.attention_layer, args.attention_chunk_size, args.attention_score)
    except AttentionUnavailableError as error:
        if not METHODS[args.selection_method].needs_history or not args.allow_rel_fallback:  # nothing to fall back to
            raise
        warnings.warn(f"{error} Falling back to REL-only selection (allow_rel_fallback=True).", stacklevel=3)
        return None


def prepare_history_cache(trainer) -> None:
    """Whatever the trainer's history needs before its first use (a cached base history loads or builds its cache)."""
    if trainer._history is not None:
        trainer._history.prepare(trainer)


def warn_about_dropped_examples(args: SSTokenConfig, original, prepared) -> None:
    """TRL silently drops examples with no response token left (e.g. truncated away by max_length): say so."""
    if args.packing or not hasattr(original, "__len__") or not hasattr(prepared, "__len__"):
        return
    dropped = len(original) - len(prepared)
    if dropped > 0:
        warnings.warn(
            f"{dropped} of {len(original)} training examples have no response token left after preparation "
            f"(e.g. truncated away by max_length={args.max_length}) and were dropped; check max_length.",
            stacklevel=3,
        )
