"""The model leaves the trainer as it came: the capture's attention implementation (`sstoken_sdpa`,
`sstoken_eager`) is on the model only while the trainer needs it (`train()`, an armed forward such as
`preview_selection`), and every config of the model (the PEFT wrapper's, the base model's, each submodel's) gets
its original implementation back after, also when training fails; a second `train()` captures again."""

import pytest
from conftest import config, first_batch, lora_config
from transformers import PreTrainedModel, TrainerCallback

from trl_sstoken import SSTokenTrainer
from trl_sstoken.tiny import build_tiny_model


pytestmark = pytest.mark.trainer  # each test trains a tiny model


def implementations(model):
    """The attention implementation of every config in the model (PEFT's `model.config` is the base model's)."""
    found = {"model.config": model.config._attn_implementation}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            found[name or "."] = module.config._attn_implementation
    return found


class Recorder(TrainerCallback):
    """The model's implementation at each step end; raises at step `fail_at` (an error inside training)."""

    def __init__(self, fail_at=None):
        self.seen, self.fail_at = [], fail_at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.config._attn_implementation)
        if state.global_step == self.fail_at:
            raise RuntimeError("failure inside training")


def trainer_on(tmp_path, tokenizer, dataset, implementation, peft=True, **overrides):
    model = build_tiny_model(tokenizer, attn_implementation=implementation)
    trainer = SSTokenTrainer(
        model=model,
        args=config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config() if peft else None,
    )
    return trainer


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_train_restores_the_original_implementation(tmp_path, tokenizer, dataset, implementation, peft):
    trainer = trainer_on(tmp_path, tokenizer, dataset, implementation, peft=peft, max_steps=2)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    # while training, the capture's implementation ran (and computed the statistic on each step)
    assert recorder.seen == [f"sstoken_{implementation}"] * 2
    assert trainer._attention.num_computations == 2
    after = implementations(trainer.model)
    assert set(after.values()) == {implementation}, after
    if peft:
        assert trainer.model.get_base_model().config._attn_implementation == implementation


def test_an_error_inside_training_restores_it_too(tmp_path, tokenizer, dataset):
    trainer = trainer_on(tmp_path, tokenizer, dataset, "sdpa", max_steps=4)
    recorder = Recorder(fail_at=1)
    trainer.add_callback(recorder)
    with pytest.raises(RuntimeError, match="failure inside training"):
        trainer.train()
    assert recorder.seen == ["sstoken_sdpa"]
    assert set(implementations(trainer.model).values()) == {"sdpa"}


def test_a_second_train_captures_again_and_restores_again(tmp_path, tokenizer, dataset):
    trainer = trainer_on(tmp_path, tokenizer, dataset, "sdpa", max_steps=2)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    first = trainer._attention.num_computations
    trainer.train()
    assert trainer._attention.num_computations == first + 2
    assert recorder.seen == ["sstoken_sdpa"] * 4
    attention_means = [
        entry["sstoken/attention_mean"] for entry in trainer.state.log_history if "sstoken/attention_mean" in entry
    ]
    assert len(attention_means) == 2 and all(0 < value <= 1 for value in attention_means)
    assert set(implementations(trainer.model).values()) == {"sdpa"}


def test_the_trainer_leaves_the_model_as_it_came_before_training_and_after_a_preview(tmp_path, tokenizer, dataset):
    """Building the trainer does not leave the capture on the model either, and `preview_selection` (the inspect
    command, the selection report) installs it for its forward only."""
    trainer = trainer_on(tmp_path, tokenizer, dataset, "sdpa", max_steps=2)
    assert set(implementations(trainer.model).values()) == {"sdpa"}
    before = trainer._attention.num_computations
    selection = trainer.preview_selection(first_batch(trainer))
    assert trainer._attention.num_computations == before + 1 and selection.attention is not None
    assert set(implementations(trainer.model).values()) == {"sdpa"}


def test_two_trainers_on_one_model_take_turns(tmp_path, tokenizer, dataset):
    """With the capture on the model only during training, a second trainer on the same model can be built and
    trained after the first (before, it was refused as 'already captured by another trainer')."""
    model = build_tiny_model(tokenizer)
    trainers = [
        SSTokenTrainer(
            model=model,
            args=config(tmp_path / str(index), max_steps=1),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        for index in range(2)
    ]
    for trainer in trainers:
        trainer.train()
        assert trainer._attention.num_computations == 1
    assert model.config._attn_implementation == "sdpa"
