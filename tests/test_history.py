import pytest
import torch
from conftest import lora_config, randomize_adapter
from peft import get_peft_model

from trl_sstoken.history import (
    HISTORY_ADAPTER,
    AdapterDisabledHistory,
    AdapterHistory,
    ModelCopyHistory,
    build_history,
)
from trl_sstoken.tiny import build_tiny_model


@pytest.fixture
def peft_model(tokenizer):
    model = get_peft_model(build_tiny_model(tokenizer), lora_config())
    randomize_adapter(model)
    model.train()
    return model


def trained_and_history(model):
    named = dict(model.named_parameters())
    history = {n: p for n, p in named.items() if f".{HISTORY_ADAPTER}." in n}
    trained = {n: named[n.replace(f".{HISTORY_ADAPTER}.", ".default.")] for n in history}
    return history, trained


def inputs():
    return {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


def test_base_history_is_the_model_without_adapter(peft_model):
    history = build_history(peft_model, "base", 1, 0.5)
    assert isinstance(history, AdapterDisabledHistory)
    with torch.no_grad():
        with history.active():
            base_logits = peft_model(**inputs()).logits
        with peft_model.disable_adapter():
            expected = peft_model(**inputs()).logits
        current = peft_model(**inputs()).logits
    torch.testing.assert_close(base_logits, expected)
    assert not torch.allclose(base_logits, current)


def test_lagged_history_starts_equal_is_frozen_and_dropout_free(peft_model):
    history = build_history(peft_model, "lagged", 2, 0.5)
    assert isinstance(history, AdapterHistory)
    params, trained = trained_and_history(peft_model)
    assert params and all(not p.requires_grad for p in params.values())
    for name, param in params.items():
        torch.testing.assert_close(param, trained[name], atol=0, rtol=0)
    dropouts = [m for n, m in peft_model.named_modules() if n.endswith(f"lora_dropout.{HISTORY_ADAPTER}")]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)
    assert peft_model.active_adapter == "default"


def test_history_forward_uses_the_history_weights_and_restores_flags(peft_model):
    history = build_history(peft_model, "lagged", 2, 0.5)
    peft_model.eval()  # the trained adapter has dropout; the reference forward must not
    with torch.no_grad():
        before = peft_model(**inputs()).logits
    peft_model.train()  # the history forward runs in train mode, as in training, and must be deterministic
    randomize_adapter(peft_model, seed=7)  # the trained adapter moves on; the history stays behind
    with torch.no_grad(), history.active():
        lagged = peft_model(**inputs()).logits
    torch.testing.assert_close(lagged, before)
    params, trained = trained_and_history(peft_model)
    assert all(p.requires_grad for p in trained.values())
    assert all(not p.requires_grad for p in params.values())
    assert peft_model.active_adapter == "default"


def test_lagged_refresh_schedule(peft_model):
    history = build_history(peft_model, "lagged", 3, 0.5)
    params, trained = trained_and_history(peft_model)
    snapshot = {n: p.clone() for n, p in params.items()}
    for step in (1, 2):
        randomize_adapter(peft_model, seed=10 + step)
        history.on_optimizer_step(step)
        for name, param in params.items():
            torch.testing.assert_close(param, snapshot[name], atol=0, rtol=0)
    history.on_optimizer_step(3)
    for name, param in params.items():
        torch.testing.assert_close(param, trained[name], atol=0, rtol=0)


def test_ema_update(peft_model):
    history = build_history(peft_model, "ema", 1, 0.75)
    params, trained = trained_and_history(peft_model)
    old = {n: p.clone() for n, p in params.items()}
    randomize_adapter(peft_model, seed=3)
    history.on_optimizer_step(1)
    for name, param in params.items():
        torch.testing.assert_close(param, 0.75 * old[name] + 0.25 * trained[name])


def test_without_peft_the_history_is_a_model_copy(tokenizer):
    assert isinstance(build_history(build_tiny_model(tokenizer), "base", 1, 0.5), ModelCopyHistory)


def test_history_adapter_needs_a_free_name(peft_model):
    build_history(peft_model, "lagged", 1, 0.5)
    with pytest.raises(ValueError, match="already has an adapter named 'history'"):
        build_history(peft_model, "ema", 1, 0.5)


def test_modules_to_save_cost_is_reported(tokenizer):
    model = get_peft_model(build_tiny_model(tokenizer), lora_config(modules_to_save=["lm_head"]))
    with pytest.warns(UserWarning, match="modules_to_save"):
        build_history(model, "lagged", 1, 0.5)
