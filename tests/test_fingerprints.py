"""The model identity of the history cache: it must notice any changed weight, and work at real-model sizes."""

import pytest
import torch
from conftest import lora_config
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_sstoken.history.fingerprints import model_fingerprint, tokenizer_fingerprint
from trl_sstoken.tiny import build_tiny_model


def changed_copy(model, name, index, delta=1.0):
    """A copy of `model` whose parameter `name` differs at one flat position."""
    copy = build_tiny_model_like(model)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        dict(copy.named_parameters())[name].view(-1)[index] += delta
    return copy


def build_tiny_model_like(model):
    return type(model)(model.config)


def test_same_weights_same_fingerprint_and_any_changed_position_is_noticed(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=2)
    same = build_tiny_model_like(model)
    same.load_state_dict(model.state_dict())
    assert model_fingerprint(same) == model_fingerprint(model)
    name = "model.layers.1.mlp.up_proj.weight"
    numel = dict(model.named_parameters())[name].numel()
    # positions between the 1024 evenly spaced samples the old fingerprint read: every one must be noticed now
    for index in (1, numel // 3 + 1, numel - 2):
        assert model_fingerprint(changed_copy(model, name, index)) != model_fingerprint(model), index


def test_dtype_and_config_are_part_of_the_identity(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=2)
    assert model_fingerprint(model.to(torch.bfloat16)) != model_fingerprint(model.float())
    other = build_tiny_model(tokenizer, num_layers=2)
    other.load_state_dict(model.state_dict())
    other.config.rope_parameters = {**other.config.rope_parameters, "rope_theta": 1234.0}
    assert model_fingerprint(other) != model_fingerprint(model)


def test_a_peft_wrapped_base_has_the_fingerprint_of_the_plain_model(tokenizer):
    """The trainer fingerprints `get_base_model()` of a PEFT model: adapter weights and wrapper names must not count."""
    model = build_tiny_model(tokenizer, num_layers=2)
    plain = model_fingerprint(model)
    peft_model = get_peft_model(model, lora_config(init_lora_weights=False))
    assert model_fingerprint(peft_model.get_base_model()) == plain


def test_a_tensor_above_two_to_the_24_elements(tokenizer):
    """SmolLM2's tied 49152 x 576 embedding crashed the float32 linspace indices (IndexError at 28311552)."""
    model = build_tiny_model(tokenizer, num_layers=1, hidden_size=16)
    model.resize_token_embeddings(2**24 // 16 + 7)  # 16 777 328 elements, > 2^24
    before = model_fingerprint(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.view(-1)[-1] += 1.0
    assert model_fingerprint(model) != before


@pytest.mark.parametrize("quantization", ["nf4", "8bit"])
def test_quantized_weights_are_hashed_as_stored(tmp_path, tokenizer, quantization):
    pytest.importorskip("bitsandbytes")
    build_tiny_model(tokenizer, hidden_size=64).save_pretrained(tmp_path)
    settings = (
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if quantization == "nf4"
        else dict(load_in_8bit=True)
    )
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tmp_path, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
    )
    model, again = load(), load()
    assert model_fingerprint(model) == model_fingerprint(again)
    packed = model.model.layers[0].mlp.up_proj.weight
    assert packed.dtype in (torch.uint8, torch.int8)  # the stored (packed / quantized) bytes, not a float view
    with torch.no_grad():
        packed.view(-1)[5] += 1
    assert model_fingerprint(model) != model_fingerprint(again)
    if quantization == "nf4":  # the quantization state is part of the weight too
        again.model.layers[0].mlp.up_proj.weight.quant_state.absmax[0] *= 2
        assert model_fingerprint(again) != model_fingerprint(load())


def test_the_tokenizer_fingerprint_ignores_the_last_padding_and_truncation_call(tiny_model_dir):
    """A fast tokenizer keeps the padding and truncation settings of its last call in its backend; they do not change
    how text becomes ids, so a tokenizer used for a padded batch (e.g. generation) still matches its cache/reference.
    Before the fix the fingerprint changed after such a call and a valid Rho-1 reference was refused."""
    from trl_sstoken.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    fresh = tokenizer_fingerprint(tokenizer)
    tokenizer(["what is", "what is two plus three"], padding=True, truncation=True, max_length=3)
    assert tokenizer_fingerprint(tokenizer) == fresh
    tokenizer.add_tokens(["a-new-token"])
    assert tokenizer_fingerprint(tokenizer) != fresh  # what does change the ids still changes the fingerprint
