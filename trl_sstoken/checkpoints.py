"""Checkpoints that a crash can interrupt: a completion marker, and resuming from the last complete checkpoint.

`Trainer` writes `checkpoint-N/` in place, file after file; a process killed in the middle leaves a folder that
looks like a checkpoint but lacks its optimizer or trainer state. `SSTokenTrainer` writes a marker file after
everything else, and only a checkpoint with the marker is ever resumed from.
"""

import os
import re
import warnings


CHECKPOINT_MARKER = "sstoken_checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def mark_checkpoint_complete(checkpoint: str, global_step: int) -> None:
    with open(os.path.join(checkpoint, CHECKPOINT_MARKER), "w") as handle:
        handle.write(f'{{"global_step": {global_step}}}\n')


def is_checkpoint_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, CHECKPOINT_MARKER))


def last_complete_checkpoint(output_dir: str) -> str:
    """The highest-step `checkpoint-N` of `output_dir` that was completely written."""
    found = sorted(
        ((int(match.group(1)), name) for name in os.listdir(output_dir) if (match := _CHECKPOINT_NAME.match(name))),
        reverse=True,
    )
    for _, name in found:
        path = os.path.join(output_dir, name)
        if is_checkpoint_complete(path):
            return path
        warnings.warn(f"Skipping the incomplete checkpoint {path} (its writing was interrupted).", stacklevel=3)
    raise ValueError(f"No complete checkpoint found in output directory ({output_dir}).")
