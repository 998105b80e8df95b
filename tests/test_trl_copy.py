"""The block copied from TRL's `SFTTrainer.compute_loss` (selection/metrics.py, `log_sft_token_metrics`) still is
TRL's: a TRL upgrade that changes the metrics it logs fails here, loudly, instead of drifting silently."""

import inspect

from trl import SFTTrainer

from trl_sstoken.selection.metrics import log_sft_token_metrics


START = "# Entropy and token accuracy"


def normalised(lines):
    """Code lines without indentation, blank lines, or the owner's name (`self` in TRL, `trainer` in the copy)."""
    return [line.strip().replace("self.", "trainer.") for line in lines if line.strip()]


def test_the_copied_metrics_block_matches_the_installed_trl():
    trl_source = inspect.getsource(SFTTrainer.compute_loss)
    trl_block = trl_source[trl_source.index(START) :].split("\n        if return_outputs:")[0].splitlines()
    # The copy runs only in training, so TRL's `if mode == "train":` guard is the one line it leaves out
    trl_lines = [line for line in normalised(trl_block) if line != 'if mode == "train":']
    ours = inspect.getsource(log_sft_token_metrics)
    our_lines = normalised(ours[ours.index(START) :].splitlines())
    assert our_lines == trl_lines, "TRL's SFTTrainer.compute_loss metrics changed: update selection/metrics.py"
