"""The collator hook: carries what selection needs through TRL's preparation, shuffling and collation.

Selection must know, for every batch, where each original example sits (a padding-free batch concatenates them into
one row) and which example of the training set it is (a cached history is looked up by it). Rather than letting any
part guess from batch contents, the trainer adds an `sstoken_example_id` column to the prepared training set and
wraps the data collator in `SelectionCollator`. It takes the ids off the examples before the wrapped collator sees
them, lets that collator build the batch, and adds:
- `sstoken_example_ids` (E,): each example's index in the training set, when the examples carry one;
- `sstoken_token_example` (B, T): for each position, which of the batch's E examples it belongs to, -1 on padding.
The wrapped collator can be TRL's `DataCollatorForLanguageModeling` or any collator that turns a list of example
dicts with `input_ids` into either one padded row per example or one concatenated row (padding-free); it never sees
the extra field. Together they are the batch's *example index*; the trainer takes both keys out of the batch before
the model's forward (`pop_example_index`) and hands them to the history, which a cached history reads.
"""

import torch

from ..selection.regions import TOKEN_EXAMPLE_KEY


EXAMPLE_ID_COLUMN = "sstoken_example_id"
EXAMPLE_IDS_KEY = "sstoken_example_ids"
EXAMPLE_INDEX_KEYS = (EXAMPLE_IDS_KEY, TOKEN_EXAMPLE_KEY)


class SelectionCollator:
    """Wraps a data collator so that its batches carry `sstoken_example_ids` and `sstoken_token_example`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        has_ids = bool(examples) and EXAMPLE_ID_COLUMN in examples[0]
        stripped = [{k: v for k, v in e.items() if k != EXAMPLE_ID_COLUMN} for e in examples] if has_ids else examples
        batch = self.collator(stripped)
        if has_ids:
            batch[EXAMPLE_IDS_KEY] = torch.tensor([e[EXAMPLE_ID_COLUMN] for e in examples], dtype=torch.long)
        if examples and "input_ids" in examples[0] and "input_ids" in batch:
            batch[TOKEN_EXAMPLE_KEY] = token_example_map(batch, [len(e["input_ids"]) for e in examples])
        return batch

    def __getattr__(self, name):
        # Trainer and TRL read attributes of the collator (e.g. `padding_free`, `pad_token_id`): answer for the
        # wrapped one
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def token_example_map(batch: dict, lengths: list[int]) -> torch.Tensor:
    """(B, T): which example each position belongs to, -1 on padding, for padded or concatenated batches."""
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    if rows == len(lengths):  # one example per row, padded on either side
        if "attention_mask" in batch:
            valid = batch["attention_mask"].bool().cpu()
        else:
            valid = torch.arange(width) < lengths_t[:, None]
        if not torch.equal(valid.sum(dim=-1), lengths_t):
            raise ValueError("The collator's padding does not match the examples' lengths; cannot locate examples.")
        owner = torch.where(valid, torch.arange(rows)[:, None], -1)
    elif rows == 1 and int(lengths_t.sum()) <= width:  # padding-free: every example in one row, in order
        owner = torch.full((1, width), -1, dtype=torch.long)
        owner[0, : int(lengths_t.sum())] = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
    else:
        raise ValueError(
            f"Cannot tell where each of the {len(lengths)} examples sits in a batch of shape {tuple(input_ids.shape)}; "
            "SelectionCollator supports one padded row per example or one concatenated (padding-free) row."
        )
    return owner.to(input_ids.device)


def pop_example_index(inputs: dict) -> dict:
    """Takes the example index (`sstoken_example_ids`, `sstoken_token_example`) out of a batch, which the model must
    not see, and returns it."""
    return {key: inputs.pop(key) for key in EXAMPLE_INDEX_KEYS if key in inputs}


def check_reserved_column(dataset) -> None:
    """The training set must not already have the column `add_example_ids` writes. Checked when the trainer is
    built (data/inputs.py, before tokenizing) and again here, on the prepared set."""
    if EXAMPLE_ID_COLUMN in (getattr(dataset, "column_names", None) or []):
        raise ValueError(
            f"The training set has a column named {EXAMPLE_ID_COLUMN!r}, a name SSTokenTrainer reserves for the index "
            "it gives every example (a history cache is keyed by it). Rename or remove that column."
        )


def add_example_ids(dataset):
    """The dataset with a column holding each row's index, the key of per-example state such as a history cache."""
    check_reserved_column(dataset)
    return dataset.map(lambda _, index: {EXAMPLE_ID_COLUMN: index}, with_indices=True)
