import copy

import pytest
import torch

from trl_sstoken.attention.capture import AttentionCapture, context_attention_mass
from trl_sstoken.tiny import build_tiny_model


LENGTH = 12


def batch_with_padding(vocab_size, padding, batch_size=3, seed=0):
    """input_ids, attention_mask and a context mask (first few valid tokens of each row) for one padding side."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (batch_size, LENGTH), generator=generator)
    lengths = [LENGTH, LENGTH - 3, LENGTH - 5] if padding != "none" else [LENGTH] * batch_size
    attention_mask = torch.zeros(batch_size, LENGTH, dtype=torch.long)
    context = torch.zeros(batch_size, LENGTH, dtype=torch.bool)
    for row, length in enumerate(lengths[:batch_size]):
        start = LENGTH - length if padding == "left" else 0
        attention_mask[row, start : start + length] = 1
        context[row, start : start + 4] = True  # the "prompt": the first 4 real tokens
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    return input_ids, attention_mask, context


def eager_reference(model, layer, input_ids, attention_mask, context):
    """Head-mean softmax mass on context keys, from float64 eager attention weights of each row run unpadded.

    Running every row alone, without padding, keeps the reference free of padding effects (fully masked rows make
    eager attention produce NaN with left padding); RoPE makes attention depend on relative positions only, so
    the unpadded row sees the same attention as its padded copy.
    """
    reference_model = copy.deepcopy(model).double()
    reference_model.set_attn_implementation("eager")
    expected = torch.zeros(input_ids.shape, dtype=torch.float64)
    for row in range(input_ids.size(0)):
        valid = attention_mask[row].bool()
        with torch.no_grad():
            out = reference_model(input_ids=input_ids[row, valid][None], output_attentions=True)
        weights = out.attentions[layer][0]  # (H, t, t)
        expected[row, valid] = (weights * context[row, valid].double()).sum(-1).mean(0)
    return expected


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", ["right", "left", "none"])
@pytest.mark.parametrize("layer", [0, -1])
def test_statistic_matches_float64_eager_reference(tokenizer, architecture, implementation, padding, layer):
    model = build_tiny_model(
        tokenizer,
        architecture=architecture,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        attn_implementation=implementation,
    )
    input_ids, attention_mask, context = batch_with_padding(len(tokenizer), padding)
    expected = eager_reference(model, layer, input_ids, attention_mask, context)
    capture = AttentionCapture(model, layer, chunk_size=5)
    with torch.no_grad(), capture.armed(context, attention_mask.bool()):
        model(input_ids=input_ids, attention_mask=attention_mask)
    got = capture.take()
    valid = attention_mask.bool()
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-5, rtol=0)
    assert (got[~valid] == 0).all()


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_grouped_query_attention_against_repeat_kv(num_kv_heads):
    generator = torch.Generator().manual_seed(num_kv_heads)
    batch, heads, length, dim = 2, 4, 9, 8
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key = torch.randn(batch, num_kv_heads, length, dim, generator=generator)
    context = torch.rand(batch, length, generator=generator) > 0.5
    valid = torch.ones(batch, length, dtype=torch.bool)
    full_key = key.repeat_interleave(heads // num_kv_heads, dim=1).double()
    logits = query.double() @ full_key.transpose(-1, -2) * dim**-0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    expected = (weights * context[:, None, None, :]).sum(-1).mean(1)
    for chunk_size in (1, 4, 64):
        got = context_attention_mass(
            query, key, context=context, key_valid=valid, scaling=dim**-0.5, chunk_size=chunk_size
        )
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_causal_mask_applies_even_when_the_model_passes_none():
    """The reference code's recompute variant went bidirectional without padding; here the future stays hidden."""
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 2, 6, 4, generator=generator), torch.randn(1, 2, 6, 4, generator=generator)
    context = torch.zeros(1, 6, dtype=torch.bool)
    context[0, 5] = True  # only the last key is "context": no earlier query may see it
    got = context_attention_mass(
        query, key, context=context, key_valid=torch.ones(1, 6, dtype=torch.bool), scaling=0.5
    )
    assert (got[0, :5] == 0).all() and got[0, 5] > 0


def test_model_mask_narrows_but_never_widens():
    query, key = torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    context = torch.tensor([[True, False, False, False]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    everything = torch.ones(1, 1, 4, 4, dtype=torch.bool)  # a (wrong) bidirectional model mask
    window = torch.ones(4, 4, dtype=torch.bool).tril().triu(-1)[None, None]  # sliding window of 2
    plain = context_attention_mass(query, key, context=context, key_valid=valid, scaling=1.0)
    widened = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=1.0, attention_mask=everything
    )
    narrowed = context_attention_mass(query, key, context=context, key_valid=valid, scaling=1.0, attention_mask=window)
    torch.testing.assert_close(widened, plain)
    assert narrowed[0, 0] == 1 and narrowed[0, 1] > 0 and (narrowed[0, 2:] == 0).all()


@pytest.mark.smoke
def test_logits_and_gradients_are_unchanged(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=2)
    input_ids, attention_mask, context = batch_with_padding(len(tokenizer), "right")
    reference = copy.deepcopy(model)
    capture = AttentionCapture(model, -1)
    with capture.armed(context, attention_mask.bool()):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    logits.square().mean().backward()
    expected.square().mean().backward()
    for (name, param), (_, ref_param) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(param.grad, ref_param.grad, atol=0, rtol=0, msg=name)
    capture.remove()
    assert model.config._attn_implementation == "sdpa"


def test_computed_once_per_step_under_gradient_checkpointing(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    input_ids, attention_mask, context = batch_with_padding(len(tokenizer), "right")
    capture = AttentionCapture(model, -1)
    calls = []
    original_record = capture.record
    capture.record = lambda *args: (calls.append(capture._armed is not None), original_record(*args))
    with capture.armed(context, attention_mask.bool()):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    first = capture.take()
    loss.backward()  # recomputes the layer's forward: the capture must not fire again
    assert calls == [True, False]  # the layer ran twice, the statistic was computed once
    assert capture.num_computations == 1
    with pytest.raises(RuntimeError, match="not captured"):
        capture.take()
    assert first.shape == input_ids.shape


def test_negative_layer_counts_from_the_end(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=3)
    assert AttentionCapture(model, -1).module is model.model.layers[2].self_attn


@pytest.mark.parametrize("layer", [3, -4, 10])
def test_out_of_range_layer_names_the_field(tokenizer, layer):
    model = build_tiny_model(tokenizer, num_layers=3)
    with pytest.raises(ValueError, match=r"attention_layer=.*-3 to 2"):
        AttentionCapture(model, layer)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_only_needed_queries_are_computed_and_they_are_unchanged(chunk_size):
    generator = torch.Generator().manual_seed(7)
    query, key = torch.randn(2, 4, 10, 8, generator=generator), torch.randn(2, 2, 10, 8, generator=generator)
    context = torch.rand(2, 10, generator=generator) > 0.5
    valid = torch.ones(2, 10, dtype=torch.bool)
    needed = torch.zeros(2, 10, dtype=torch.bool)
    needed[0, 7:] = True
    needed[1, 8] = True
    full = context_attention_mass(query, key, context=context, key_valid=valid, scaling=0.3, chunk_size=chunk_size)
    part = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=0.3, chunk_size=chunk_size, query_needed=needed
    )
    rows_needed = needed.any(0)
    torch.testing.assert_close(part[:, rows_needed], full[:, rows_needed])
    if chunk_size == 1:
        assert (part[:, ~rows_needed] == 0).all()
