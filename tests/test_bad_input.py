"""The bad-input matrix (docs/reliability.md): each row fails early and clearly, or warns and logs a metric."""

import warnings

import pytest
import torch
from conftest import QUICKSTART_ROWS, config, first_batch, lora_config
from datasets import Dataset
from transformers import AttentionInterface, BloomConfig, BloomForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from trl_sstoken import SSTokenTrainer
from trl_sstoken.attention.capture import AttentionUnavailableError
from trl_sstoken.tiny import build_tiny_model


def bloom(tokenizer):
    """A model whose attention (ALiBi) never runs through AttentionInterface: it cannot be captured."""
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4))


def test_uncapturable_attention_is_an_error_unless_rel_fallback_is_allowed(tmp_path, tokenizer, dataset):
    with pytest.raises(AttentionUnavailableError, match="allow_rel_fallback=True"):
        SSTokenTrainer(
            model=bloom(tokenizer),
            args=config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(target_modules=["query_key_value"]),
        )
    with pytest.warns(UserWarning, match="Falling back to REL-only"):
        trainer = SSTokenTrainer(
            model=bloom(tokenizer),
            args=config(tmp_path, allow_rel_fallback=True, max_steps=2),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(target_modules=["query_key_value"]),
        )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    assert len(logs) == 2 and all("sstoken/rel_mean" in e and "sstoken/attention_mean" not in e for e in logs)
    with pytest.raises(AttentionUnavailableError):  # attention-only selection has nothing to fall back to
        SSTokenTrainer(
            model=bloom(tokenizer),
            args=config(tmp_path, selection_method="attention", allow_rel_fallback=True),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_padding_free_with_an_attention_kernel_that_cannot_keep_sequences_apart(tmp_path, tokenizer, dataset):
    AttentionInterface.register("my_kernel", sdpa_attention_forward)
    AttentionMaskInterface.register("my_kernel", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = build_tiny_model(tokenizer)
    model.set_attn_implementation("my_kernel")
    with pytest.raises(ValueError, match="'my_kernel' does not"):
        SSTokenTrainer(
            model=model,
            args=config(tmp_path, padding_free=True, max_length=None),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(),
        )


def test_examples_whose_response_is_truncated_away_are_reported(make_trainer):
    long_prompt = " ".join(["what is two plus three ?"] * 20)
    rows = QUICKSTART_ROWS[:6] + [{"prompt": long_prompt, "completion": " five ."}] * 2
    with pytest.warns(UserWarning, match=r"2 of 8 training examples have no response token left"):
        make_trainer(train_dataset=Dataset.from_list(rows), max_length=32)


def test_nonfinite_history_log_probs_skip_the_batch(make_trainer):
    trainer = make_trainer(history="lagged", attention_warmup_ratio=0.0)
    trainer.model.train()
    batch = first_batch(trainer)
    real = trainer._history.log_probs
    trainer._history.log_probs = lambda *args: real(*args).masked_fill(torch.ones((), dtype=torch.bool), float("nan"))
    with pytest.warns(UserWarning, match="Non-finite log-probabilities"):
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert trainer._metrics["train"]["sstoken/nonfinite_skipped"] == [1.0]


def test_the_history_is_never_updated_from_nonfinite_weights(make_trainer):
    trainer = make_trainer(history="lagged", history_update_steps=1)
    history = trainer._history
    before = [p.detach().clone() for p in history.history_params]
    with torch.no_grad():
        history.trained_params[0].fill_(float("nan"))
    with pytest.warns(UserWarning, match="keeps its last finite state"):
        history.on_optimizer_step(1)
    for param, expected in zip(history.history_params, before, strict=True):
        assert torch.equal(param, expected)


def test_training_survives_a_nonfinite_batch(make_trainer):
    trainer = make_trainer(history="lagged", attention_warmup_ratio=0.0, max_steps=3)
    real = trainer._history.log_probs
    calls = []

    def sometimes_nan(*args):
        calls.append(1)
        out = real(*args)
        return out.fill_(float("inf")) if len(calls) == 2 else out

    trainer._history.log_probs = sometimes_nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    skipped = [e["sstoken/nonfinite_skipped"] for e in trainer.state.log_history if "sstoken/nonfinite_skipped" in e]
    assert skipped == [0.0, 1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in trainer._history.history_params)
