import pytest
import torch

from trl_sstoken.selection.regions import regions_from_batch


X = -100


def test_prompt_completion_rows_with_right_padding():
    # row 0: 3 prompt tokens, 2 response tokens; row 1: 2 prompt tokens, 1 response token, 2 padding
    labels = torch.tensor([[X, X, X, 7, 8], [X, X, 9, X, X]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    regions = regions_from_batch({"labels": labels, "attention_mask": attention_mask})
    # prediction space: column j is token j + 1
    assert regions.response.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert regions.context.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    assert regions.num_response.tolist() == [2, 1]
    assert regions.has_context.tolist() == [True, True]


def test_padding_is_neither_context_nor_response_even_if_labelled():
    labels = torch.tensor([[X, 5, 6]])
    attention_mask = torch.tensor([[1, 1, 0]])
    regions = regions_from_batch({"labels": labels, "attention_mask": attention_mask})
    assert regions.response.tolist() == [[True, False]]
    assert regions.context.tolist() == [[True, False, False]]


def test_plain_text_has_no_context_and_a_multi_turn_chat_has_context_before_each_turn():
    # language modeling: every token but the first is a label, the first token is the only non-label
    lm = regions_from_batch({"labels": torch.tensor([[X, 4, 5, 6]]), "attention_mask": torch.ones(1, 4)})
    # that first token is "context" by label, but the first response token is position 1 -> position 0 precedes it
    assert lm.has_context.tolist() == [True]
    fully_labelled = regions_from_batch({"labels": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4)})
    assert fully_labelled.has_context.tolist() == [False]
    chat = torch.tensor([[X, X, 5, 6, X, X, 7, 8]])  # user, assistant, user, assistant
    regions = regions_from_batch({"labels": chat, "attention_mask": torch.ones(1, 8)})
    assert regions.context[0].tolist() == [True, True, False, False, True, True, False, False]
    assert regions.has_context.tolist() == [True]


def test_a_row_without_response():
    regions = regions_from_batch({"labels": torch.tensor([[X, X, X]]), "attention_mask": torch.ones(1, 3)})
    assert regions.num_response.tolist() == [0]


def test_missing_fields_are_clear_errors():
    with pytest.raises(ValueError, match="labels"):
        regions_from_batch({"input_ids": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="attention_mask"):
        regions_from_batch({"labels": torch.ones(1, 3)})
