"""`trl-sstoken inspect`: score and select the tokens of a dataset with a model/adapter, without training."""

import os
import tempfile

from ..bounded import bounded_repr
from .arguments import _check_at_least
from .train import _model_init_kwargs, _require_model


def run_inspect(script_args, sstoken_args, model_args, dataset_args, loading_args, inspect_args):
    """Scores and selects the first `num_examples` examples with the given model/adapter; writes the HTML page."""
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    from ..loading import load_sft_datasets, load_tokenizer, pick_split
    from ..report.collect import collect_examples, report_settings, special_tokens_of, write_report
    from ..saving.writable import check_writable_dir
    from ..trainer import SSTokenTrainer

    _require_model(model_args)
    _check_at_least("--num_examples", inspect_args.num_examples, 1)
    _check_rel_has_adapter(sstoken_args.selection_method, inspect_args.adapter_path is not None, "--adapter_path")
    if inspect_args.adapter_path is not None and not os.path.isfile(
        os.path.join(inspect_args.adapter_path, "adapter_config.json")
    ):
        raise ValueError(
            f"--adapter_path {bounded_repr(inspect_args.adapter_path)} holds no adapter_config.json; pass the "
            "folder a PEFT adapter was saved to (the output_dir of `trl-sstoken train`, or one of its checkpoint-N "
            "folders)."
        )
    history_weights = _history_weights(sstoken_args, inspect_args.adapter_path)
    report_folder = os.path.dirname(os.path.abspath(inspect_args.report_path))
    check_writable_dir(report_folder, "--report_path's folder", "the report is written there after scoring")

    datasets = load_sft_datasets(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        script_args.dataset_streaming,
        mixture=dataset_args,
    )
    dataset = pick_split(datasets, script_args.dataset_train_split, "--dataset_train_split")
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        dataset = dataset.select(range(min(inspect_args.num_examples, len(dataset))))
    else:
        dataset = dataset.take(inspect_args.num_examples)
    tokenizer = load_tokenizer(
        loading_args.tokenizer_name_or_path or model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=sstoken_args.trust_remote_code,
    )
    init_kwargs = {**_model_init_kwargs(model_args, sstoken_args), **(sstoken_args.model_init_kwargs or {})}
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    model = create_model_from_path(model_args.model_name_or_path, **init_kwargs)
    if inspect_args.adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, inspect_args.adapter_path, is_trainable=True)

    with tempfile.TemporaryDirectory() as scratch:
        sstoken_args.output_dir = scratch  # inspect writes nothing but its report
        sstoken_args.model_init_kwargs = None
        trainer = SSTokenTrainer(model=model, args=sstoken_args, train_dataset=dataset, processing_class=tokenizer)
        if history_weights is not None:
            _load_history_adapter(trainer.model, history_weights)
        examples = collect_examples(trainer, inspect_args.num_examples, sstoken_args.per_device_train_batch_size)
        settings = report_settings(
            trainer,
            model=model_args.model_name_or_path,
            adapter=inspect_args.adapter_path or "(none)",
            dataset=script_args.dataset_name or "(datasets mixture)",
        )
        summary = write_report(inspect_args.report_path, examples, settings, special_tokens_of(tokenizer))
    print(_summary_text(summary))
    print(f"Report written to {inspect_args.report_path}")
    return summary


def _history_weights(sstoken_args, adapter_path):
    """The saved history adapter a lagged/ema inspection needs: `<adapter_path>/history/` of a checkpoint."""
    from ..history import HISTORY_ADAPTER, history_mode
    from ..selection.methods import METHODS

    if not METHODS[sstoken_args.selection_method].needs_history or history_mode(sstoken_args.history).fixed:
        return None
    folder = os.path.join(adapter_path, HISTORY_ADAPTER)
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(
            f"--history {sstoken_args.history} needs the history adapter saved with a checkpoint ({folder}/ with "
            "adapter_model.safetensors), and --adapter_path has none. Pass a checkpoint-N folder of a run that used "
            "this history, or use --history base (the adapter against its base weights)."
        )
    return weights


def _load_history_adapter(peft_model, weights_path):
    """Overwrites the trainer's freshly built history adapter with the weights a checkpoint saved."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..history import HISTORY_ADAPTER

    result = set_peft_model_state_dict(peft_model, load_file(weights_path), adapter_name=HISTORY_ADAPTER)
    missing = [key for key in result.missing_keys if f".{HISTORY_ADAPTER}." in key]
    if missing:
        raise ValueError(f"The saved history adapter {weights_path} does not match the model: missing {missing[:3]}.")
    for name, param in peft_model.named_parameters():
        if f".{HISTORY_ADAPTER}." in name:
            param.requires_grad_(False)


def _check_rel_has_adapter(method: str, has_adapter: bool, flag: str):
    """`inspect` of REL without an adapter would compare the model with itself: every REL would be 0."""
    from ..selection.methods import METHODS

    if METHODS[method].needs_history and not has_adapter:
        raise ValueError(
            f"--selection_method {method} needs a LoRA adapter, because REL compares the model with an earlier state "
            f"of its adapter: add {flag}, or choose --selection_method attention, random or full."
        )


def _summary_text(summary) -> str:
    lines = [
        f"{summary.examples} examples, {summary.response_tokens} response tokens, {summary.kept_tokens} kept "
        f"({summary.kept_fraction:.1%})."
    ]
    by_position = ", ".join(f"{kept / total:.0%}" if total else "-" for kept, total in summary.by_position)
    lines.append(f"Kept by tenth of the response (first to last): {by_position}")
    by_type = ", ".join(f"{name} {kept / total:.0%} of {total}" for name, (kept, total) in summary.by_type.items())
    lines.append(f"Kept by token type: {by_type}")
    return "\n".join(lines)
