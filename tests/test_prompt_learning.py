"""PEFT prompt learning (prompt tuning, p-tuning): trains with the methods that need neither a
history nor the attention capture, exactly like SFTTrainer, and refuses the others clearly at construction."""

import pytest
import torch
from conftest import config
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from trl import SFTConfig, SFTTrainer

from trl_sstoken import SSTokenTrainer
from trl_sstoken.tiny import build_tiny_model


PROMPT_LEARNING = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
}
# Prefix tuning fails inside SFTTrainer itself with transformers 5.23 (sdpa: mask 29 vs keys 32), so it is only
# checked for the refusal, which happens before any forward
PROMPT_LEARNING["prefix_tuning"] = lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)


def train(tmp_path, tokenizer, dataset, peft_config, trainer_class=SSTokenTrainer, **overrides):
    torch.manual_seed(0)
    settings = dict(max_steps=3, learning_rate=1e-1)
    settings.update(overrides)
    trainer = trainer_class(
        model=build_tiny_model(tokenizer),
        args=config(tmp_path, config_class=SFTConfig if trainer_class is SFTTrainer else None, **settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind", ["p_tuning", "prompt_tuning"])
def test_full_trains_exactly_like_sft_trainer(tmp_path, tokenizer, dataset, kind):
    _, expected = train(tmp_path / "sft", tokenizer, dataset, PROMPT_LEARNING[kind](), trainer_class=SFTTrainer)
    trainer, got = train(tmp_path / "sstoken", tokenizer, dataset, PROMPT_LEARNING[kind](), selection_method="full")
    assert len(got) == 3
    assert got == pytest.approx(expected, rel=1e-5)
    logs = [entry for entry in trainer.state.log_history if "sstoken/selected_fraction" in entry]
    assert logs and all(entry["sstoken/selected_fraction"] == 1.0 for entry in logs)


@pytest.mark.parametrize("method", ["random", "profit", "dft"])
def test_methods_without_history_or_attention_train(tmp_path, tokenizer, dataset, method):
    # a fresh tiny model gives every token p ~ 1/vocab: a low threshold, so that ProFit keeps something
    overrides = dict(selection_loss_normalization="all", profit_threshold=0.001) if method == "profit" else {}
    trainer, losses = train(
        tmp_path, tokenizer, dataset, PROMPT_LEARNING["prompt_tuning"](), selection_method=method, **overrides
    )
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    fractions = [e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    if method == "random":
        assert all(0.6 <= fraction < 1 for fraction in fractions)


@pytest.mark.parametrize("method", ["sstoken", "rel", "attention"])
@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_methods_needing_history_or_attention_are_refused_naming_the_choices(
    tmp_path, tokenizer, dataset, method, kind
):
    with pytest.raises(
        ValueError, match=r"prompt learning.*use selection_method 'random' or 'full' or 'profit' or 'dft'"
    ):
        SSTokenTrainer(
            model=build_tiny_model(tokenizer),
            args=config(tmp_path, selection_method=method),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=PROMPT_LEARNING[kind](),
        )
