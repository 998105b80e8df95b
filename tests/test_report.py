"""The selection report (report.py) on every batch layout: padded, padding-free and packed rows.

A padding-free or packed row holds several sequences, each with its own REL weight gamma: the report must show the
score each token was ranked by, the same as in a padded batch of the same examples.
"""

import pytest
import torch
from conftest import lora_config, randomize_adapter
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_sstoken.data.collator import SelectionCollator
from trl_sstoken.report.collect import collect_examples


def response_tokens(examples):
    """(text, role, score) of every response token, in order, over all examples."""
    return [(token.text, token.role, token.score) for example in examples for token in example.response]


@pytest.mark.parametrize("method", ["sstoken", "rel", "attention"])
def test_report_on_padding_free_batches_shows_the_scores_of_padded_ones(make_trainer, method):
    trainer = make_trainer(
        selection_method=method,
        attention_warmup_ratio=0.0,
        padding_free=True,
        max_length=None,
        lora=lora_config(lora_dropout=0.0),
    )
    randomize_adapter(trainer.model)
    padding_free = collect_examples(trainer, 8, batch_size=4, progress=False)
    assert len(padding_free) == 2  # one row per batch: every example of the batch concatenated

    trainer.data_collator = SelectionCollator(
        DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)
    )
    padded = collect_examples(trainer, 8, batch_size=4, progress=False)
    assert len(padded) == 8

    got, expected = response_tokens(padding_free), response_tokens(padded)
    assert [(text, role) for text, role, _ in got] == [(text, role) for text, role, _ in expected]
    assert all(score is not None and 0.0 <= score <= 1.0 for _, _, score in got)
    torch.testing.assert_close(
        torch.tensor([score for _, _, score in got]),
        torch.tensor([score for _, _, score in expected]),
        atol=1e-5,
        rtol=1e-4,
    )


def test_report_on_packed_rows(make_trainer):
    trainer = make_trainer(packing=True, max_length=48, attention_warmup_ratio=0.0, per_device_train_batch_size=2)
    randomize_adapter(trainer.model)
    examples = collect_examples(trainer, 4, batch_size=2, progress=False)
    assert examples
    tokens = [token for example in examples for token in example.response]
    assert tokens and all(token.score is not None and 0.0 <= token.score <= 1.0 for token in tokens)
    assert any(token.role == "kept" for token in tokens) and any(token.role == "dropped" for token in tokens)
