"""Property tests (hypothesis) for the pure scoring functions of `trl_sstoken.selection.scoring`.

Every input is a batch of rows in prediction space, (B, T-1) in the module's terms, here (B, T). The properties are
those of the selection rule (docs/method.md, "One training step"), which must hold for any scores, not just the hand-built cases of
test_scoring.py:
- each row keeps exactly k = ceil(ratio * n) of its n response tokens (after the module's rounding of ratio * n to
  6 decimals), never more than n;
- what is kept at a smaller ratio is kept at a larger one;
- the selection depends on REL only through min-max, so it is invariant to adding a constant to REL and to scaling
  it by a positive factor;
- permuting positions permutes the selection (ties go to the earlier position, so tied rows are compared by score);
- nothing outside the response mask is kept, and what lies outside it has no influence;
- finite inputs give finite scores, in [0, 1] when the attention is in [0, 1];
- a per-row gamma tensor selects as per-row calls with a float gamma.

Where a property is exact in real arithmetic but float32 rounding can move a score by an ulp, two tests state it:
one on inputs where every operation is exact (values on a 1/64 grid), which must agree bit for bit, and one on
arbitrary floats, where the two selections may differ only between tokens whose scores lie within `NEAR_TIE` of the
row's k-th score (a rounding error can reorder a near tie, nothing more).
"""

import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trl_sstoken.selection.scoring import (
    combine_scores,
    minmax_per_row,
    num_to_keep,
    retrospective_excess_loss,
    select_random,
    select_tokens,
    top_k_per_row,
)


SETTINGS = settings(max_examples=200, deadline=None)
F32 = np.finfo(np.float32)
NEAR_TIE = 1e-3
MIN_REL_SPREAD = 0.5  # rows whose REL varies less are left out of the float-rounding comparisons (see there)


# ----- strategies -----


def floats32(min_value, max_value, **kwargs):
    return st.floats(min_value, max_value, width=32, allow_nan=False, allow_infinity=False, **kwargs)


def float_tensors(draw, shape, elements):
    return torch.from_numpy(draw(arrays(np.float32, shape, elements=elements)).copy())


def bool_tensors(draw, shape):
    return torch.from_numpy(draw(arrays(np.bool_, shape)).copy())


LOG_PROBS = floats32(-40.0, 0.0)
ATTENTION = floats32(0.0, 1.0)
RATIOS = st.floats(0.0, 1.0, exclude_min=True)  # any float in (0, 1], as SSTokenConfig allows
GAMMAS = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))


@st.composite
def decimal_ratios(draw):
    """A ratio a user would write: up to 6 decimals, in (0, 1], as an exact fraction."""
    decimals = draw(st.integers(1, 6))
    return Fraction(draw(st.integers(1, 10**decimals)), 10**decimals)


@st.composite
def batches(draw, log_probs=LOG_PROBS, attention=ATTENTION, max_rows=4, max_cols=24):
    """(current, history, attention, mask), all (B, T), log-probs <= 0 and attention in [0, 1]."""
    shape = (draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols)))
    return (
        float_tensors(draw, shape, log_probs),
        float_tensors(draw, shape, log_probs),
        float_tensors(draw, shape, attention),
        bool_tensors(draw, shape),
    )


@st.composite
def gamma_for(draw, rows):
    """A float gamma or a per-row (B,) tensor."""
    if draw(st.booleans()):
        return draw(GAMMAS)
    return torch.tensor(draw(st.lists(GAMMAS, min_size=rows, max_size=rows)), dtype=torch.float32)


GRID = 1 / 64
ON_GRID_LOG_PROBS = st.integers(-32 * 64, 0).map(lambda i: i * GRID)  # exact in float32, and so are their sums


def mask_with_counts(counts, width=None):
    width = max(max(counts), 1) if width is None else width
    return torch.arange(width)[None, :] < torch.tensor(counts)[:, None]


# ----- reference checks -----


def scores_of(current, history, attention, mask, gamma):
    return combine_scores(retrospective_excess_loss(current, history), attention, mask, gamma)


def assert_same_selection_up_to_near_ties(keep, other, scores, mask, rows=None):
    """`other` keeps what `keep` keeps, except for swaps among tokens within NEAR_TIE of the row's k-th score."""
    assert torch.equal(keep.sum(-1), other.sum(-1))
    for b in range(keep.size(0)) if rows is None else rows:
        differ = keep[b] ^ other[b]
        if not differ.any():
            continue
        kth_score = scores[b][keep[b]].min()
        assert (scores[b][differ] - kth_score).abs().max() <= NEAR_TIE, (b, scores[b], keep[b], other[b])


def rel_spread(current, history, mask):
    """(B,) max - min of REL over each row's mask (0 for rows with fewer than two response tokens)."""
    rel = current.double() - history.double()
    high = rel.masked_fill(~mask, -math.inf).amax(-1)
    low = rel.masked_fill(~mask, math.inf).amin(-1)
    return torch.where(mask.sum(-1) > 1, high - low, 0.0)


def rows_where_rel_is_informative(current, history, mask, gamma):
    """Rows whose selection can be compared across float rounding of REL.

    Min-max divides by the row's REL spread, so a spread near float32 resolution turns a one-ulp rounding
    difference into a full-scale change of the normalised REL; such rows carry no REL information to compare.
    Rows where gamma is 0 do not use REL at all and are always compared.
    """
    spread = rel_spread(current, history, mask)
    gamma = torch.as_tensor(gamma, dtype=torch.float32).expand(mask.size(0))
    rows = [b for b in range(mask.size(0)) if gamma[b] == 0 or spread[b] >= MIN_REL_SPREAD]
    event(f"rows compared: {len(rows)} of {mask.size(0)}")
    return rows


# ----- how many tokens are kept -----


@st.composite
def decimal_ratios_and_counts(draw):
    """A decimal ratio and row lengths, half of them multiples of the ratio's denominator, where ratio * n is a
    whole number and float error in ratio * n would add a token if it were not rounded away."""
    ratio = draw(decimal_ratios())
    whole = st.integers(0, 3000 // ratio.denominator).map(lambda q: q * ratio.denominator)
    return ratio, draw(st.lists(st.one_of(st.integers(0, 3000), whole), min_size=1, max_size=6))


@SETTINGS
@given(data=decimal_ratios_and_counts())
def test_keeps_exactly_ceil_ratio_times_n_for_decimal_ratios(data):
    """Float error never adds or drops a token: k is the exact ceil(ratio * n) for any ratio with <= 6 decimals."""
    ratio, counts = data
    k = num_to_keep(mask_with_counts(counts), float(ratio))
    assert k.tolist() == [math.ceil(ratio * n) for n in counts]


def test_keeps_exactly_ceil_ratio_times_n_for_every_two_decimal_ratio():
    """Exhaustively, the ratios users type most (0.01 to 1.00) for every length up to 512."""
    counts = list(range(513))
    mask = mask_with_counts(counts)
    for hundredths in range(1, 101):
        ratio = Fraction(hundredths, 100)
        assert num_to_keep(mask, float(ratio)).tolist() == [math.ceil(ratio * n) for n in counts], ratio


@SETTINGS
@given(counts=st.lists(st.integers(0, 3000), min_size=1, max_size=6), ratio=RATIOS)
def test_keeps_within_rounding_of_ratio_times_n_for_any_ratio(counts, ratio):
    """For any float ratio: 1 <= k <= n, and k is ceil(ratio * n) up to the 6-decimal rounding."""
    k = num_to_keep(mask_with_counts(counts), ratio).tolist()
    for n, kept in zip(counts, k, strict=True):
        exact = Fraction(ratio) * n  # the float ratio's exact value, times n
        if n == 0:
            assert kept == 0
            continue
        assert 1 <= kept <= n
        assert exact - Fraction(1, 10**6) <= kept < exact + 1 + Fraction(1, 10**9), (n, ratio, kept)


@SETTINGS
@given(data=batches(), ratio=RATIOS, gamma=GAMMAS, seed=st.integers(0, 2**32))
def test_every_selection_keeps_k_per_row_inside_the_mask(data, ratio, gamma, seed):
    current, history, attention, mask = data
    n, k = mask.sum(-1), num_to_keep(mask, ratio)
    assert (k <= n).all()
    for keep in (
        select_tokens(current, history, attention, mask, ratio, gamma),
        select_random(mask, ratio, torch.Generator().manual_seed(seed)),
    ):
        assert keep.dtype == torch.bool and keep.shape == mask.shape
        assert torch.equal(keep.sum(-1), k)
        assert not (keep & ~mask).any()


SPECIAL_SCORES = st.sampled_from([math.nan, math.inf, -math.inf, float(F32.max), float(F32.min), 0.0, 0.5])


@st.composite
def scores_masks_and_ks(draw):
    """Any scores (ties, NaN, +-inf, float32 extremes), any mask, any k >= 0, even k > n."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 16)))
    elements = st.one_of(SPECIAL_SCORES, st.sampled_from([0.25, 0.75]), floats32(-2.0, 2.0))
    scores = torch.from_numpy(draw(arrays(np.float32, shape, elements=elements)).copy())
    ks = torch.tensor(draw(st.lists(st.integers(0, shape[1] + 2), min_size=shape[0], max_size=shape[0])))
    return scores, bool_tensors(draw, shape), ks


@SETTINGS
@given(data=scores_masks_and_ks())
def test_top_k_keeps_the_best_scores_with_ties_to_the_earlier_position(data):
    """top_k_per_row against its docstring, on any scores: min(k, n) kept, none outside the mask; a kept token never
    ranks below an unkept one, where finite scores rank by value, ties go to the earlier position, and non-finite
    scores rank below every finite one but stay eligible."""
    scores, mask, k = data
    keep = top_k_per_row(scores, mask, k)
    assert torch.equal(keep.sum(-1), torch.minimum(k, mask.sum(-1)))
    assert not (keep & ~mask).any()

    def rank_key(value, position):  # larger is better
        finite = math.isfinite(value)
        return (finite, value if finite else 0.0, -position)

    for b in range(scores.size(0)):
        kept = [rank_key(float(scores[b, j]), j) for j in range(scores.size(1)) if keep[b, j]]
        dropped = [rank_key(float(scores[b, j]), j) for j in range(scores.size(1)) if mask[b, j] and not keep[b, j]]
        if kept and dropped:
            assert min(kept) > max(dropped), (scores[b].tolist(), mask[b].tolist(), keep[b].tolist())


# ----- monotonicity in the ratio -----


TIED_ATTENTION = st.sampled_from([0.0, 0.25, 0.5, 1.0])  # many ties, which a stable tie rule must keep nested


@SETTINGS
@given(
    data=st.one_of(batches(), batches(log_probs=st.sampled_from([-2.0, -1.0, 0.0]), attention=TIED_ATTENTION)),
    ratios=st.tuples(RATIOS, RATIOS),
    gamma=GAMMAS,
    seed=st.integers(0, 2**32),
)
def test_what_a_smaller_ratio_keeps_a_larger_ratio_keeps(data, ratios, gamma, seed):
    current, history, attention, mask = data
    small, large = sorted(ratios)
    assert (num_to_keep(mask, small) <= num_to_keep(mask, large)).all()
    keep_small = select_tokens(current, history, attention, mask, small, gamma)
    keep_large = select_tokens(current, history, attention, mask, large, gamma)
    assert not (keep_small & ~keep_large).any()
    random_small = select_random(mask, small, torch.Generator().manual_seed(seed))
    random_large = select_random(mask, large, torch.Generator().manual_seed(seed))
    assert not (random_small & ~random_large).any()


# ----- invariance to shifting and scaling REL -----


@st.composite
def on_grid_batches(draw):
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 24)))
    grid = lambda: torch.tensor(  # noqa: E731
        draw(st.lists(ON_GRID_LOG_PROBS, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    ).reshape(shape)
    attention = float_tensors(draw, shape, st.one_of(TIED_ATTENTION, ATTENTION))
    return grid(), grid(), attention, bool_tensors(draw, shape)


@SETTINGS
@given(
    data=on_grid_batches(),
    shift=st.integers(-32 * 64, 32 * 64).map(lambda i: i * GRID),
    which=st.sampled_from(["current", "history", "both"]),
    ratio=RATIOS,
    gamma=GAMMAS,
)
def test_adding_a_constant_to_rel_changes_nothing_exact_arithmetic(data, shift, which, ratio, gamma):
    """On a 1/64 grid every sum is exact, so shifting REL must give bit-identical scores and selection, ties and all.
    Shifting the current log-probs shifts REL by +c, the history's by -c, both by the same c leaves it unchanged."""
    current, history, attention, mask = data
    shifted_current = current + shift if which in ("current", "both") else current
    shifted_history = history + shift if which in ("history", "both") else history
    assert torch.equal(
        scores_of(shifted_current, shifted_history, attention, mask, gamma),
        scores_of(current, history, attention, mask, gamma),
    )
    assert torch.equal(
        select_tokens(shifted_current, shifted_history, attention, mask, ratio, gamma),
        select_tokens(current, history, attention, mask, ratio, gamma),
    )


@SETTINGS
@given(data=batches(), shift=floats32(-40.0, 40.0), ratio=RATIOS, gamma=GAMMAS)
def test_adding_a_constant_to_rel_changes_nothing_float_arithmetic(data, shift, ratio, gamma):
    current, history, attention, mask = data
    keep = select_tokens(current, history, attention, mask, ratio, gamma)
    shifted = select_tokens(current + shift, history, attention, mask, ratio, gamma)
    rows = rows_where_rel_is_informative(current, history, mask, gamma)
    assert_same_selection_up_to_near_ties(
        keep, shifted, scores_of(current, history, attention, mask, gamma), mask, rows
    )


@SETTINGS
@given(
    data=batches(),
    scale=st.one_of(st.sampled_from([0.25, 0.5, 2.0, 4.0]), st.floats(1 / 16, 16.0)),
    ratio=RATIOS,
    gamma=GAMMAS,
)
def test_scaling_rel_by_a_positive_factor_changes_nothing(data, scale, ratio, gamma):
    """Scaling both log-probs by s > 0 scales REL by s, which min-max removes (up to its epsilon of 1e-8)."""
    current, history, attention, mask = data
    keep = select_tokens(current, history, attention, mask, ratio, gamma)
    scaled = select_tokens(current * scale, history * scale, attention, mask, ratio, gamma)
    rows = rows_where_rel_is_informative(current, history, mask, gamma)
    assert_same_selection_up_to_near_ties(
        keep, scaled, scores_of(current, history, attention, mask, gamma), mask, rows
    )
    # min-max itself, on the values directly, where the epsilon is negligible against the row's spread
    rel = retrospective_excess_loss(current, history)
    normalised, normalised_scaled = minmax_per_row(rel, mask), minmax_per_row(rel * scale, mask)
    for b in torch.nonzero(rel_spread(current, history, mask) >= MIN_REL_SPREAD).flatten().tolist():
        torch.testing.assert_close(normalised_scaled[b], normalised[b], atol=1e-5, rtol=0)


# ----- equivariance under permuting positions -----


@SETTINGS
@given(data=st.one_of(batches(), batches(attention=TIED_ATTENTION)), ratio=RATIOS, gamma=GAMMAS, rnd=st.randoms())
def test_permuting_positions_permutes_the_selection(data, ratio, gamma, rnd):
    current, history, attention, mask = data
    perm = list(range(mask.size(1)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    scores = scores_of(current, history, attention, mask, gamma)
    # scores are computed elementwise from per-row min and max: a permutation carries them over bit for bit
    assert torch.equal(
        scores_of(current[:, perm], history[:, perm], attention[:, perm], mask[:, perm], gamma), scores[:, perm]
    )
    keep = select_tokens(current, history, attention, mask, ratio, gamma)
    keep_permuted = select_tokens(current[:, perm], history[:, perm], attention[:, perm], mask[:, perm], ratio, gamma)
    for b in range(mask.size(0)):
        row_scores = scores[b][mask[b]]
        if row_scores.unique().numel() == row_scores.numel():  # no ties: exactly the permuted selection
            assert torch.equal(keep_permuted[b], keep[b][perm])
        else:  # ties go to the earlier position, which the permutation moves: the same scores are kept
            kept = scores[b][keep[b]].sort().values
            kept_permuted = scores[b][perm][keep_permuted[b]].sort().values
            assert torch.equal(kept, kept_permuted)
            event("permutation: row with ties")


# ----- masks -----


GARBAGE = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 5.0])


@SETTINGS
@given(data=batches(), garbage=st.data(), ratio=RATIOS, gamma=GAMMAS)
def test_values_outside_the_mask_have_no_influence(data, garbage, ratio, gamma):
    """Padding and prompt positions may hold anything (NaN, inf): scores, min-max and selection ignore them."""
    current, history, attention, mask = data

    def spoil(values):
        noise = float_tensors(garbage.draw, tuple(values.shape), GARBAGE)
        return torch.where(mask, values, noise)

    spoiled = spoil(current), spoil(history), spoil(attention)
    rel, rel_spoiled = retrospective_excess_loss(current, history), retrospective_excess_loss(*spoiled[:2])
    assert torch.equal(minmax_per_row(rel_spoiled, mask), minmax_per_row(rel, mask))
    assert torch.equal(scores_of(*spoiled, mask, gamma), scores_of(current, history, attention, mask, gamma))
    assert torch.equal(
        select_tokens(*spoiled, mask, ratio, gamma), select_tokens(current, history, attention, mask, ratio, gamma)
    )
    assert not (minmax_per_row(rel_spoiled, mask)[~mask] != 0).any()


# ----- finite in, finite out -----


ANY_FINITE = floats32(float(F32.min), float(F32.max))
ANY_LOG_PROB = floats32(float(F32.min), 0.0)


@SETTINGS
@given(data=batches(log_probs=ANY_FINITE))
def test_minmax_of_finite_values_is_finite_and_in_unit_interval(data):
    values, _, _, mask = data
    normalised = minmax_per_row(values, mask)
    assert torch.isfinite(normalised).all(), (values, mask, normalised)
    assert ((normalised >= 0) & (normalised <= 1)).all()
    assert not normalised[~mask].any()


@SETTINGS
@given(data=batches(log_probs=st.one_of(LOG_PROBS, ANY_LOG_PROB)), gamma=st.data())
def test_scores_of_finite_log_probs_are_finite_and_in_unit_interval(data, gamma):
    """Any finite log-probs (<= 0, float32) and attention in [0, 1] give scores in [0, 1]."""
    current, history, attention, mask = data
    gamma = gamma.draw(gamma_for(mask.size(0)))
    rel = retrospective_excess_loss(current, history)
    assert torch.isfinite(rel).all()
    scores = combine_scores(rel, attention, mask, gamma)
    assert torch.isfinite(scores).all(), (current, history, attention, mask, gamma, scores)
    assert ((scores >= 0) & (scores <= 1)).all(), scores
    assert not scores[~mask].any()


# ----- per-row gamma -----


@SETTINGS
@given(data=batches(), gamma=st.data(), ratio=RATIOS)
def test_per_row_gamma_equals_one_call_per_row(data, gamma, ratio):
    current, history, attention, mask = data
    gammas = gamma.draw(st.lists(GAMMAS, min_size=mask.size(0), max_size=mask.size(0)))
    together = select_tokens(current, history, attention, mask, ratio, torch.tensor(gammas))
    together_scores = scores_of(current, history, attention, mask, torch.tensor(gammas))
    for b, g in enumerate(gammas):
        row = slice(b, b + 1)
        alone = select_tokens(current[row], history[row], attention[row], mask[row], ratio, g)
        assert torch.equal(together[row], alone)
        assert torch.equal(together_scores[row], scores_of(current[row], history[row], attention[row], mask[row], g))
        # the component a float gamma of 0 or 1 does not need may be left out
        if g == 1.0:
            assert torch.equal(select_tokens(current[row], history[row], None, mask[row], ratio, g), alone)
        if g == 0.0:
            assert torch.equal(select_tokens(None, None, attention[row], mask[row], ratio, g), alone)
