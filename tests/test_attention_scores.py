"""The attention-score variants (`SSTokenConfig.attention_score`): sink definition, float64 references, invariances.

Every variant is checked against a plain float64 implementation written from its definition (docs/method.md), on
hand-built q/k at awkward shapes (grouped-query attention, padding on both sides, packed rows, a sliding window,
chunk sizes 1..64) and on the real attention of SmolLM2.
"""

import copy

import pytest
import torch

from trl_sstoken import SSTokenConfig
from trl_sstoken.attention.capture import ATTENTION_SCORES, AttentionCapture, context_attention_mass, sink_keys
from trl_sstoken.tiny import build_tiny_model


def reference_scores(weights, context, sink, allowed):
    """float64, from the definitions: weights (H, T, T) softmax weights of one row, context/sink (T,) bool,
    allowed (T, T) bool (which keys query i may see). Returns {score: (T,)}, 0 where a score is undefined."""
    num_heads, length, _ = weights.shape
    out = {name: torch.zeros(length, dtype=torch.float64) for name in ATTENTION_SCORES}
    for i in range(length):
        if not allowed[i].any():
            continue
        p = weights[:, i, :]
        out["context_mass"][i] = (
            sum(p[h, j] for h in range(num_heads) for j in range(length) if context[j]) / num_heads
        )
        off_sink = sum(p[h, j] for h in range(num_heads) for j in range(length) if not sink[j])
        on_context = sum(p[h, j] for h in range(num_heads) for j in range(length) if context[j] and not sink[j])
        if off_sink > 0:
            out["sink_free"][i] = on_context / off_sink
        visible = [j for j in range(length) if allowed[i, j] and not sink[j]]
        visible_context = [j for j in visible if context[j]]
        if visible_context and off_sink > 0:
            ratio = out["sink_free"][i] / (len(visible_context) / len(visible))
            out["position_corrected"][i] = ratio / (1 + ratio)
    return out


def softmax_weights(query, key, allowed, scaling):
    """(H, T, T) float64 weights of one row: query (H, T, d), key (H_kv, T, d), allowed (T, T)."""
    key = key.double().repeat_interleave(query.size(0) // key.size(0), dim=0)
    logits = query.double() @ key.transpose(-1, -2) * scaling
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)


# ----- the sink definition -----


def test_sink_is_the_first_valid_position_of_each_row():
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(sink_keys(valid), expected)


def test_sink_is_the_first_position_of_each_packed_sequence():
    """Padding-free / packed rows: every packed sequence has its own sink; padding between or after is none."""
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1]])
    valid = sequence_ids >= 0
    expected = torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(sink_keys(valid, sequence_ids), expected)


def test_multi_turn_chat_has_one_sink():
    """A multi-turn conversation is one sequence: later turns' `<|im_start|>` are context, not sinks."""
    valid = torch.ones(1, 12, dtype=torch.bool)
    sequence_ids = torch.zeros(1, 12, dtype=torch.long)
    assert sink_keys(valid, sequence_ids).nonzero().tolist() == [[0, 0]]


# ----- float64 references on hand-built q/k -----


def hand_built_case(seed, batch=3, heads=4, kv_heads=2, length=11, dim=8, padding="right", packed=False):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, dim, generator=generator) * 2
    key = torch.randn(batch, kv_heads, length, dim, generator=generator) * 2
    key[:, :, 0] += 3 * query[:, :: heads // kv_heads, 1:].mean(2)  # a sink-like first key: large logits for all
    valid = torch.ones(batch, length, dtype=torch.bool)
    if padding == "right":
        valid[1, -3:] = False
        valid[2, -5:] = False
    elif padding == "left":
        valid[1, :3] = False
        valid[2, :5] = False
    sequence_ids = torch.where(valid, torch.zeros(batch, length, dtype=torch.long), -1)
    if packed:  # row 0 holds three sequences
        sequence_ids[0] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])[:length]
        for row in range(1, batch):
            sequence_ids[row] = torch.where(valid[row], sequence_ids[0].max() + row, -1)
    context = (torch.rand(batch, length, generator=generator) > 0.4) & valid
    context[:, 0] = valid[:, 0]
    return query, key, context, valid, sequence_ids


def allowed_matrix(valid_row, sequence_row, window=None):
    length = valid_row.numel()
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid_row[None, :]
    allowed &= sequence_row[:, None] == sequence_row[None, :]
    if window is not None:
        allowed &= ~torch.ones(length, length, dtype=torch.bool).tril(-window)
    return allowed & valid_row[:, None]


@pytest.mark.parametrize("score", ATTENTION_SCORES)
@pytest.mark.parametrize("padding", ["right", "left", "none"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_scores_match_float64_reference(score, padding, packed, kv_heads, chunk_size):
    query, key, context, valid, sequence_ids = hand_built_case(
        seed=kv_heads + 10 * chunk_size, kv_heads=kv_heads, padding=padding, packed=packed
    )
    sink = sink_keys(valid, sequence_ids)
    got = context_attention_mass(
        query,
        key,
        context=context,
        key_valid=valid,
        scaling=0.35,
        sequence_ids=sequence_ids,
        chunk_size=chunk_size,
        score=score,
        sink=sink,
    )
    for row in range(query.size(0)):
        allowed = allowed_matrix(valid[row], sequence_ids[row])
        weights = softmax_weights(query[row], key[row], allowed, 0.35)
        expected = reference_scores(weights, context[row], sink[row], allowed)[score]
        torch.testing.assert_close(got[row].double(), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("score", ATTENTION_SCORES)
def test_scores_respect_a_sliding_window(score):
    """The uniform baseline of "position_corrected" counts only the keys the window lets a query see."""
    query, key, context, valid, sequence_ids = hand_built_case(seed=3, padding="none")
    window = 4
    positions = torch.arange(valid.size(1))
    model_mask = (positions[None, :] > positions[:, None] - window)[None, None].expand(valid.size(0), 1, -1, -1)
    sink = sink_keys(valid)
    got = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=0.35, attention_mask=model_mask, score=score, sink=sink
    )
    for row in range(query.size(0)):
        allowed = allowed_matrix(valid[row], sequence_ids[row], window=window)
        weights = softmax_weights(query[row], key[row], allowed, 0.35)
        expected = reference_scores(weights, context[row], sink[row], allowed)[score]
        torch.testing.assert_close(got[row].double(), expected, atol=2e-6, rtol=0)


def test_packed_row_scores_equal_the_sequences_scored_alone():
    """Packing: each packed sequence gets exactly the scores it gets alone (own sink, own context, own uniform)."""
    generator = torch.Generator().manual_seed(5)
    lengths = [5, 7, 4]
    query = torch.randn(1, 4, sum(lengths), 8, generator=generator)
    key = torch.randn(1, 2, sum(lengths), 8, generator=generator)
    context = torch.zeros(1, sum(lengths), dtype=torch.bool)
    sequence_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    start = 0
    for n in lengths:
        context[0, start : start + 3] = True
        start += n
    valid = torch.ones_like(context)
    for score in ATTENTION_SCORES:
        packed = context_attention_mass(
            query,
            key,
            context=context,
            key_valid=valid,
            scaling=0.3,
            sequence_ids=sequence_ids,
            score=score,
            sink=sink_keys(valid, sequence_ids),
        )
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            alone_valid = valid[:, part]
            alone = context_attention_mass(
                query[:, :, part],
                key[:, :, part],
                context=context[:, part],
                key_valid=alone_valid,
                scaling=0.3,
                score=score,
                sink=sink_keys(alone_valid),
            )
            torch.testing.assert_close(packed[:, part], alone, atol=1e-6, rtol=0)
            start += n


# ----- what the variants are for -----


def test_sink_free_ignores_how_much_a_single_head_puts_on_the_sink():
    """One head: raising the sink key's logits moves context_mass towards 1 but leaves sink_free unchanged."""
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 1, 8, 4, generator=generator), torch.randn(1, 1, 8, 4, generator=generator)
    query[..., 0] = query[..., 0].abs() + 1.0  # every query's logit on key 0 grows with key[..., 0, 0]
    context = torch.tensor([[True, True, True, False, False, False, False, False]])
    valid = torch.ones_like(context)
    sink = sink_keys(valid)
    results = {}
    for boost in (0.0, 20.0):
        boosted = key.clone()
        boosted[0, 0, 0, 0] += boost
        results[boost] = {
            s: context_attention_mass(
                query, boosted, context=context, key_valid=valid, scaling=1.0, score=s, sink=sink
            )
            for s in ATTENTION_SCORES
        }
    assert (results[20.0]["context_mass"][0, 1:] > 0.99).all()  # dominated by the sink
    torch.testing.assert_close(results[20.0]["sink_free"], results[0.0]["sink_free"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        results[20.0]["position_corrected"], results[0.0]["position_corrected"], atol=1e-5, rtol=0
    )


def test_a_dormant_head_gets_no_vote_in_sink_free():
    """Pooled over heads: a head with (almost) all its mass on the sink barely moves the sink-free score."""
    context = torch.tensor([[True, True, True, False, False, False]])
    valid = torch.ones_like(context)
    query = torch.zeros(1, 2, 6, 2)
    key = torch.zeros(1, 2, 6, 2)
    query[0, 0, :, 0] = 1.0  # head 0: attends to keys by key[.., 0]
    key[0, 0, 3:, 0] = 2.0  # ... and prefers the response keys
    query[0, 1, :, 1] = 1.0  # head 1: dormant, everything on the sink
    key[0, 1, 0, 1] = 50.0
    key[0, 1, 1:3, 1] = 10.0  # its tiny non-sink rest goes to the context
    sink = sink_keys(valid)
    pooled = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=1.0, score="sink_free", sink=sink
    )
    head0 = context_attention_mass(query[:, :1], key[:, :1], context=context, key_valid=valid, scaling=1.0,
                                   score="sink_free", sink=sink)  # fmt: skip
    torch.testing.assert_close(pooled[0, 3:], head0[0, 3:], atol=1e-6, rtol=0)


def test_position_corrected_is_one_half_under_uniform_attention():
    """q = 0: uniform attention. Context mass falls with position (dilution); the corrected score stays at 0.5."""
    length = 10
    query, key = torch.zeros(1, 2, length, 4), torch.randn(1, 1, length, 4)
    context = torch.zeros(1, length, dtype=torch.bool)
    context[0, :4] = True
    valid = torch.ones_like(context)
    sink = sink_keys(valid)
    mass = context_attention_mass(query, key, context=context, key_valid=valid, scaling=1.0, score="context_mass")
    corrected = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=1.0, score="position_corrected", sink=sink
    )
    response = slice(4, length)
    assert (mass[0, response].diff() < 0).all()
    torch.testing.assert_close(corrected[0, response], torch.full((length - 4,), 0.5), atol=1e-6, rtol=0)
    # above / below 1/2 = more / less context preference than uniform attention
    key[0, 0, 1:4, 0] = 5.0
    query[0, :, :, 0] = 1.0
    preferring = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=1.0, score="position_corrected", sink=sink
    )
    assert (preferring[0, response] > 0.5).all()


def test_without_sinks_sink_free_is_the_context_mass():
    query, key, context, valid, _ = hand_built_case(seed=9, padding="right")
    no_sink = torch.zeros_like(valid)
    plain = context_attention_mass(query, key, context=context, key_valid=valid, scaling=0.35)
    free = context_attention_mass(
        query, key, context=context, key_valid=valid, scaling=0.35, score="sink_free", sink=no_sink
    )
    torch.testing.assert_close(free, plain, atol=1e-6, rtol=0)


def test_unknown_score_and_missing_sink_are_refused():
    query, key = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2)
    context, valid = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_score='mean'"):
        context_attention_mass(query, key, context=context, key_valid=valid, scaling=1.0, score="mean")
    with pytest.raises(ValueError, match="needs the sink"):
        context_attention_mass(query, key, context=context, key_valid=valid, scaling=1.0, score="sink_free")


# ----- wiring: config field, capture, trainer -----


def test_config_field_validates_and_defaults_to_the_paper(tmp_path):
    config = SSTokenConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    assert config.attention_score == "context_mass"
    for score in ATTENTION_SCORES:
        SSTokenConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, attention_score=score)
    with pytest.raises(ValueError, match="attention_score='sinkfree' is not supported; allowed values"):
        SSTokenConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, attention_score="sinkfree")


@pytest.mark.parametrize("score", ATTENTION_SCORES)
def test_capture_computes_the_chosen_score_against_float64_eager(tokenizer, score):
    model = build_tiny_model(tokenizer, num_layers=2, num_heads=4, num_kv_heads=2)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(4, len(tokenizer), (2, 10), generator=generator)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    context = torch.zeros(2, 10, dtype=torch.bool)
    context[0, :4] = True
    context[1, 3:6] = True
    reference_model = copy.deepcopy(model).double()
    reference_model.set_attn_implementation("eager")
    capture = AttentionCapture(model, -1, chunk_size=3, score=score)
    with torch.no_grad(), capture.armed(context, attention_mask.bool()):
        model(input_ids=input_ids, attention_mask=attention_mask)
    got = capture.take()
    for row in range(2):
        keep = attention_mask[row].bool()
        with torch.no_grad():
            weights = reference_model(input_ids=input_ids[row, keep][None], output_attentions=True).attentions[-1][0]
        n = int(keep.sum())
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        sink = torch.zeros(n, dtype=torch.bool)
        sink[0] = True
        expected = reference_scores(weights, context[row, keep], sink, allowed)[score]
        torch.testing.assert_close(got[row, keep].double(), expected, atol=1e-5, rtol=0)
        assert (got[row, ~keep] == 0).all()


def test_capture_refuses_an_unknown_score(tokenizer):
    model = build_tiny_model(tokenizer, num_layers=2)
    with pytest.raises(ValueError, match="attention_score='x'"):
        AttentionCapture(model, -1, score="x")


def test_trainer_passes_the_score_to_the_capture(tokenizer, tmp_path):
    from datasets import Dataset

    from trl_sstoken import SSTokenTrainer

    model = build_tiny_model(tokenizer, num_layers=2)
    rows = [{"prompt": "a b c", "completion": " d e f"}] * 4
    args = SSTokenConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_steps=1,
        per_device_train_batch_size=2,
        attention_score="sink_free",
        selection_method="attention",
    )
    trainer = SSTokenTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer._attention.score == "sink_free"
    trainer.train()


# ----- real attention (SmolLM2) -----


@pytest.mark.real_model
def test_scores_on_smollm2_match_float64_eager(smollm2_dir):
    """Real attention, real sink: every score against float64 eager weights of the same (padded) chat batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    texts = [("What is 12 + 7?", "Sure! The answer is 19."), ("Reverse: fig, pear.", "pear, fig")]
    rows, contexts = [], []
    for prompt, answer in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        contexts.append(len(ids))
        rows.append(ids + tokenizer(answer, add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])  # left padding
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    context = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, contexts, strict=False)):
        context[i, width - len(r) : width - len(r) + n] = True
    layers = [model.config.num_hidden_layers - 1, model.config.num_hidden_layers // 2]
    reference_model = copy.deepcopy(model).double()
    reference_model.set_attn_implementation("eager")
    for score in ATTENTION_SCORES:
        for layer in layers:
            capture = AttentionCapture(model, layer, score=score)
            with torch.no_grad(), capture.armed(context, attention_mask.bool()):
                model(input_ids=input_ids, attention_mask=attention_mask)
            got = capture.take()
            capture.remove()
            for row in range(len(rows)):
                keep = attention_mask[row].bool()
                with torch.no_grad():
                    out = reference_model(input_ids=input_ids[row, keep][None], output_attentions=True)
                n = int(keep.sum())
                sink = torch.zeros(n, dtype=torch.bool)
                sink[0] = True
                expected = reference_scores(
                    out.attentions[layer][0], context[row, keep], sink, torch.ones(n, n, dtype=torch.bool).tril()
                )[score]
                response = ~context[row, keep]
                torch.testing.assert_close(got[row, keep][response].double(), expected[response], atol=2e-4, rtol=0)
