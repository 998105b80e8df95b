"""The data path into the trainer: the collator that keeps each token's example id (`collator.py`), and the checks
of datasets and prepared batches before training (`inputs.py`). `quickstart.jsonl` is the bundled dataset of the
demo."""
