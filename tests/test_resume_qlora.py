"""Exact resume with QLoRA: a 4-bit (NF4, FP4) or 8-bit base on the CPU, gradient accumulation 2, every history mode,
a checkpoint at step 3 of 5 (not a multiple of `history_update_steps=2`). The resumed run must log the same losses
and REL, select the same tokens and end with the same adapters as the uninterrupted run, bit for bit.

Two causes made it differ before (docs/reliability.md, "Exact resume"): PEFT's `load_adapter` upcast the bf16
adapters of a quantized model to fp32 by replacing their parameters (so the run went on in another precision and the
lagged/EMA history updated orphaned tensors), and bitsandbytes repacked 4-bit weights for its CPU inference kernel
on the first no-grad eval-mode forward (the history-cache pass, an evaluation), a kernel that differs numerically
and passes no gradient.
"""

import pytest
import torch
from conftest import config, lora_config, record_selections
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback

from trl_sstoken import SSTokenTrainer
from trl_sstoken.history import HISTORY_ADAPTER
from trl_sstoken.tiny import build_tiny_model


pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}
HISTORIES = {
    "base": dict(history="base"),
    "lagged": dict(history="lagged", history_update_steps=2),
    "ema": dict(history="ema", history_update_steps=2, history_ema_alpha=0.7),
    "cached-base": dict(history="base", history_cache_dir="CACHE"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer, hidden_size=64).save_pretrained(path)
    return path


class AdapterSnapshots(TrainerCallback):
    """The trained and history adapters after every optimizer step (after the history update)."""

    def __init__(self, model):
        self.model, self.steps = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" in n
        }


def make(tmp_path, tokenizer, dataset, model_dir, kind, out, **settings):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=BitsAndBytesConfig(**QUANTIZATIONS[kind]), device_map="cpu"
    )
    args = config(
        tmp_path,
        output_dir=str(tmp_path / out),
        max_steps=5,
        save_strategy="steps",
        save_steps=3,
        attention_warmup_ratio=0.0,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        **settings,
    )
    trainer = SSTokenTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config()
    )
    snapshots = AdapterSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    return trainer, snapshots, record_selections(trainer)


def logged_after(trainer, step):
    keys = ("loss", "sstoken/rel_mean", "sstoken/rel_std", "grad_norm")
    return [
        tuple(e.get(k) for k in ("step", *keys)) for e in trainer.state.log_history if "loss" in e and e["step"] > step
    ]


@pytest.mark.parametrize("history", list(HISTORIES))
@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_qlora_resume_equals_uninterrupted(tmp_path, tokenizer, dataset, model_dir, kind, history):
    if kind != "nf4" and history == "cached-base":
        pytest.skip("the cached history is quantization-independent; nf4 covers its CPU repacking")
    settings = dict(HISTORIES[history])
    if settings.get("history_cache_dir") == "CACHE":
        settings["history_cache_dir"] = str(tmp_path / "cache")

    uninterrupted, expected_adapters, expected = make(tmp_path, tokenizer, dataset, model_dir, kind, "a", **settings)
    uninterrupted.train()
    resumed, adapters, got = make(tmp_path, tokenizer, dataset, model_dir, kind, "b", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))

    assert logged_after(resumed, 3) == logged_after(uninterrupted, 3)
    assert len(logged_after(resumed, 3)) == 2
    expected_after = [(step, keep) for step, keep in expected if step >= 3]
    assert [step for step, _ in got] == [step for step, _ in expected_after] == [3, 3, 4, 4]
    for (_, keep), (_, expected_keep) in zip(got, expected_after, strict=True):
        assert torch.equal(keep, expected_keep)
    for step in (4, 5):
        for name, value in expected_adapters.steps[step].items():
            assert adapters.steps[step][name].dtype == value.dtype, name
            assert torch.equal(adapters.steps[step][name], value), (step, name)
    if history == "lagged":  # K = 2: the resumed run's history is the adapter refreshed after step 4
        after_4 = adapters.steps[4]
        for name, value in after_4.items():
            if f".{HISTORY_ADAPTER}." in name:
                assert torch.equal(value, after_4[name.replace(f".{HISTORY_ADAPTER}.", ".default.")]), name


def test_an_evaluation_leaves_the_4bit_layers_as_training_uses_them(tmp_path, tokenizer, dataset, model_dir):
    """bitsandbytes would repack the weights on this no-grad eval forward; later training forwards would then give
    other values and no gradient through the base layers."""
    from conftest import first_batch

    trainer, _, _ = make(tmp_path, tokenizer, dataset, model_dir, "nf4", "a", history="lagged")
    model = trainer.model
    model.train()
    batch = first_batch(trainer)

    def gradients():
        torch.manual_seed(0)  # the same LoRA dropout masks
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = gradients()
    trainer.evaluate(dataset.select(range(8)))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    after = gradients()
    assert before.keys() == after.keys() and len(before) > 0
    for name, grad in before.items():
        assert torch.equal(after[name], grad), name
