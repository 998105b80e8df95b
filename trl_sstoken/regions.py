"""Which positions of a batch are response and which are context (METHOD.md, "Regions").

Token space is (B, T), one entry per input position; prediction space is (B, T - 1), one entry per predicted token,
aligned with TRL's shifted log-probs. The trainer reads regions off the collated batch once and hands them to the
attention capture (token space) and to scoring (prediction space).
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Regions:
    """The regions of one collated batch.

    Attributes:
        response: (B, T-1) bool. Column j is True where token j+1 is a response token (label is not -100).
        context: (B, T) bool. Positions that are not response and not padding: what a response token attends to
            when the attention score is measured.
        valid: (B, T) bool. Positions that are not padding.
    """

    response: torch.Tensor
    context: torch.Tensor
    valid: torch.Tensor

    @property
    def num_response(self) -> torch.Tensor:
        """(B,) number of response tokens per sequence."""
        return self.response.sum(dim=-1)

    @property
    def has_context(self) -> torch.Tensor:
        """(B,) whether each sequence has a context position before its first response token.

        Only context that some response token can see counts: a sequence that starts with its response (plain
        language-modeling text) has none, and its attention score is undefined.
        """
        first_response = torch.where(
            self.response.any(dim=-1), self.response.int().argmax(dim=-1) + 1, self.response.size(-1) + 1
        )
        positions = torch.arange(self.context.size(-1), device=self.context.device)
        return (self.context & (positions < first_response.unsqueeze(-1))).any(dim=-1)


def regions_from_batch(batch: dict) -> Regions:
    """Reads the regions off a padded batch from TRL's `DataCollatorForLanguageModeling`."""
    if "labels" not in batch:
        raise ValueError(
            "ssToken selection needs `labels` in every training batch (-100 on context positions); the batch has "
            f"only {sorted(batch)}. Use TRL's data collator or one that writes `labels`."
        )
    labels = batch["labels"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        raise ValueError(
            "ssToken selection needs `attention_mask` in every training batch; padding-free batches are not "
            "supported yet. Set padding_free=False and packing=False."
        )
    valid = attention_mask.bool()
    is_label = labels != IGNORE_INDEX
    return Regions(response=is_label[:, 1:] & valid[:, 1:], context=~is_label & valid, valid=valid)
