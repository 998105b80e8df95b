"""The collator hook: carries each example's index through TRL's preparation, shuffling and collation.

Selection sometimes needs to know *which* example a batch row is (a cached history is looked up by it). Rather than
letting any part guess from batch contents, the trainer adds an `sstoken_example_id` column to the prepared training
set and wraps the data collator in `SelectionCollator`, which takes the ids off the examples before the wrapped
collator sees them and puts them in the batch as `sstoken_example_ids` (B,). The wrapped collator can be TRL's
`DataCollatorForLanguageModeling` or any user collator that turns a list of example dicts into a batch of tensors;
it never sees the extra field. The trainer removes the ids from the batch before the model's forward.
"""

import torch

EXAMPLE_ID_COLUMN = "sstoken_example_id"
EXAMPLE_IDS_KEY = "sstoken_example_ids"


class SelectionCollator:
    """Wraps a data collator so that batches carry `sstoken_example_ids` when examples have an id."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        if not examples or EXAMPLE_ID_COLUMN not in examples[0]:
            return self.collator(examples)
        ids = [example[EXAMPLE_ID_COLUMN] for example in examples]
        stripped = [{k: v for k, v in example.items() if k != EXAMPLE_ID_COLUMN} for example in examples]
        batch = self.collator(stripped)
        batch[EXAMPLE_IDS_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch

    def __getattr__(self, name):
        # Trainer and TRL read attributes of the collator (e.g. `tokenizer`, `padding_free`): answer for the wrapped one
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def add_example_ids(dataset):
    """The dataset with a column holding each row's index, the key of per-example state such as a history cache."""
    if EXAMPLE_ID_COLUMN in (dataset.column_names or []):
        return dataset
    return dataset.map(lambda _, index: {EXAMPLE_ID_COLUMN: index}, with_indices=True)
