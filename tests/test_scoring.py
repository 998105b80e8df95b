import math

import pytest
import torch

from trl_sstoken.selection.scoring import (
    combine_scores,
    minmax_per_row,
    num_to_keep,
    retrospective_excess_loss,
    select_random,
    select_tokens,
    top_k_per_row,
)


def reference_select(current, history, attention, mask, ratio, gamma):
    """A plain per-row loop of the definition (docs/method.md, "One training step"), for comparison with the vectorised code."""
    keep = torch.zeros_like(mask)
    for b in range(mask.size(0)):
        positions = [j for j in range(mask.size(1)) if mask[b, j]]
        if not positions:
            continue
        rel = [float(current[b, j] - history[b, j]) for j in positions]
        lo, hi = min(rel), max(rel)
        g = float(gamma[b]) if torch.is_tensor(gamma) else gamma
        scores = [
            g * (r - lo) / (hi - lo + 1e-8) + (1 - g) * float(attention[b, j])
            for r, j in zip(rel, positions, strict=True)
        ]
        k = math.ceil(round(ratio * len(positions), 6))
        order = sorted(range(len(positions)), key=lambda i: (-scores[i], positions[i]))
        for i in order[:k]:
            keep[b, positions[i]] = True
    return keep


def test_rel_sign_is_current_minus_history():
    current = torch.tensor([[-1.0, -3.0]])
    history = torch.tensor([[-2.0, -2.0]])
    assert retrospective_excess_loss(current, history).tolist() == [[1.0, -1.0]]
    # The token the current model has improved on is the one kept by REL alone
    keep = select_tokens(current, history, None, torch.ones(1, 2, dtype=torch.bool), ratio=0.5, gamma=1.0)
    assert keep.tolist() == [[True, False]]


def test_gamma_one_is_pure_rel_and_gamma_zero_is_pure_attention():
    generator = torch.Generator().manual_seed(0)
    current, history, attention = (torch.randn(3, 9, generator=generator) for _ in range(3))
    attention = attention.sigmoid()
    mask = torch.rand(3, 9, generator=generator) > 0.3
    k = num_to_keep(mask, 0.5)
    by_rel = select_tokens(current, history, attention, mask, ratio=0.5, gamma=1.0)
    assert torch.equal(by_rel, top_k_per_row(current - history, mask, k))
    by_attention = select_tokens(current, history, attention, mask, ratio=0.5, gamma=0.0)
    assert torch.equal(by_attention, top_k_per_row(attention, mask, k))
    # The unused signal may be left out entirely
    assert torch.equal(select_tokens(current, history, None, mask, 0.5, 1.0), by_rel)
    assert torch.equal(select_tokens(None, None, attention, mask, 0.5, 0.0), by_attention)


def test_missing_signal_with_nonzero_weight_is_an_error():
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="REL"):
        select_tokens(None, None, torch.rand(1, 3), mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="attention"):
        select_tokens(torch.rand(1, 3), torch.rand(1, 3), None, mask, 0.5, 0.5)


@pytest.mark.smoke
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (5, 33), (4, 128)])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 1.0])
def test_matches_a_plain_loop_reference(shape, ratio):
    generator = torch.Generator().manual_seed(shape[1])
    current, history = torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)
    attention = torch.rand(*shape, generator=generator)
    mask = torch.rand(*shape, generator=generator) > 0.4
    gamma = torch.rand(shape[0], generator=generator)
    expected = reference_select(current, history, attention, mask, ratio, gamma)
    assert torch.equal(select_tokens(current, history, attention, mask, ratio, gamma), expected)


def test_ratio_one_keeps_every_response_token():
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 20, generator=generator) > 0.5
    keep = select_tokens(torch.randn(4, 20), torch.randn(4, 20), torch.rand(4, 20), mask, 1.0, 0.5)
    assert torch.equal(keep, mask)


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [(5, 0.6, 3), (10, 0.6, 6), (7, 0.5, 4), (1, 0.1, 1), (3, 0.34, 2), (100, 0.6, 60), (0, 0.6, 0), (9, 1.0, 9)],
)
def test_keeps_ceil_of_ratio_times_n(n, ratio, expected):
    mask = torch.zeros(1, 12 if n < 12 else n, dtype=torch.bool)
    mask[0, :n] = True
    assert num_to_keep(mask, ratio).tolist() == [expected]
    keep = select_tokens(torch.randn(mask.shape), torch.randn(mask.shape), torch.rand(mask.shape), mask, ratio, 0.5)
    assert int(keep.sum()) == expected


def test_ties_go_to_the_earlier_position():
    mask = torch.ones(1, 5, dtype=torch.bool)
    keep = select_tokens(None, None, torch.full((1, 5), 0.3), mask, ratio=0.4, gamma=0.0)
    assert keep.tolist() == [[True, True, False, False, False]]


def test_constant_rel_row_normalises_to_zero_and_attention_decides():
    rel_current = torch.full((1, 4), -1.0)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert minmax_per_row(rel_current, mask).tolist() == [[0.0] * 4]
    attention = torch.tensor([[0.1, 0.9, 0.2, 0.3]])
    keep = select_tokens(rel_current, rel_current, attention, mask, ratio=0.25, gamma=0.5)
    assert keep.tolist() == [[False, True, False, False]]


def test_minmax_ignores_positions_off_the_mask():
    values = torch.tensor([[100.0, 1.0, 3.0, -50.0]])
    mask = torch.tensor([[False, True, True, False]])
    torch.testing.assert_close(minmax_per_row(values, mask), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_empty_rows_keep_nothing():
    mask = torch.tensor([[False, False, False], [True, True, False]])
    keep = select_tokens(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3), mask, 0.5, 0.5)
    assert keep[0].sum() == 0 and keep[1].sum() == 1


def test_padding_is_never_selected_even_with_the_highest_scores():
    mask = torch.tensor([[True, True, True, False, False]])
    current = torch.tensor([[0.0, 0.0, 0.0, 50.0, 50.0]])
    attention = torch.tensor([[0.1, 0.2, 0.3, 1.0, 1.0]])
    keep = select_tokens(current, torch.zeros_like(current), attention, mask, ratio=1.0, gamma=0.5)
    assert keep.tolist() == [[True, True, True, False, False]]


def test_non_finite_scores_still_keep_exactly_k():
    mask = torch.ones(1, 4, dtype=torch.bool)
    scores = torch.tensor([[float("nan"), 0.5, float("-inf"), 0.2]])
    keep = top_k_per_row(scores, mask, torch.tensor([3]))
    assert keep.tolist() == [[True, True, False, True]]


def test_per_row_gamma():
    current = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    attention = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    keep = select_tokens(current, torch.zeros_like(current), attention, mask, 0.5, torch.tensor([1.0, 0.0]))
    assert keep.tolist() == [[False, True], [True, False]]


@pytest.mark.smoke
def test_combined_score_formula():
    rel = torch.tensor([[0.0, 2.0, 4.0]])
    attention = torch.tensor([[0.5, 0.25, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    score = combine_scores(rel, attention, mask, 0.25)
    expected = [0.25 * r + 0.75 * a for r, a in zip([0.0, 0.5, 1.0], [0.5, 0.25, 0.0], strict=True)]
    torch.testing.assert_close(score, torch.tensor([expected]))


def test_random_selection_counts_and_reproducibility():
    mask = torch.rand(6, 40, generator=torch.Generator().manual_seed(0)) > 0.3
    first = select_random(mask, 0.6, torch.Generator().manual_seed(5))
    again = select_random(mask, 0.6, torch.Generator().manual_seed(5))
    other = select_random(mask, 0.6, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(first.sum(-1), num_to_keep(mask, 0.6))
    assert not (first & ~mask).any()
