"""Which positions of a batch are response and which are context, per original sequence (docs/method.md, "One
training step", 1. Regions).

Token space is (B, T), one entry per input position; prediction space is (B, T - 1), one entry per predicted token,
aligned with TRL's shifted log-probs (column j scores token j + 1).

A batch row is not always one sequence: padding-free batches (`padding_free=True`, or packing with the "bfd"
strategies) concatenate every sequence of the batch into one row and mark where each starts by resetting
`position_ids` to 0. Selection is defined per original sequence (its top-k, its min-max, its context), so
`SequenceLayout` maps a batch to one row per sequence, (S, L), and back; `Regions` offers that mapping for
prediction-space values (`to_sequences`, `to_predictions`) and caches what is derived from the labels. Sequence rows
are token-indexed: column o is the token at offset o of the sequence, and a prediction-space value is placed at the
token it predicts, so column 0
of a sequence row never holds a prediction (the token before it belongs to another sequence, or to nothing).
"""

from dataclasses import dataclass
from functools import cached_property

import torch


IGNORE_INDEX = -100
TOKEN_EXAMPLE_KEY = "sstoken_token_example"  # (B, T): index of each token's example in the batch, -1 on padding


class SequenceLayout:
    """Maps the tokens of a (B, T) batch to (S, L): one row per sequence, left-aligned.

    Built from `sequence_ids` (B, T): the batch-wide index of each token's sequence, -1 on padding. Every sequence
    must be a contiguous run of one row, which holds for padded and for padding-free batches alike.
    """

    def __init__(self, sequence_ids: torch.Tensor):
        self.batch_shape = tuple(sequence_ids.shape)
        flat = sequence_ids.reshape(-1)
        self.flat_index = (flat >= 0).nonzero().squeeze(-1)  # (N,) token positions that belong to a sequence
        self.sequence_of = flat[self.flat_index]
        self.num_sequences = int(self.sequence_of.max()) + 1 if self.flat_index.numel() else 0
        lengths = torch.bincount(self.sequence_of, minlength=self.num_sequences)
        starts = torch.cumsum(lengths, 0) - lengths
        self.offset_of = torch.arange(self.flat_index.numel(), device=flat.device) - starts[self.sequence_of]
        self.lengths = lengths
        self.max_length = int(lengths.max()) if self.num_sequences else 0

    def tokens_to_sequences(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(B, T) -> (S, L), `fill` where a sequence is shorter than L."""
        out = values.new_full((self.num_sequences, self.max_length), fill)
        out[self.sequence_of, self.offset_of] = values.reshape(-1)[self.flat_index]
        return out

    def predictions_to_sequences(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(B, T-1) -> (S, L): each prediction at the token it predicts."""
        return self.tokens_to_sequences(torch.cat([values.new_full((values.size(0), 1), fill), values], dim=1), fill)

    def sequences_to_predictions(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(S, L) -> (B, T-1), the inverse of `predictions_to_sequences` (`fill` elsewhere)."""
        out = values.new_full(self.batch_shape, fill).reshape(-1)
        out[self.flat_index] = values[self.sequence_of, self.offset_of]
        return out.reshape(self.batch_shape)[:, 1:]


@dataclass(frozen=True)
class Regions:
    """The regions of one collated batch.

    Attributes:
        response: (B, T-1) bool. Column j is True where token j+1 is a response token (label is not -100).
        context: (B, T) bool. Positions that are not response and not padding. A response token's context is the
            context positions before it in the same sequence.
        valid: (B, T) bool. Positions that are not padding.
        sequence_ids: (B, T) long. Batch-wide index of each position's sequence, -1 on padding.
        layout: the `SequenceLayout` of `sequence_ids`.
    """

    response: torch.Tensor
    context: torch.Tensor
    valid: torch.Tensor
    sequence_ids: torch.Tensor
    layout: SequenceLayout

    # Derived fields, computed once per batch (a frozen dataclass still caches: cached_property writes __dict__)

    @cached_property
    def response_tokens(self) -> torch.Tensor:
        """(B, T) bool, the response tokens in token space (the queries whose attention score is needed)."""
        return torch.cat([torch.zeros_like(self.response[:, :1]), self.response], dim=1)

    @cached_property
    def sequence_response(self) -> torch.Tensor:
        """(S, L) bool, response tokens per sequence row."""
        return self.to_sequences(self.response, False)

    @cached_property
    def num_response(self) -> torch.Tensor:
        """(S,) number of response tokens per sequence."""
        return self.sequence_response.sum(dim=-1)

    @cached_property
    def has_context(self) -> torch.Tensor:
        """(S,) whether each sequence has a context position before its first response token.

        Only context that some response token can see counts: a sequence that starts with its response (plain
        language-modeling text, where every token is a label) has none, and its attention score is undefined.
        """
        response = self.sequence_response
        context = self.layout.tokens_to_sequences(self.context, False)
        positions = torch.arange(response.size(-1), device=response.device)
        first_response = torch.where(response.any(dim=-1), response.int().argmax(dim=-1), response.size(-1))
        return (context & (positions < first_response.unsqueeze(-1))).any(dim=-1)

    # The mapping between prediction space (B, T-1) and one row per sequence (S, L)

    def to_sequences(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(B, T-1) prediction-space values -> (S, L), each at the token it predicts, `fill` elsewhere."""
        return self.layout.predictions_to_sequences(values, fill)

    def to_predictions(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(S, L) -> (B, T-1), the inverse of `to_sequences` (`fill` elsewhere)."""
        return self.layout.sequences_to_predictions(values, fill)


def regions_from_batch(batch: dict) -> Regions:
    """Reads the regions off a collated batch: padded (`attention_mask`) or padding-free (`position_ids`)."""
    if "labels" not in batch:
        raise ValueError(
            "ssToken selection needs `labels` in every training batch (-100 on context positions); the batch has "
            f"only {sorted(batch)}. Use TRL's data collator or one that writes `labels`."
        )
    labels = batch["labels"]
    valid = _valid_positions(batch)
    is_label = labels != IGNORE_INDEX
    sequence_ids = _sequence_ids(valid, batch.get("position_ids"), batch.get(TOKEN_EXAMPLE_KEY))
    same_sequence = sequence_ids[:, 1:] == sequence_ids[:, :-1]
    return Regions(
        response=is_label[:, 1:] & valid[:, 1:] & same_sequence,
        context=~is_label & valid,
        valid=valid,
        sequence_ids=sequence_ids,
        layout=SequenceLayout(sequence_ids),
    )


def _valid_positions(batch: dict) -> torch.Tensor:
    if TOKEN_EXAMPLE_KEY in batch:
        return batch[TOKEN_EXAMPLE_KEY] >= 0
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    if "position_ids" in batch:
        return torch.ones_like(batch["labels"], dtype=torch.bool)
    raise ValueError(
        "ssToken selection needs to know which positions are padding: the batch has neither `attention_mask` nor "
        f"`position_ids` (keys: {sorted(batch)}). Use TRL's data collator or one that writes either."
    )


def _sequence_ids(valid, position_ids, token_example) -> torch.Tensor:
    """A new sequence starts at a row's first valid token, after padding, where the example changes, and where the
    position ids reset to 0 (padding-free batches and packed rows)."""
    starts = valid.clone()
    starts[:, 1:] &= ~valid[:, :-1]
    if position_ids is not None:
        starts |= valid & (position_ids.reshape(valid.shape) == 0)
    if token_example is not None:
        starts[:, 1:] |= valid[:, 1:] & (token_example[:, 1:] != token_example[:, :-1])
    sequence_ids = torch.cumsum(starts.reshape(-1).long(), 0).reshape(valid.shape) - 1
    return sequence_ids.masked_fill(~valid, -1)
