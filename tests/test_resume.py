"""Exact resume: a run resumed from checkpoint N selects the same tokens and logs the same losses after N."""

import pytest
import torch
from conftest import record_selections


CASES = {  # the checkpoint is at step 3: not a multiple of history_update_steps=2
    "base": dict(history="base"),
    "lagged": dict(history="lagged", history_update_steps=2),
    "ema": dict(history="ema", history_update_steps=1, history_ema_alpha=0.7),
    "ema-every-2": dict(history="ema", history_update_steps=2, history_ema_alpha=0.7),
    "random": dict(selection_method="random"),
    "cached-base": dict(history="base", history_cache_dir="CACHE"),
    "full-fine-tuning-ema": dict(history="ema", history_update_steps=1, peft=False, learning_rate=1e-3),
    "full-fine-tuning-lagged": dict(history="lagged", history_update_steps=2, peft=False, learning_rate=1e-3),
}


def losses_after(trainer, step):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > step]


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_uninterrupted(make_trainer, tmp_path, case):
    settings = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        attention_warmup_ratio=0.0,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    settings.update(CASES[case])
    if settings.get("history_cache_dir") == "CACHE":
        settings["history_cache_dir"] = str(tmp_path / "cache")

    uninterrupted = make_trainer(output_dir=str(tmp_path / "a"), **settings)
    expected = record_selections(uninterrupted)
    uninterrupted.train()

    resumed = make_trainer(output_dir=str(tmp_path / "b"), **settings)
    got = record_selections(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))

    expected_after = [(step, keep) for step, keep in expected if step >= 3]
    assert [step for step, _ in got] == [step for step, _ in expected_after] == [3, 3, 4, 4, 5, 5]
    for (_, keep), (_, expected_keep) in zip(got, expected_after, strict=True):
        assert torch.equal(keep, expected_keep)
    assert losses_after(resumed, 3) == losses_after(uninterrupted, 3)
    assert len(losses_after(resumed, 3)) == 3
    for (name, param), (_, expected_param) in zip(
        resumed.model.named_parameters(), uninterrupted.model.named_parameters(), strict=True
    ):
        assert torch.equal(param, expected_param), name
