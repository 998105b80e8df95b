"""Every SFT dataset format, packing and padding-free batches: selection means the same thing in all of them."""

import pytest
import torch
from conftest import lora_config, randomize_adapter
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_sstoken.attention.capture import context_attention_mass
from trl_sstoken.data.collator import SelectionCollator
from trl_sstoken.selection.regions import regions_from_batch


X = -100


def prepared_regions(trainer, index=0):
    """Regions of one example as the trainer prepares and collates it, with decoded context and response text."""
    batch = trainer.data_collator([trainer.train_dataset[index]])
    regions = regions_from_batch(batch)
    ids = batch["input_ids"][0]
    tokenizer = trainer.processing_class
    context = tokenizer.decode(ids[regions.context[0]])
    response = tokenizer.decode(ids[1:][regions.response[0]])
    return regions, context, response


def test_language_modeling_text_has_no_context(make_trainer):
    data = Dataset.from_list([{"text": "once upon a time there was a tiny model"}])
    regions, context, response = prepared_regions(make_trainer(train_dataset=data))
    assert context == "" and response.startswith("upon a time")
    assert regions.has_context.tolist() == [False]


def test_prompt_completion(make_trainer):
    data = Dataset.from_list([{"prompt": "what is two plus two ?", "completion": " four ."}])
    regions, context, response = prepared_regions(make_trainer(train_dataset=data))
    assert context == "what is two plus two ?"
    assert response.split() == ["four", ".", "<|im_end|>"]
    assert regions.has_context.tolist() == [True]


def test_conversational_prompt_completion(make_trainer):
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "what is two plus two ?"}],
                "completion": [{"role": "assistant", "content": "four ."}],
            }
        ]
    )
    _, context, response = prepared_regions(make_trainer(train_dataset=data))
    assert (
        context.replace("\n", " ").split()
        == "<|im_start|> user what is two plus two ? <|im_end|> <|im_start|> assistant".split()
    )
    assert response.split()[:2] == ["four", "."]


def test_three_turn_chat_with_assistant_only_loss(make_trainer):
    messages = [
        {"role": "system", "content": "once upon a time"},
        {"role": "user", "content": "what is one plus one ?"},
        {"role": "assistant", "content": "two ."},
        {"role": "user", "content": "what is two plus two ?"},
        {"role": "assistant", "content": "four ."},
        {"role": "user", "content": "what is three plus three ?"},
        {"role": "assistant", "content": "six ."},
    ]
    trainer = make_trainer(train_dataset=Dataset.from_list([{"messages": messages}]), assistant_only_loss=True)
    regions, context, response = prepared_regions(trainer)
    assert response.replace("<|im_end|>", " <|im_end|>").split() == [
        "two",
        ".",
        "<|im_end|>",
        "four",
        ".",
        "<|im_end|>",
        "six",
        ".",
        "<|im_end|>",
    ]
    words = context.replace("<|im_start|>", " ").replace("<|im_end|>", " ").split()
    assert (
        words
        == (
            "system once upon a time user what is one plus one ? assistant user what is two plus two ? assistant "
            "user what is three plus three ? assistant"
        ).split()
    )
    # for a token of the third assistant turn, the context is every non-assistant position before it, and only those
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    six = int((ids == trainer.processing_class.convert_tokens_to_ids("six")).nonzero()[0, 0])
    before = regions.context[0, :six]
    assert not before[labels[:six] != X].any() and before[labels[:six] == X].all()


def test_a_packed_row_of_three_sequences():
    #            seq 0: ctx ctx resp | seq 1: ctx resp resp resp | seq 2: ctx resp
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    labels = torch.tensor([[X, X, 5, X, 6, 7, 8, X, 9]])
    regions = regions_from_batch({"labels": labels, "position_ids": position_ids})
    assert regions.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2]]
    assert regions.num_response.tolist() == [1, 3, 1]
    assert regions.has_context.tolist() == [True, True, True]
    # a response token's attention to context never reaches another sequence's tokens
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 2, 9, 4, generator=generator), torch.randn(1, 2, 9, 4, generator=generator)
    packed = context_attention_mass(
        query, key, context=regions.context, key_valid=regions.valid, scaling=0.5, sequence_ids=regions.sequence_ids
    )
    for start, stop in ((0, 3), (3, 7), (7, 9)):
        alone = context_attention_mass(
            query[:, :, start:stop],
            key[:, :, start:stop],
            context=regions.context[:, start:stop],
            key_valid=regions.valid[:, start:stop],
            scaling=0.5,
        )
        torch.testing.assert_close(packed[:, start:stop], alone)


def test_sequence_layout_round_trip_and_padding_free_equivalence():
    labels = torch.tensor([[X, X, 5, 6, X, 7], [X, 8, 9, X, X, X]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    padded = regions_from_batch({"labels": labels, "attention_mask": attention_mask})
    free = regions_from_batch(
        {
            "labels": torch.tensor([[X, X, 5, 6, X, 7, X, 8, 9]]),
            "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2]]),
        }
    )
    assert torch.equal(padded.sequence_response, free.sequence_response)
    values = torch.randn(2, 5)
    layout = padded.layout
    back = layout.sequences_to_predictions(layout.predictions_to_sequences(values, 0.0), 0.0)
    valid_predictions = padded.valid[:, 1:]
    torch.testing.assert_close(back[valid_predictions], values[valid_predictions])


@pytest.mark.parametrize("method", ["sstoken", "rel", "attention", "random"])
@pytest.mark.parametrize("normalization", ["selected", "sequence"])
def test_padding_free_selects_and_trains_exactly_like_padded(make_trainer, method, normalization):
    trainer = make_trainer(
        selection_method=method,
        selection_loss_normalization=normalization,
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
    assert torch.equal(selections["padding_free"], selections["padded"])
    assert selections["padded"].any()

    results = {}
    for name, batch in (("padding_free", padding_free), ("padded", padded)):
        trainer.model.train()
        trainer.model.zero_grad()
        trainer._micro_step = 0
        trainer._window_counts = None
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
        loss.backward()
        results[name] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(results["padding_free"][0], results["padded"][0], atol=1e-6, rtol=1e-5)
    for name, grad in results["padded"][1].items():
        torch.testing.assert_close(results["padding_free"][1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_trl_packing_trains_with_per_sequence_selection(make_trainer, strategy):
    trainer = make_trainer(
        packing=True,
        packing_strategy=strategy,
        max_length=48,
        attention_warmup_ratio=0.0,
        per_device_train_batch_size=2,
        max_steps=2,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    regions = regions_from_batch(batch)
    if strategy == "wrapped":  # fixed-length rows, no sequence boundaries: each row is one sequence to the model
        assert regions.layout.num_sequences == batch["input_ids"].shape[0]
    else:
        assert regions.layout.num_sequences > batch["input_ids"].shape[0]  # several sequences per packed row
    from trl_sstoken.selection.scoring import num_to_keep

    expected = num_to_keep(regions.sequence_response, 0.6).sum().item() / regions.num_response.sum().item()
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["sstoken/selected_fraction"][-1] == pytest.approx(expected)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


# Cached and on-the-fly history log-probs are the same numbers computed in differently shaped batches: the cache pass
# packs 2 x per_device_train_batch_size examples into one padding-free row, a training step packs
# per_device_train_batch_size. Measured on this project's machines (Intel, AVX-512 + AMX, torch 2.13 CPU build): they
# differ by up to 4.8e-7 (a float32 ulp or two at these magnitudes). The cause is CPU sdpa: the same sequences packed
# 1 vs 16 to a row give different log-probs with sdpa and bit-equal ones with eager attention, and the thread count
# (1 or 2), disabling mkldnn and ONEDNN_MAX_CPU_ISA=AVX2 change nothing; ATEN_CPU_CAPABILITY=avx2 (other vectorised
# kernels) only moves the differences to other tokens. Top-k may then keep either of two tokens whose REL lie closer
# than that, so bit-equal selections depend on the CPU; a training run that flips one token then diverges.
CACHE_TOLERANCE = 1e-5


def compare_cached_with_on_the_fly(trainer, batches=3):
    """Checks, on padding-free training batches, that the cached history log-probs match a history forward on the
    same batch within CACHE_TOLERANCE and that the two selections agree except on near-ties (tokens whose REL is
    within 2 * CACHE_TOLERANCE of the keep boundary of their sequence). Returns (largest difference, ties flipped)."""
    from itertools import islice

    from trl_sstoken.data.collator import pop_example_index
    from trl_sstoken.selection.methods import Signals
    from trl_sstoken.selection.scoring import retrospective_excess_loss

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    worst, flipped = 0.0, 0
    for batch in islice(iter(trainer.get_train_dataloader()), batches):
        inputs = trainer._prepare_inputs(batch)
        fields = pop_example_index(inputs)
        regions = regions_from_batch({**inputs, **fields})
        assert inputs["input_ids"].shape[0] == 1 and regions.layout is not None  # padding-free: one packed row
        with torch.no_grad():
            cached = trainer._history.log_probs(model, inputs, fields)
            on_the_fly = trainer._history.source.log_probs(model, inputs)
            current = model(**inputs, fused_lm_head=True).log_probs.float()
        difference = (cached - on_the_fly)[regions.response].abs().max().item()
        assert difference <= CACHE_TOLERANCE, f"cached history log-probs differ by {difference:.3g}"
        worst = max(worst, difference)
        plan = trainer._plan_step(regions)
        layout = regions.layout
        kept_cached, kept_on_the_fly, response = (
            layout.predictions_to_sequences(mask, False)
            for mask in (
                trainer._select(Signals(current, rel=retrospective_excess_loss(current, cached)), regions, plan).keep,
                trainer._select(
                    Signals(current, rel=retrospective_excess_loss(current, on_the_fly)), regions, plan
                ).keep,
                regions.response,
            )
        )
        rel = layout.predictions_to_sequences(current - on_the_fly, 0.0)
        for row in range(rel.shape[0]):
            differ = (kept_cached[row] != kept_on_the_fly[row]).nonzero().flatten().tolist()
            if not differ:
                continue
            k = int(kept_on_the_fly[row].sum())
            ranked = rel[row][response[row]].sort(descending=True).values
            boundary = ranked[max(k - 1, 0) : k + 1]
            for position in differ:
                gap = (boundary - rel[row, position]).abs().min().item()
                assert gap <= 2 * CACHE_TOLERANCE, (
                    f"token {position} of sequence {row} flipped {gap:.3g} from the boundary"
                )
            flipped += len(differ)
    return worst, flipped


def test_cached_history_with_padding_free_batches(make_trainer, tmp_path):
    settings = dict(
        selection_method="rel", attention_warmup_ratio=0.0, padding_free=True, max_length=None, max_steps=3
    )
    trainer = make_trainer(history_cache_dir=str(tmp_path / "cache"), **settings)
    randomize_adapter(trainer.model, scale=0.05)  # REL away from 0, as after some training
    trainer._prepare_history_cache()
    worst, flipped = compare_cached_with_on_the_fly(trainer)
    assert worst <= CACHE_TOLERANCE and flipped <= 4
    # the comparison can fail: a cache off by 1e-3 on some tokens is caught
    trainer._history.values[::5] += 1e-3
    with pytest.raises(AssertionError, match="cached history log-probs differ"):
        compare_cached_with_on_the_fly(trainer)
    # and the cached run trains
    trainer._history.values[::5] -= 1e-3
    trainer.train()
    assert trainer.state.global_step == 3
