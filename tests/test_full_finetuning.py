import os

import pytest
import torch
from conftest import config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_sstoken import SSTokenTrainer
from trl_sstoken.history import ModelCopyHistory, build_history
from trl_sstoken.history.model_copy import CHECKPOINT_FILE
from trl_sstoken.tiny import build_tiny_model


@pytest.mark.parametrize("mode", ["base", "lagged", "ema"])
def test_full_fine_tuning_with_each_history(make_trainer, mode):
    trainer = make_trainer(
        peft=False,
        history=mode,
        history_update_steps=2,
        history_ema_alpha=0.5,
        max_steps=4,
        attention_warmup_ratio=0.0,
        learning_rate=1e-3,
    )
    history = trainer._history
    assert isinstance(history, ModelCopyHistory)
    model = trainer.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    copies = dict(history.model.named_parameters())
    assert all(not p.requires_grad for p in copies.values())
    assert history.parameter_bytes == sum(p.numel() * p.element_size() for p in model.parameters())

    ema_expected = {n: p.clone() for n, p in initial.items()}
    weights_at = {}

    class Watch(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights_at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer.callback_handler.callbacks.insert(0, Watch())  # before the history update
    trainer.train()

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in copies.values()}
    for name, copy_param in copies.items():
        if mode == "base":
            expected = initial[name]
        elif mode == "lagged":
            expected = weights_at[4][name]
        else:
            for step in (2, 4):
                ema_expected[name] = 0.5 * ema_expected[name] + 0.5 * weights_at[step][name]
            expected = ema_expected[name]
        torch.testing.assert_close(copy_param, expected, msg=name)
    assert not torch.equal(model.lm_head.weight, initial["lm_head.weight"])


def test_history_copy_on_another_device_and_a_size_guard(make_trainer):
    trainer = make_trainer(peft=False, history_device="cpu", max_steps=1, attention_warmup_ratio=0.0)
    assert trainer._history.device == torch.device("cpu")
    trainer.train()
    with pytest.raises(ValueError, match=r"history_copy_max_gb=1e-06"):
        make_trainer(peft=False, history_copy_max_gb=1e-6)


def test_a_quantized_model_without_adapter_is_refused(tmp_path, tokenizer, dataset):
    build_tiny_model(tokenizer, hidden_size=64).save_pretrained(tmp_path / "model")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    with pytest.raises(ValueError, match="quantized model and no PEFT adapter"):
        build_history(quantized, "ema", 1, 0.5)
    with pytest.raises(ValueError, match="adapters"):  # transformers' Trainer refuses it even earlier
        SSTokenTrainer(
            model=quantized, args=config(tmp_path, history="ema"), train_dataset=dataset, processing_class=tokenizer
        )


def test_checkpoint_holds_the_moving_copy_and_the_final_model_does_not(make_trainer, tmp_path):
    trainer = make_trainer(peft=False, history="ema", max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    assert os.path.exists(tmp_path / "out" / "checkpoint-2" / CHECKPOINT_FILE)
    trainer.save_model(str(tmp_path / "final"))
    saved = sorted(os.listdir(tmp_path / "final"))
    assert CHECKPOINT_FILE not in saved and "model.safetensors" in saved
    size = os.path.getsize(tmp_path / "final" / "model.safetensors")
    assert size < 1.5 * trainer._history.parameter_bytes  # one model, not two
