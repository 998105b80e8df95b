import torch

from trl_sstoken.data.collator import EXAMPLE_ID_COLUMN, EXAMPLE_IDS_KEY, SelectionCollator


def test_example_ids_survive_shuffling_and_collation(make_trainer):
    trainer = make_trainer(per_device_train_batch_size=3)
    seen = []
    for batch in trainer.get_train_dataloader():
        for row, example_id in enumerate(batch[EXAMPLE_IDS_KEY].tolist()):
            expected = trainer.train_dataset[example_id]["input_ids"]
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == expected
            seen.append(example_id)
    assert sorted(seen) == list(range(len(trainer.train_dataset)))
    assert seen != sorted(seen)  # the training order really was shuffled


def test_wraps_a_user_collator_that_never_sees_the_ids():
    received = []

    def user_collator(examples):
        received.extend(examples)
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples])}

    collate = SelectionCollator(user_collator)
    batch = collate([{"input_ids": [1, 2], EXAMPLE_ID_COLUMN: 7}, {"input_ids": [3, 4], EXAMPLE_ID_COLUMN: 2}])
    assert batch[EXAMPLE_IDS_KEY].tolist() == [7, 2]
    assert all(EXAMPLE_ID_COLUMN not in example for example in received)
    # examples without ids (an eval set) pass through untouched
    assert EXAMPLE_IDS_KEY not in collate([{"input_ids": [1, 2]}])


def test_attributes_of_the_wrapped_collator_stay_visible(make_trainer):
    trainer = make_trainer()
    assert isinstance(trainer.data_collator, SelectionCollator)
    assert trainer.data_collator.pad_token_id == trainer.data_collator.collator.pad_token_id


def test_a_user_collator_passed_to_the_trainer_is_wrapped(make_trainer, tokenizer, dataset, tmp_path):
    from conftest import config, lora_config
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trl_sstoken import SSTokenTrainer
    from trl_sstoken.tiny import build_tiny_model

    calls = []
    inner = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=16)

    def user_collator(examples):
        calls.append(len(examples))
        return inner(examples)

    trainer = SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=config(tmp_path, max_steps=2, attention_warmup_ratio=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        data_collator=user_collator,
    )
    assert trainer.data_collator.collator is user_collator
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 16 == 0 and EXAMPLE_IDS_KEY in batch
    trainer.train()
    assert calls and trainer.state.global_step == 2
