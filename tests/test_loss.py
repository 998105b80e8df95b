"""The loss and window arithmetic (loss.py) on hand-computed cases."""

import pytest
import torch

from trl_sstoken.selection.loss import WindowCounts, selected_loss, window_sums
from trl_sstoken.selection.methods import METHODS
from trl_sstoken.selection.regions import regions_from_batch


def two_sequences():
    """One padding-free row holding two sequences: prompt, 2 response tokens | prompt, 3 response tokens."""
    labels = torch.tensor([[-100, 5, 5, -100, 5, 5, 5]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    return regions_from_batch({"labels": labels, "position_ids": position_ids})


def test_window_sums_follow_the_method():
    regions = two_sequences()

    class Args:
        selection_ratio = 0.5
        profit_threshold = 0.1

    # kept, sequences with a response, response tokens
    assert window_sums(METHODS["sstoken"](Args), [regions, regions], "cpu").tolist() == [2 * (1 + 2), 4, 10]
    assert window_sums(METHODS["rho1"](Args), [regions], "cpu").tolist() == [3, 2, 5]  # ceil(0.5 * 5) of the batch
    assert window_sums(METHODS["full"](Args), [regions], "cpu").tolist() == [5, 2, 5]


@pytest.mark.parametrize(
    ("normalization", "expected"),
    [
        ("selected", (1.0 + 2.0 + 3.0) / 6),  # kept NLL over the window's 6 kept tokens
        ("all", (1.0 + 2.0 + 3.0) / 10),  # over its 10 response tokens
        ("sequence", (1.0 / 1 + (2.0 + 3.0) / 2) / 4),  # mean per sequence, over the window's 4 sequences
    ],
)
def test_selected_loss_denominators(normalization, expected):
    regions = two_sequences()
    log_probs = -torch.tensor([[1.0, 9.0, 0.0, 2.0, 3.0, 9.0]])  # (1, T-1): column j predicts token j + 1
    keep = torch.tensor([[True, False, False, True, True, False]])
    window = WindowCounts(torch.tensor(6), torch.tensor(4), torch.tensor(10), across_processes=False)
    loss = selected_loss(log_probs, keep.float(), keep, regions, normalization, window)
    assert loss.item() == pytest.approx(expected)
