"""QLoRA: a LoRA adapter (and its history adapter) on a 4-bit or 8-bit base, with bitsandbytes on the CPU."""

import pytest
import torch
from conftest import config, lora_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_sstoken import SSTokenTrainer
from trl_sstoken.history import HISTORY_ADAPTER
from trl_sstoken.tiny import build_tiny_model


pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "8bit": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer, hidden_size=64).save_pretrained(path)
    return path


def quantization_config(kind):
    settings = dict(QUANTIZATIONS[kind])
    if settings.get("load_in_4bit"):
        settings["bnb_4bit_compute_dtype"] = torch.float32
    return BitsAndBytesConfig(**settings)


@pytest.mark.parametrize("history", ["base", "lagged", "ema"])
@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_qlora_training_with_each_history(tmp_path, tokenizer, dataset, model_dir, kind, history):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config(kind), device_map="cpu"
    )
    trainer = SSTokenTrainer(
        model=model,
        args=config(tmp_path, history=history, history_update_steps=1, max_steps=3, attention_warmup_ratio=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    peft_model = trainer.model
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert any(p.dtype in (torch.uint8, torch.int8) for p in base_before.values())  # the base really is quantized
    trainer.train()

    named = dict(peft_model.named_parameters())
    for name, before in base_before.items():
        assert torch.equal(named[name].detach(), before), name
    trained = {n: p for n, p in named.items() if ".default." in n}
    history_params = {n: p for n, p in named.items() if f".{HISTORY_ADAPTER}." in n}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trained.values()}
    if history == "base":
        assert not history_params
    else:
        assert history_params and all(not p.requires_grad for p in history_params.values())
        for name, param in history_params.items():
            assert param.dtype == named[name.replace(f".{HISTORY_ADAPTER}.", ".default.")].dtype
        if history == "lagged":  # refreshed after every step: equal to the trained adapter
            for name, param in history_params.items():
                torch.testing.assert_close(param, named[name.replace(f".{HISTORY_ADAPTER}.", ".default.")])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.smoke
def test_qlora_through_sft_trainers_own_model_loading(tmp_path, tokenizer, dataset, model_dir):
    trainer = SSTokenTrainer(
        model=str(model_dir),
        args=config(
            tmp_path, history="lagged", max_steps=2, model_init_kwargs={"device_map": "cpu", "dtype": "float32"}
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        quantization_config=quantization_config("nf4"),
    )
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and HISTORY_ADAPTER in layer.lora_A
    trainer.train()
    assert trainer.state.global_step == 2
