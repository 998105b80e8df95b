"""What a training step logs: the `sstoken/*` selection metrics, and the token metrics of TRL's own step.

Every metric is a sum over the processes (gathered once per micro-batch as one vector), divided on the host.
"""

import math

import torch

from .methods import Selection


METRIC_PREFIX = "sstoken/"
SELECTION_SUMS = (
    "kept",
    "responses",
    "rel_sum",
    "rel_squares",
    "rel_count",
    "attention_sum",
    "attention_count",
    "empty_sequences",
    "no_context_sequences",
)


def selection_sums(selection: Selection) -> torch.Tensor:
    """This process's sums for the selection metrics, (len(SELECTION_SUMS),) float64, in that order."""
    regions, rel, attention = selection.regions, selection.rel, selection.attention
    response = regions.response
    has_response = regions.num_response > 0
    nothing = torch.zeros(0, dtype=torch.double, device=response.device)
    rel_on = rel[response].double() if rel is not None else nothing
    attention_on = attention[response].double() if attention is not None else nothing
    return torch.stack(
        [
            selection.keep.sum().double(),
            response.sum().double(),
            rel_on.sum(),
            (rel_on**2).sum(),
            torch.tensor(rel_on.numel(), dtype=torch.double, device=response.device),
            attention_on.sum(),
            torch.tensor(attention_on.numel(), dtype=torch.double, device=response.device),
            (~has_response).sum().double(),
            (has_response & ~regions.has_context).sum().double(),
        ]
    )


def selection_metrics(totals: list[float], in_warmup: bool) -> dict[str, float]:
    """The `sstoken/*` metrics of one micro-batch from the sums of every process (`selection_sums`, gathered)."""
    sums = dict(zip(SELECTION_SUMS, totals, strict=True))
    kept, responses = sums["kept"], sums["responses"]
    metrics = {
        "selected_fraction": kept / responses if responses else 0.0,
        "warmup": float(in_warmup),
        "empty_sequences": sums["empty_sequences"],
        "no_context_sequences": sums["no_context_sequences"],
    }
    if sums["rel_count"]:
        mean = sums["rel_sum"] / sums["rel_count"]
        metrics["rel_mean"] = mean
        metrics["rel_std"] = math.sqrt(max(sums["rel_squares"] / sums["rel_count"] - mean**2, 0.0))
    if sums["attention_count"]:
        metrics["attention_mean"] = sums["attention_sum"] / sums["attention_count"]
    return {METRIC_PREFIX + name: value for name, value in metrics.items()}


def log_sft_token_metrics(trainer, outputs, inputs) -> None:
    """The metrics `SFTTrainer.compute_loss` logs in training, which `SSTokenTrainer.compute_loss` replaces.

    Copied from trl 1.16.0, `trl/trainer/sft_trainer.py`, `SFTTrainer.compute_loss` (the entropy, accuracy,
    `num_tokens` and `aux_loss` block after the loss): keep it in step with the TRL version this package pins.
    """
    mode = "train"
    # Entropy and token accuracy. Both are zero on ignored positions, including prompt-learning virtual tokens.
    num_valid = trainer.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
    entropy_sum = trainer.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
    num_correct = trainer.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
    trainer._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
    trainer._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)

    # When using padding-free, the attention_mask is not present in the inputs, instead we have cu_seq_lens_q,
    # cu_seq_lens_k, and max_length_k, max_length_q and position_ids.
    if "attention_mask" in inputs:
        num_tokens_in_batch = trainer.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
    elif "position_ids" in inputs:
        local_num_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        num_tokens_in_batch = trainer.accelerator.gather_for_metrics(local_num_tokens).sum().item()
    else:
        raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
    trainer._total_train_tokens += num_tokens_in_batch // trainer._tp_size
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]

    # Log auxiliary loss if enabled
    if trainer.aux_loss_enabled:
        aux_loss = outputs.aux_loss
        aux_loss = trainer.accelerator.gather_for_metrics(aux_loss).mean().item()
        trainer._metrics[mode]["aux_loss"].append(aux_loss)
