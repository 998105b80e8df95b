"""The attention capture on every architecture family it claims: found by how the model calls its attention.

Each architecture is built tiny from its config; the captured statistic must equal a float64 eager reference at the
first and the last attention layer, and `attention_layer=-1` must be the last layer that *has* attention (hybrids
interleave attention with Mamba layers). Real pretrained Llama (SmolLM2) and Gemma3 are checked in
tests/test_real_models.py.
"""

import copy

import pytest
import torch
import transformers
from conftest import config, lora_config
from test_attention import batch_with_padding

from trl_sstoken import SSTokenTrainer
from trl_sstoken.attention.capture import AttentionCapture, AttentionUnavailableError, attention_modules


def tiny_config(architecture, vocab_size):
    common = dict(vocab_size=vocab_size, max_position_embeddings=64)
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    if architecture == "gpt_neox":  # Pythia: modules named `*.attention`, partial rotary
        return transformers.GPTNeoXConfig(
            **common, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
        )
    if architecture == "nemotron_h":  # hybrid: Mamba2 mixers with two attention mixers between them
        return transformers.NemotronHConfig(
            **common,
            hidden_size=32,
            num_hidden_layers=5,
            hybrid_override_pattern="M*M*M",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=8,
            n_groups=1,
        )
    if architecture == "gemma3":  # sliding-window layers, q/k norm, query_pre_attn_scalar
        return transformers.Gemma3TextConfig(
            **common,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            sliding_window=4,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if architecture == "qwen3":  # q/k norm
        return transformers.Qwen3Config(
            **common,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
        )
    if architecture == "phi3":  # fused qkv projection
        return transformers.Phi3Config(
            **common,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            pad_token_id=1,
        )
    raise ValueError(architecture)


ATTENTION_LAYERS = {"gpt2": 3, "gpt_neox": 3, "nemotron_h": 2, "gemma3": 3, "qwen3": 3, "phi3": 3}


def build(architecture, tokenizer):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(architecture, len(tokenizer)))
    return model.eval()  # GPT2 has attention dropout: the reference must see the same weights


def eager_reference(model, layer, input_ids, attention_mask, context):
    """Head-mean float64 eager attention mass on context keys, each row run alone and unpadded."""
    reference = copy.deepcopy(model).double()
    reference.set_attn_implementation("eager")
    expected = torch.zeros(input_ids.shape, dtype=torch.float64)
    for row in range(input_ids.size(0)):
        valid = attention_mask[row].bool()
        with torch.no_grad():
            attentions = reference(input_ids=input_ids[row, valid][None], output_attentions=True).attentions
        weights = [a for a in attentions if a is not None][layer][0]  # (H, t, t); hybrids return attention layers only
        expected[row, valid] = (weights * context[row, valid].double()).sum(-1).mean(0)
    return expected


@pytest.mark.parametrize("architecture", sorted(ATTENTION_LAYERS))
def test_attention_layers_are_found_by_how_the_model_calls_attention(tokenizer, architecture):
    model = build(architecture, tokenizer)
    modules = attention_modules(model)
    assert len(modules) == ATTENTION_LAYERS[architecture]
    assert AttentionCapture(model, -1).module is modules[-1]


@pytest.mark.parametrize("architecture", sorted(ATTENTION_LAYERS))
@pytest.mark.parametrize("layer", [0, -1])
def test_statistic_matches_float64_eager_reference(tokenizer, architecture, layer):
    model = build(architecture, tokenizer)
    # GPT2 learns absolute positions, so a left-padded row is not its unpadded copy: right padding for all
    input_ids, attention_mask, context = batch_with_padding(len(tokenizer), "right")
    expected = eager_reference(model, layer, input_ids, attention_mask, context)
    capture = AttentionCapture(model, layer, chunk_size=5)
    with torch.no_grad(), capture.armed(context, attention_mask.bool()):
        model(input_ids=input_ids, attention_mask=attention_mask)
    got = capture.take()
    valid = attention_mask.bool()
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-5, rtol=0)


def test_hybrid_last_layer_is_the_last_attention_mixer(tokenizer):
    model = build("nemotron_h", tokenizer)
    capture = AttentionCapture(model, -1)
    assert capture.module is model.model.layers[3].mixer  # pattern M*M*M: layers 1 and 3 attend


@pytest.mark.parametrize("architecture", ["gpt_neox", "nemotron_h"])
def test_sstoken_trains_on_architectures_without_self_attn_modules(tmp_path, tokenizer, dataset, architecture):
    trainer = SSTokenTrainer(
        model=build(architecture, tokenizer).train(),
        args=config(tmp_path, max_steps=2, attention_warmup_ratio=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
        # PEFT refuses LoRA on Mamba's out_proj and conv1d: the attention and MLP projections are enough here
        peft_config=lora_config(target_modules=["q_proj", "k_proj", "v_proj", "query_key_value", "up_proj"]),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sstoken/attention_mean" in entry]
    assert len(logs) == 2 and all(0 < entry["sstoken/attention_mean"] <= 1 for entry in logs)


@pytest.mark.parametrize("model_class", ["BloomForCausalLM", "FalconForCausalLM"])
def test_attention_outside_the_interface_is_refused_clearly(tokenizer, model_class):
    """ALiBi (Bloom) and Falcon's own sdpa call never reach AttentionInterface: the statistic cannot be taken."""
    configs = {
        "BloomForCausalLM": transformers.BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4),
        "FalconForCausalLM": transformers.FalconConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        ),
    }
    model = getattr(transformers, model_class)(configs[model_class])
    with pytest.raises(AttentionUnavailableError, match="AttentionInterface.*allow_rel_fallback=True"):
        AttentionCapture(model, -1)
