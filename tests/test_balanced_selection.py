"""The position-balanced top-k (`selection_positions="balanced"`, docs/method.md "Position-balanced selection").

Properties (hypothesis) of the pure functions in `trl_sstoken.selection.scoring`, checked against a hand-written
reference of the rule on any scores and masks (gaps between response segments, short rows, k > n): the same k per
row as `top_k_per_row`; every bucket's quota within one token of proportional and never above its size; one bucket is
`top_k_per_row` exactly; within a bucket the kept tokens are its best. Then the config field and its refusals, the
methods (rho1 pooled per batch), and a trainer run whose kept fraction is flat along the response.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import lora_config, randomize_adapter, record_selections
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_sstoken import SSTokenConfig
from trl_sstoken.data.collator import SelectionCollator
from trl_sstoken.selection.methods import METHODS, Signals
from trl_sstoken.selection.regions import regions_from_batch
from trl_sstoken.selection.scoring import (
    balanced_top_k_per_batch,
    balanced_top_k_per_row,
    bucket_quotas,
    bucket_sizes,
    num_to_keep,
    position_buckets,
    top_k_per_batch,
    top_k_per_row,
)


SETTINGS = settings(max_examples=200, deadline=None)
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.25, 0.75])


@st.composite
def rows(draw, max_length=40):
    """Any scores (ties, non-finite), any mask (gaps: multi-turn segments; short and empty rows), any k >= 0,
    and a bucket count from 1 to beyond the row length."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, max_length)))
    elements = st.one_of(SPECIAL, st.floats(-2.0, 2.0, width=32))
    scores = torch.from_numpy(draw(arrays(np.float32, shape, elements=elements)).copy())
    mask = torch.from_numpy(draw(arrays(np.bool_, shape)).copy())
    k = torch.tensor(draw(st.lists(st.integers(0, shape[1] + 2), min_size=shape[0], max_size=shape[0])))
    return scores, mask, k, draw(st.integers(1, 2 * max_length))


def reference_buckets(row_mask, num_buckets):
    """The i-th of the row's n response positions is in bucket floor(i * nb / n), by hand."""
    positions = [j for j, m in enumerate(row_mask) if m]
    return {j: (i * num_buckets) // len(positions) for i, j in enumerate(positions)}


@SETTINGS
@given(data=rows())
def test_balanced_keeps_the_same_k_as_the_papers_top_k_inside_the_mask(data):
    scores, mask, k, num_buckets = data
    keep = balanced_top_k_per_row(scores, mask, k, num_buckets)
    assert torch.equal(keep.sum(-1), top_k_per_row(scores, mask, k).sum(-1))
    assert torch.equal(keep.sum(-1), torch.minimum(k, mask.sum(-1)))
    assert not (keep & ~mask).any()


@SETTINGS
@given(data=rows())
def test_buckets_are_contiguous_runs_of_the_response_tokens_gaps_skipped(data):
    _, mask, _, num_buckets = data
    buckets = position_buckets(mask, num_buckets)
    for b in range(mask.size(0)):
        expected = reference_buckets(mask[b].tolist(), num_buckets)
        assert {j: int(v) for j, v in enumerate(buckets[b]) if v >= 0} == expected
        assert all(int(v) == -1 for j, v in enumerate(buckets[b]) if j not in expected)
        sizes = bucket_sizes(buckets[b : b + 1], num_buckets)[0].tolist()
        n = int(mask[b].sum())
        assert sum(sizes) == n and all(math.floor(n / num_buckets) <= s <= math.ceil(n / num_buckets) for s in sizes)


@SETTINGS
@given(data=rows())
def test_each_quota_is_within_one_token_of_proportional_and_never_above_its_bucket(data):
    _, mask, k, num_buckets = data
    sizes = bucket_sizes(position_buckets(mask, num_buckets), num_buckets)
    quotas = bucket_quotas(sizes, k)
    for b in range(mask.size(0)):
        n, kb = int(sizes[b].sum()), min(int(k[b]), int(sizes[b].sum()))
        assert int(quotas[b].sum()) == kb
        for size, quota in zip(sizes[b].tolist(), quotas[b].tolist(), strict=True):
            exact = Fraction(kb * size, n) if n else Fraction(0)
            assert math.floor(exact) <= quota <= math.ceil(exact) and 0 <= quota <= size


def test_quotas_go_by_largest_remainder():
    # sizes 4, 3, 3, 3 and k = 7: proportional 2.15, 1.62, 1.62, 1.62 -> floors 2, 1, 1, 1 and the two left over to
    # the largest remainders (buckets 1 and 2, ties to the earlier bucket)
    assert bucket_quotas(torch.tensor([[4, 3, 3, 3]]), torch.tensor([7])).tolist() == [[2, 2, 2, 1]]
    # an empty bucket never gets a token; k = n keeps every bucket whole
    assert bucket_quotas(torch.tensor([[1, 0, 1, 0, 1]]), torch.tensor([2])).tolist() == [[1, 0, 1, 0, 0]]
    assert bucket_quotas(torch.tensor([[3, 2, 0]]), torch.tensor([5])).tolist() == [[3, 2, 0]]


@SETTINGS
@given(data=rows())
def test_one_bucket_is_the_papers_top_k_exactly(data):
    scores, mask, k, _ = data
    assert torch.equal(balanced_top_k_per_row(scores, mask, k, 1), top_k_per_row(scores, mask, k))


@SETTINGS
@given(data=rows())
def test_within_a_bucket_the_kept_tokens_are_its_best_scores(data):
    """Each bucket keeps a count within one token of its proportional share (the counts sum to k), and the kept
    tokens of a bucket are exactly `top_k_per_row` of that bucket alone with that count (its order: value, ties to
    the earlier position, non-finite last)."""
    scores, mask, k, num_buckets = data
    keep = balanced_top_k_per_row(scores, mask, k, num_buckets)
    buckets = position_buckets(mask, num_buckets)
    sizes = bucket_sizes(buckets, num_buckets)
    counts = bucket_sizes(torch.where(keep, buckets, -1), num_buckets)
    n = sizes.sum(-1, keepdim=True)
    kb = torch.minimum(k.unsqueeze(-1), n)
    floor = torch.div(kb * sizes, n.clamp(min=1), rounding_mode="floor")
    assert ((counts == floor) | (counts == floor + 1)).all() and (counts <= sizes).all()
    assert torch.equal(counts.sum(-1), kb.squeeze(-1))
    for bucket in range(num_buckets):
        in_bucket = buckets == bucket
        assert torch.equal(keep & in_bucket, top_k_per_row(scores, in_bucket, counts[:, bucket]))


@SETTINGS
@given(data=rows(max_length=12))
def test_rows_no_longer_than_the_bucket_count_are_the_papers_top_k(data):
    """With at most one token per bucket every remainder ties, and the leftover tokens go by score: the paper's
    top-k. A short response is not forced onto its first tokens."""
    scores, mask, k, _ = data
    assert torch.equal(balanced_top_k_per_row(scores, mask, k, 12), top_k_per_row(scores, mask, k))


@SETTINGS
@given(data=rows())
def test_leftover_tokens_go_by_largest_remainder(data):
    """A bucket whose fractional part is larger never misses a leftover token that a bucket whose fractional part
    is smaller gets (ties are broken by the score of each bucket's next token)."""
    scores, mask, k, num_buckets = data
    keep = balanced_top_k_per_row(scores, mask, k, num_buckets)
    buckets = position_buckets(mask, num_buckets)
    sizes = bucket_sizes(buckets, num_buckets)
    counts = bucket_sizes(torch.where(keep, buckets, -1), num_buckets)
    n = sizes.sum(-1, keepdim=True).clamp(min=1)
    share = torch.minimum(k.unsqueeze(-1), sizes.sum(-1, keepdim=True)) * sizes
    floor = torch.div(share, n, rounding_mode="floor")
    remainder = share - floor * n
    extra = counts > floor
    for b in range(mask.size(0)):
        got = [int(r) for r, e in zip(remainder[b], extra[b], strict=True) if e]
        missed = [int(r) for r, e in zip(remainder[b], extra[b], strict=True) if not e]
        if got and missed:
            assert min(got) >= max(missed)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 9, 10, 11])
def test_short_responses_keep_k_with_buckets_of_one_token(n):
    """Fewer response tokens than buckets: the buckets hold one token or none, k is unchanged, and the score
    chooses the k (the paper's top-k)."""
    mask = torch.ones(1, n, dtype=torch.bool)
    scores = torch.linspace(1.0, 0.0, n).unsqueeze(0)  # the paper's top-k would keep the first k
    k = num_to_keep(mask, 0.5)
    keep = balanced_top_k_per_row(scores, mask, k, 10)
    assert int(keep.sum()) == int(k)
    if n <= 10:  # one token per bucket at most: the score decides, as in the paper's top-k
        assert torch.equal(keep, top_k_per_row(scores, mask, k))
    buckets = position_buckets(mask, 10)
    sizes = bucket_sizes(buckets, 10)
    assert int(sizes.max()) <= (1 if n <= 10 else 2) and int(sizes.sum()) == n


def test_a_late_answer_keeps_its_share_where_the_papers_top_k_keeps_none():
    """The case issue 27 is about: a score that favours early tokens keeps none of the last tenth, the balanced one
    its proportional share, with the score still choosing inside each tenth."""
    mask = torch.ones(1, 100, dtype=torch.bool)
    scores = torch.linspace(1.0, 0.0, 100).unsqueeze(0)
    k = num_to_keep(mask, 0.6)
    paper = top_k_per_row(scores, mask, k)
    balanced = balanced_top_k_per_row(scores, mask, k, 10)
    assert int(paper[0, 90:].sum()) == 0
    assert [int(balanced[0, 10 * t : 10 * t + 10].sum()) for t in range(10)] == [6] * 10
    assert all(bool(balanced[0, 10 * t : 10 * t + 6].all()) for t in range(10))  # the best six of each tenth


def test_multi_turn_gaps_bucket_the_sequences_response_tokens_in_order():
    """Two assistant turns with a user turn between: the buckets run over the response tokens in order, the gap
    skipped, so the kept fraction is flat over the sequence's response tokens."""
    mask = torch.tensor([[False] * 2 + [True] * 10 + [False] * 5 + [True] * 10])
    scores = torch.where(mask, torch.arange(mask.size(1), dtype=torch.float32), 0.0)  # favours late tokens
    keep = balanced_top_k_per_row(scores, mask, num_to_keep(mask, 0.5), 4)
    response_kept = keep[mask]
    assert int(keep.sum()) == 10
    sizes = bucket_sizes(position_buckets(mask, 4), 4)[0].tolist()
    assert sizes == [5, 5, 5, 5]
    # 2.5 tokens per bucket: equal remainders, so the two left over go to the buckets whose third-best token scores
    # best (the late ones, since the score favours late tokens)
    assert [int(response_kept[5 * t : 5 * t + 5].sum()) for t in range(4)] == [2, 2, 3, 3]
    # the score still chooses inside each bucket; the paper's top-k keeps the second turn only
    assert response_kept.tolist()[:5] == [False, False, False, True, True]
    assert int(top_k_per_row(scores, mask, num_to_keep(mask, 0.5))[0, :12].sum()) == 0


@SETTINGS
@given(data=rows(max_length=12))
def test_per_batch_balancing_keeps_the_batch_k_and_one_bucket_is_rho1(data):
    scores, mask, _, num_buckets = data
    ratio = 0.6
    keep = balanced_top_k_per_batch(scores, mask, ratio, num_buckets)
    assert int(keep.sum()) == int(num_to_keep(mask.reshape(1, -1), ratio).sum())
    assert not (keep & ~mask).any()
    assert torch.equal(balanced_top_k_per_batch(scores, mask, ratio, 1), top_k_per_batch(scores, mask, ratio))


# ----- the config field -----


def make(tmp_path, **overrides):
    return SSTokenConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **overrides)


def test_the_default_is_the_papers_top_k(tmp_path):
    config = make(tmp_path)
    assert (config.selection_positions, config.selection_position_buckets) == ("paper", 10)
    assert METHODS["sstoken"](config).position_buckets is None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(selection_positions="flat"), r"selection_positions='flat'.*'paper', 'balanced'"),
        (dict(selection_positions=["balanced"]), r"selection_positions=.*'paper', 'balanced'"),
        (dict(selection_position_buckets=0), r"selection_position_buckets=0.*>= 1"),
        (dict(selection_position_buckets=2.5), r"selection_position_buckets must be an integer"),
        (dict(selection_positions="balanced", selection_method="full"), r"selection_method='full'.*'sstoken'"),
        (dict(selection_positions="balanced", selection_method="dft"), r"selection_method='dft'"),
        (
            dict(selection_positions="balanced", selection_method="profit", selection_loss_normalization="all"),
            r"selection_method='profit'",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, overrides, expected):
    with pytest.raises(ValueError, match=expected):
        make(tmp_path, **overrides)


@pytest.mark.parametrize("method", ["sstoken", "rel", "attention", "random"])
def test_every_per_sequence_top_k_method_balances(tmp_path, method):
    config = make(tmp_path, selection_method=method, selection_positions="balanced", selection_position_buckets=4)
    selection = METHODS[method](config)
    assert selection.position_buckets == 4
    assert "position-balanced" in selection.describe()


# ----- in the trainer -----


def test_balanced_training_runs_and_keeps_a_flat_profile(make_trainer):
    """Two steps on the tiny model: the step keeps the paper's k per sequence, and in every sequence each half of
    the response tokens keeps its proportional share (within one token), which the paper's top-k need not."""
    trainer = make_trainer(max_steps=2, selection_positions="balanced", selection_position_buckets=2)
    recorded = record_selections(trainer)
    selections = []
    select = trainer.method.select

    def recording(signals, regions, plan):
        keep, score = select(signals, regions, plan)
        selections.append((regions, keep))
        return keep, score

    trainer.method.select = recording
    trainer.train()
    assert len(recorded) >= 2 and selections
    for regions, keep in selections:
        response = regions.sequence_response
        kept = regions.to_sequences(keep, False)
        assert torch.equal(kept.sum(-1), num_to_keep(response, trainer.args.selection_ratio))
        buckets = position_buckets(response, 2)
        for s in range(response.size(0)):
            n, k = int(response[s].sum()), int(kept[s].sum())
            for bucket in range(2):
                size = int((buckets[s] == bucket).sum())
                share = int((kept[s] & (buckets[s] == bucket)).sum())
                assert abs(share - k * size / n) <= 1
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("method", ["sstoken", "random"])
def test_padding_free_balances_each_sequence_like_padded(make_trainer, method):
    """A padding-free batch (every sequence in one row) selects per sequence exactly as the padded one: the buckets
    are each sequence's, not the packed row's."""
    trainer = make_trainer(
        selection_method=method,
        selection_positions="balanced",
        selection_position_buckets=3,
        attention_warmup_ratio=0.0,
        padding_free=True,
        max_length=None,
        lora=lora_config(lora_dropout=0.0),
    )
    randomize_adapter(trainer.model)
    examples = [trainer.train_dataset[i] for i in range(4)]
    padding_free = trainer.data_collator(examples)
    padded = SelectionCollator(DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id))(
        examples
    )
    assert padding_free["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 4
    selections = {}
    for name, batch in (("padding_free", padding_free), ("padded", padded)):
        trainer._micro_step = 0
        selection = trainer.preview_selection(batch)
        selections[name] = selection.regions.layout.predictions_to_sequences(selection.keep, False)
        response = selection.regions.sequence_response
    assert torch.equal(selections["padding_free"], selections["padded"])
    kept = selections["padded"]
    assert torch.equal(kept.sum(-1), num_to_keep(response, trainer.args.selection_ratio))
    sizes = bucket_sizes(position_buckets(response, 3), 3)
    counts = bucket_sizes(torch.where(kept, position_buckets(response, 3), -1), 3)
    proportional = kept.sum(-1, keepdim=True) * sizes / response.sum(-1, keepdim=True).clamp(min=1)
    assert ((counts - proportional).abs() < 1).all()


def test_rho1_balances_per_batch_with_pooled_buckets(tmp_path):
    """rho1 stays a per-batch top-k: the batch's k, with quotas from each relative-position bucket pooled over the
    sequences; an excess loss that favours the start of every response no longer keeps only the starts."""
    labels = torch.full((3, 13), -100)
    labels[0, 3:13] = 1  # responses of 10, 6 and 8 tokens after a prompt
    labels[1, 2:8] = 1
    labels[2, 5:13] = 1
    attention_mask = torch.ones_like(labels)
    attention_mask[1, 8:] = 0
    regions = regions_from_batch({"labels": labels, "attention_mask": attention_mask})
    excess = -torch.arange(12, dtype=torch.float32).expand(3, 12).clone()  # early tokens score best
    signals = Signals(current_logps=torch.zeros(3, 12), excess_loss=excess)
    kept = {}
    for positions in ("paper", "balanced"):
        config = make(tmp_path, selection_method="rho1", reference_model="some/model", selection_positions=positions)
        method = METHODS["rho1"](config)
        keep, _ = method.select(signals, regions, method.plan(regions, False, True))
        kept[positions] = regions.to_sequences(keep, False)
        assert int(keep.sum()) == int(method.kept_count(regions))
    response = regions.sequence_response
    late = torch.where(response, position_buckets(response, 10), -1) >= 5  # the second half of every response
    assert int((kept["paper"] & late).sum()) < int((kept["balanced"] & late).sum())
    counts = bucket_sizes(torch.where(kept["balanced"], position_buckets(response, 10), -1), 10).sum(0)
    pooled = bucket_sizes(position_buckets(response, 10), 10).sum(0)
    k = int(kept["balanced"].sum())
    assert ((counts - k * pooled / pooled.sum()).abs() < 1).all()
