import torch

from trl_sstoken.collator import EXAMPLE_ID_COLUMN, EXAMPLE_IDS_KEY, SelectionCollator


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
