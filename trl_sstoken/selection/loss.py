"""The training loss as pure functions: the kept-token NLL over the denominator the config names.

`selected` divides by the kept tokens of the whole gradient-accumulation window (and of every process), which is
known before the window's first forward because every method that allows it keeps a number of tokens that follows
from the labels alone (`SelectionMethod.kept_count`). The loss is then exactly invariant to how a batch is split
into micro-batches (docs/method.md, "Loss normalisation").
"""

from dataclasses import dataclass

import torch

from .regions import Regions


@dataclass
class WindowCounts:
    """Token and sequence counts of one gradient-accumulation window, summed over processes when averaging."""

    selected: torch.Tensor  # () kept tokens
    sequences: torch.Tensor  # () sequences with at least one response token
    responses: torch.Tensor  # () response tokens
    across_processes: bool


def window_sums(method, window_regions: list[Regions], device) -> torch.Tensor:
    """(3,) long: kept tokens, sequences with a response and response tokens of the micro-batches of a window."""
    counts = torch.zeros(3, dtype=torch.long, device=device)
    for regions in window_regions:
        num_response = regions.num_response
        kept = method.kept_count(regions)
        counts += torch.stack([kept, (num_response > 0).sum(), num_response.sum()]).to(device)
    return counts


def selected_loss(
    log_probs: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
    regions: Regions,
    normalization: str,
    window: WindowCounts,
) -> torch.Tensor:
    """Weighted NLL of the kept tokens over the denominator `normalization` names, ().

    `log_probs`, `weights` and `keep` are (B, T-1); `weights` is 0 off `keep` (the method's token weights).
    """
    kept_nll = -log_probs * weights  # (B, T-1)
    if normalization == "selected":
        return kept_nll.sum() / window.selected.clamp(min=1)
    if normalization == "all":
        return kept_nll.sum() / window.responses.clamp(min=1)
    # "sequence": the paper's Eq. 10, per original sequence even in packed rows
    kept_per_sequence = regions.to_sequences(kept_nll, 0.0).sum(dim=-1)
    count_per_sequence = regions.to_sequences(keep, False).sum(dim=-1)
    return (kept_per_sequence / count_per_sequence.clamp(min=1)).sum() / window.sequences.clamp(min=1)


def zero_loss_touching(params) -> torch.Tensor:
    """A zero loss that still touches every given parameter (with zero gradient), so that DDP's gradient all-reduce
    sees the same parameters on every process when one of them skips its micro-batch."""
    return sum((p.reshape(-1)[:1].nan_to_num(0.0, 0.0, 0.0) * 0.0).sum() for p in params)
