"""The product on real pretrained LLMs: SmolLM2-135M-Instruct (Llama) and gemma-3-270m (Gemma3, sliding windows).

The models come from package-registry wheels (tools.real_models), converted once per machine; a missing model
is a failure, unless TRL_SSTOKEN_SKIP_REAL_MODELS=1 skips this file on purpose. Everything runs in bf16 on the CPU
with short sequences and a few steps, so the tier stays within a few minutes on two cores.
"""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICKSTART_ROWS, config
from datasets import Dataset
from peft import LoraConfig, PeftModel
from test_visualize import parse_spans
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from trl_sstoken import SSTokenTrainer, cli
from trl_sstoken.attention.capture import AttentionCapture


pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parent.parent
MODELS = ["smollm2", "gemma3"]
SMOLLM2_TEMPLATE = REPO / "examples" / "chat_templates" / "smollm2_generation.jinja"
GEMMA3_TEMPLATE = REPO / "examples" / "chat_templates" / "gemma3_generation.jinja"
CHATS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "The capital of Germany is Berlin."},
    ],
    [
        {"role": "user", "content": "Add 12 and 7."},
        {"role": "assistant", "content": "12 + 7 = 19."},
        {"role": "user", "content": "Now subtract 4 from that."},
        {"role": "assistant", "content": "19 - 4 = 15."},
    ],
] * 4


@pytest.fixture(autouse=True)
def both_cores():
    """conftest pins one thread for the tiny models; a real model's matmuls are worth both cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads() if threads > 1 else 2)))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def load(model_dir, quantization=None, dtype=torch.bfloat16):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = dict(dtype=dtype)
    if quantization is not None:
        kwargs = dict(quantization_config=quantization, device_map="cpu", dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), tokenizer


def prompt_completion(rows=QUICKSTART_ROWS, count=16):
    return Dataset.from_list([dict(row) for row in rows[:count]])


def conversational(count=16):
    """TRL's conversational prompt-completion format: the completion alone is trained on (completion_only_loss)."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in QUICKSTART_ROWS[:count]
        ]
    )


def with_template(tokenizer, name):
    tokenizer.chat_template = (SMOLLM2_TEMPLATE if name == "smollm2" else GEMMA3_TEMPLATE).read_text()
    return tokenizer


def real_trainer(
    tmp_path,
    model_dir,
    dataset=None,
    quantization=None,
    tokenizer_setup=None,
    lora=None,
    dtype=torch.bfloat16,
    **overrides,
):
    model, tokenizer = load(model_dir, quantization, dtype)
    if tokenizer_setup is not None:
        tokenizer = tokenizer_setup(tokenizer)
    settings = dict(
        max_steps=3, per_device_train_batch_size=4, learning_rate=2e-3, max_length=48, attention_warmup_ratio=0.0
    )
    settings.update(overrides)
    return SSTokenTrainer(
        model=model,
        args=config(tmp_path, **settings),
        train_dataset=prompt_completion() if dataset is None else dataset,
        processing_class=tokenizer,
        peft_config=lora or LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )


def adapter_snapshot(model, adapter="default"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f"lora_B.{adapter}." in n}


def selection_logs(trainer):
    return [entry for entry in trainer.state.log_history if "sstoken/selected_fraction" in entry]


# ----- training with every history mode -----


@pytest.mark.parametrize("model_dir", MODELS, indirect=True)
@pytest.mark.parametrize("history", ["base", "lagged", "ema", "cached"])
def test_lora_training_with_every_history_mode(tmp_path, model_dir, history):
    settings = (
        dict(history="base", history_cache_dir=str(tmp_path / "cache"))
        if history == "cached"
        else dict(history=history, history_update_steps=1, history_ema_alpha=0.5)
    )
    trainer = real_trainer(tmp_path, model_dir, **settings)
    before = adapter_snapshot(trainer.model)
    trainer.train()
    logs = selection_logs(trainer)
    assert len(logs) == 3
    assert all(math.isfinite(entry["sstoken/rel_mean"]) and 0 < entry["sstoken/attention_mean"] <= 1 for entry in logs)
    assert all(0.6 <= entry["sstoken/selected_fraction"] < 0.75 for entry in logs)  # ceil(0.6 n) / n, short answers
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    after = adapter_snapshot(trainer.model)
    assert all(not torch.equal(before[name], after[name]) for name in before)  # the adapter trained
    if history in ("lagged", "ema"):
        history_weights = adapter_snapshot(trainer.model, "history")
        assert len(history_weights) == len(after)
        assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if ".history." in n)
        if history == "lagged":  # refreshed after every step: equal to the adapter now
            assert all(torch.equal(history_weights[n.replace(".default.", ".history.")], p) for n, p in after.items())
        else:  # moved half-way each step: between its start (zero B) and the adapter
            assert all(
                not torch.equal(history_weights[n.replace(".default.", ".history.")], p) for n, p in after.items()
            )
    if history == "cached":
        assert (tmp_path / "cache" / "history_logprobs.safetensors").is_file()


@pytest.mark.parametrize("model_dir", MODELS, indirect=True)
def test_cached_history_matches_the_on_the_fly_history(tmp_path, model_dir):
    """The cache comes from other batch shapes (its own batch size and padding, no grad, eval mode), so its
    log-probs are not bit-equal to the on-the-fly ones. In float32 they agree within 2e-3 nats, and the same tokens
    are selected except where two REL values of a sequence are that close. (In bf16 the same comparison measured up
    to 0.08 nats on SmolLM2 and 0.29 on gemma: docs/real-models.md.)"""
    tolerance = 2e-3
    dataset = prompt_completion(count=12)
    settings = dict(selection_method="rel", per_device_train_batch_size=6, dtype=torch.float32)
    on_the_fly = real_trainer(tmp_path / "a", model_dir, dataset, **settings)
    cached = real_trainer(tmp_path / "b", model_dir, dataset, history_cache_dir=str(tmp_path / "cache"), **settings)
    for trainer in (on_the_fly, cached):  # the adapter moves the current model away from the base
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B.default" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    batch = next(iter(on_the_fly.get_train_dataloader()))
    expected, got = on_the_fly.preview_selection(batch), cached.preview_selection(batch)
    response = expected.regions.response
    difference = (expected.rel - got.rel)[response].abs()
    assert difference.max() <= tolerance, difference.max()
    assert (expected.rel[response] != 0).any()
    differing = expected.keep != got.keep
    if differing.any():  # only near-ties may flip: each flipped token's REL is within tolerance of a kept/dropped one
        for row, column in differing.nonzero().tolist():
            row_rel = expected.rel[row][response[row]]
            assert (row_rel - expected.rel[row, column]).abs().sort().values[1] <= 2 * tolerance
    assert differing.sum() <= 0.05 * response.sum()


@pytest.mark.parametrize("history", ["base", "lagged", "ema"])
def test_qlora_4bit_on_smollm2_with_each_history(tmp_path, smollm2_dir, history):
    pytest.importorskip("bitsandbytes")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    trainer = real_trainer(
        tmp_path,
        smollm2_dir,
        quantization=quantization,
        history=history,
        history_update_steps=1,
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=40,
    )
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    before = adapter_snapshot(trainer.model)
    trainer.train()
    logs = selection_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(entry["sstoken/rel_mean"]) for entry in logs)
    after = adapter_snapshot(trainer.model)
    assert all(not torch.equal(before[name], after[name]) for name in before)


# ----- the attention statistic on real architectures -----


@pytest.fixture(scope="module")
def float32_models(request):
    """float32 eval copies of the real models, loaded once for the statistic tests."""
    loaded = {}

    def get(name):
        if name not in loaded:
            model, tokenizer = load(request.getfixturevalue(f"{name}_dir"))
            loaded[name] = (model.float().eval(), tokenizer)
        return loaded[name]

    return get


def float64_reference(model, layer, input_ids, attention_mask, context):
    """Head-mean float64 eager attention mass on context keys, each row run alone and unpadded, through the decoder
    truncated after `layer` (the statistic of layer l depends on layers <= l only; no LM head)."""
    decoder, layers = model.model, model.model.layers
    decoder.layers = layers[: layer % len(layers) + 1]
    try:
        reference = copy.deepcopy(decoder).double()
    finally:
        decoder.layers = layers
    reference.set_attn_implementation("eager")
    expected = torch.zeros(input_ids.shape, dtype=torch.float64)
    for row in range(input_ids.size(0)):
        valid = attention_mask[row].bool()
        with torch.no_grad():
            weights = reference(input_ids=input_ids[row, valid][None], output_attentions=True).attentions[-1][0]
        expected[row, valid] = (weights * context[row, valid].double()).sum(-1).mean(0)
    return expected


def real_batch(tokenizer, lengths, prompt_fraction=0.5, seed=0):
    """Right-padded rows of real text: the first part of each row is the context."""
    text = " ".join(row["prompt"] + row["completion"] for row in QUICKSTART_ROWS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    context = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        start = int(torch.randint(0, len(ids) - length, (1,), generator=generator))
        input_ids[row, :length] = torch.tensor(ids[start : start + length])
        if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:  # gemma: every sequence starts with <bos>
            input_ids[row, 0] = tokenizer.bos_token_id
        attention_mask[row, :length] = 1
        context[row, : int(length * prompt_fraction)] = True
    return input_ids, attention_mask, context


@pytest.mark.parametrize(
    ("name", "layer", "lengths"),
    [
        ("smollm2", 0, (40, 29)),
        ("smollm2", 14, (40, 29)),
        ("smollm2", -1, (40, 29)),
        ("gemma3", 0, (600, 540)),  # a sliding-window layer (512) with rows longer than the window
        ("gemma3", 5, (80, 61)),  # the first full-attention layer
        ("gemma3", 8, (600, 540)),  # a middle sliding-window layer
        ("gemma3", -1, (60, 41)),  # the last layer (full attention)
    ],
)
def test_statistic_matches_float64_eager_reference_on_real_models(float32_models, name, layer, lengths):
    model, tokenizer = float32_models(name)
    # long gemma rows: a short context, so that late queries of a sliding-window layer (512) cannot see it
    input_ids, attention_mask, context = real_batch(
        tokenizer, lengths, prompt_fraction=0.1 if lengths[0] > 512 else 0.5
    )
    expected = float64_reference(model, layer, input_ids, attention_mask, context)
    capture = AttentionCapture(model, layer, chunk_size=128)
    try:
        with torch.no_grad(), capture.armed(context, attention_mask.bool()):
            model.model(input_ids=input_ids, attention_mask=attention_mask)  # the decoder: no 262k-vocab LM head
        got = capture.take()
    finally:
        capture.remove()
    valid = attention_mask.bool()
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=2e-4, rtol=0)
    if lengths[0] > 512:  # the window really cut: queries 512 or more after the context end see none of it
        assert context[0].sum() == 60 and (expected[0, 60 + 512 :] == 0).all() and (got[0, 60 + 512 :] == 0).all()
        assert (got[0, 60 : 60 + 400] > 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_multi_turn_context_attention_in_a_training_batch(tmp_path, request, name):
    """Through the real chat template: context = every non-assistant token before the query, the first turn's answer
    excluded; the trainer's statistic equals the float64 reference computed from the batch's own labels."""
    model_dir = request.getfixturevalue(f"{name}_dir")
    trainer = real_trainer(
        tmp_path,
        model_dir,
        Dataset.from_list([{"messages": chat} for chat in CHATS[:2]]),
        tokenizer_setup=lambda t: with_template(t, name),
        assistant_only_loss=True,
        max_length=128,
        selection_method="attention",
        per_device_train_batch_size=2,
        dtype=torch.float32,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    selection = trainer.preview_selection(batch)
    labels, attention_mask = batch["labels"], batch["attention_mask"]
    context = (labels == -100) & attention_mask.bool()
    # two assistant turns per chat: the second turn's tokens see the first answer, which is not context
    for row in range(labels.size(0)):
        response = (labels[row] != -100).nonzero().flatten()
        gaps = (response[1:] - response[:-1] > 1).nonzero()
        assert len(gaps) == 1, "expected two separate assistant turns"
    base = trainer.model.get_base_model()
    with trainer.model.disable_adapter():  # the adapter starts at zero: the reference model is the base
        expected = float64_reference(base.float(), -1, batch["input_ids"], attention_mask, context)
    response = selection.regions.response
    torch.testing.assert_close(selection.attention[response].double(), expected[:, 1:][response], atol=2e-4, rtol=0)


# ----- data shapes through real chat templates -----


def test_smollm2_template_with_generation_markers_renders_the_same_text(smollm2_dir):
    """docs/real-models.md: SmolLM2's template lacks {% generation %}; the marked copy renders identical text."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    original = tokenizer.apply_chat_template(CHATS[0], tokenize=False)
    marked = with_template(AutoTokenizer.from_pretrained(smollm2_dir), "smollm2")
    assert marked.apply_chat_template(CHATS[0], tokenize=False) == original
    rendered = marked.apply_chat_template(CHATS[0], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    assistant_text = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert assistant_text == "The capital of France is Paris.<|im_end|>The capital of Germany is Berlin.<|im_end|>"
    with pytest.raises(Exception, match="generation"):  # the original template cannot do assistant_only_loss
        SSTokenTrainer(
            model=load(smollm2_dir)[0],
            args=config(Path("/tmp/unused"), assistant_only_loss=True),
            train_dataset=Dataset.from_list([{"messages": CHATS[0]}]),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", ["prompt-completion", "conversational", "multi-turn"])
def test_data_formats_through_the_real_chat_template(tmp_path, request, name, data):
    model_dir = request.getfixturevalue(f"{name}_dir")
    datasets = {
        "prompt-completion": prompt_completion(count=8),
        "conversational": conversational(count=8),
        "multi-turn": Dataset.from_list([{"messages": chat} for chat in CHATS]),
    }
    overrides = dict(assistant_only_loss=True, max_length=96) if data == "multi-turn" else {}
    needs_template = data != "prompt-completion" and name == "gemma3"  # the base model ships no chat template
    setup = (lambda t: with_template(t, name)) if needs_template or data == "multi-turn" else None
    trainer = real_trainer(tmp_path, model_dir, datasets[data], tokenizer_setup=setup, max_steps=2, **overrides)
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = trainer.processing_class
    answers = [tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    assert all(answer.strip() for answer in answers)
    if data == "multi-turn":  # exactly the assistant turns are trained on, end-of-turn included
        end = "<|im_end|>" if name == "smollm2" else "<end_of_turn>"
        assert all(answer.count(end) == 2 and "user" not in answer for answer in answers), answers
    trainer.train()
    logs = selection_logs(trainer)
    assert len(logs) == 2 and all(entry["sstoken/no_context_sequences"] == 0 for entry in logs)


@pytest.mark.parametrize("layout", ["packing", "padding_free"])
def test_packing_and_padding_free_select_like_padded_batches(tmp_path, smollm2_dir, layout):
    dataset = prompt_completion(count=8)
    padded = real_trainer(
        tmp_path / "padded",
        smollm2_dir,
        dataset,
        selection_method="attention",
        per_device_train_batch_size=8,
        max_length=48,
    )
    overrides = dict(packing=True, packing_strategy="bfd") if layout == "packing" else dict(padding_free=True)
    other = real_trainer(
        tmp_path / layout,
        smollm2_dir,
        dataset,
        selection_method="attention",
        per_device_train_batch_size=8,
        max_length=None if layout == "padding_free" else 512,
        **overrides,
    )
    padded_batch = next(iter(padded.get_train_dataloader()))
    other_batch = next(iter(other.get_train_dataloader()))
    assert "attention_mask" not in other_batch and other_batch["input_ids"].size(0) == 1

    def kept_answers(trainer, batch):
        """{answer text: kept token texts} per sequence, independent of the batch layout."""
        selection = trainer.preview_selection(batch)
        ids, keep, response = batch["input_ids"], selection.keep, selection.regions.response
        sequence_ids = selection.regions.sequence_ids[:, 1:]
        result = {}
        for row in range(ids.size(0)):
            for sequence in sequence_ids[row][response[row]].unique().tolist():
                columns = (sequence_ids[row] == sequence) & response[row]
                targets = ids[row, 1:][columns]
                kept = keep[row][columns]
                result[tuple(targets.tolist())] = tuple(kept.tolist())
        return result

    expected, got = kept_answers(padded, padded_batch), kept_answers(other, other_batch)
    shared = set(expected) & set(got)
    assert len(shared) >= 4
    same = sum(expected[answer] == got[answer] for answer in shared)
    assert same >= len(shared) - 1  # bf16 kernels over other shapes may flip one near-tie


# ----- the selection report, saving, the CLI -----


def test_inspect_report_on_real_bpe_tokens(tmp_path, smollm2_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in prompt_completion(count=6)))
    report = tmp_path / "report.html"
    status = cli.main(
        [
            "inspect",
            "--model_name_or_path",
            str(smollm2_dir),
            "--dataset_name",
            str(data),
            "--selection_method",
            "attention",
            "--num_examples",
            "4",
            "--max_length",
            "64",
            "--use_cpu",
            "--bf16",
            "false",
            "--report_path",
            str(report),
        ]
    )
    assert status == 0, capsys.readouterr().err
    spans = [span for span in parse_spans(report.read_text()) if "data-kept" in span]
    texts = "".join(span["text"] for span in spans)
    assert "black" in texts and "sure" in texts  # real BPE pieces, shown as text (no byte-level 'Ġ' markers)
    assert "Ġ" not in texts
    assert {span["data-kept"] for span in spans} == {"0", "1"}


def test_save_reload_with_peft_generate_and_model_card(tmp_path, smollm2_dir):
    trainer = real_trainer(tmp_path, smollm2_dir, history="lagged", history_update_steps=1, max_steps=2)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "history").exists()
    card = (out / "README.md").read_text()
    assert "ssToken" in card and "| `history` | `'lagged'` |" in card
    base, tokenizer = load(smollm2_dir)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    trained = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n and ".default." in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :]).strip()


def test_cli_train_on_a_real_model_folder(tmp_path, smollm2_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in prompt_completion(count=8)))
    settings = dict(
        model_name_or_path=str(smollm2_dir),
        dataset_name=str(data),
        output_dir=str(tmp_path / "out"),
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        dtype="bfloat16",
        max_length=48,
        save_strategy="no",
        attention_warmup_ratio=0.0,
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}


def test_messages_without_assistant_only_loss_have_no_context_and_say_so(tmp_path, smollm2_dir):
    """TRL trains a `messages` dataset on every token unless assistant_only_loss=True: no token is context, so the
    attention score is undefined and ssToken selects by REL, saying so once and counting it."""
    dataset = Dataset.from_list([{"messages": chat[:2]} for chat in CHATS[:4]])
    trainer = real_trainer(tmp_path, smollm2_dir, dataset, max_steps=1, max_length=64)
    with pytest.warns(UserWarning, match="no context"):
        trainer.train()
    (entry,) = selection_logs(trainer)
    assert entry["sstoken/no_context_sequences"] == 4 and "sstoken/rel_mean" in entry


# ----- Rho-1 with a reference trained from a clean set (reference_dataset) -----


def test_rho1_trains_its_reference_from_a_clean_set_and_a_rerun_reuses_it(tmp_path, smollm2_dir, monkeypatch):
    """tests/test_reference_training.py on SmolLM2, cut to what a real model adds: the reference adapter is trained
    on the real base in bf16, saved with its fingerprint, is the adapter the rho1 step ranks against, and a second
    run in the same output_dir reuses it without training again; other clean data is refused, not reused."""
    from safetensors.torch import load_file

    from trl_sstoken.history.reference import REFERENCE_ADAPTER
    from trl_sstoken.history.reference_training import (
        IDENTITY_FILE,
        REFERENCE_FOLDER,
        WEIGHTS_FILE,
        ReferenceTrainingError,
    )

    def rho1_run(clean_rows):
        settings = dict(selection_method="rho1", reference_dataset=prompt_completion(clean_rows, count=4),
                        reference_max_steps=1, max_steps=1, selection_ratio=0.5)  # fmt: skip
        return real_trainer(tmp_path, smollm2_dir, prompt_completion(count=4), **settings)

    first = rho1_run(QUICKSTART_ROWS[8:])
    selections = []
    select = first._select
    first._select = lambda *args, **kwargs: selections.append(select(*args, **kwargs)) or selections[-1]
    first.train()
    folder = tmp_path / "out" / REFERENCE_FOLDER
    record = json.loads((folder / IDENTITY_FILE).read_text())
    assert record["examples"] == 4 and record["recipe"]["max_steps"] == 1
    assert set(record) >= {"data", "base_model", "tokenizer", "recipe", "weights_sha256"}
    saved = load_file(folder / WEIGHTS_FILE)
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in saved.items())  # it trained
    # the frozen reference adapter of the run is the saved one
    loaded = {n.replace(f".{REFERENCE_ADAPTER}.", "."): p for n, p in first.model.named_parameters()
              if f".{REFERENCE_ADAPTER}." in n}  # fmt: skip
    assert set(loaded) == set(saved) and not any(p.requires_grad for p in loaded.values())
    for name, value in saved.items():
        assert torch.equal(loaded[name].detach().cpu(), value.to(loaded[name].dtype)), name
    # and the step ranked by the excess loss against it: at step 0 the main adapter is zero (the base model), so a
    # non-zero excess loss is the reference adapter's doing
    (selection,) = selections
    excess = selection.excess_loss[selection.regions.response]
    assert torch.isfinite(excess).all() and excess.abs().max() > 0
    assert 0 < selection_logs(first)[0]["sstoken/selected_fraction"] < 1

    stamp = os.stat(folder / WEIGHTS_FILE).st_mtime_ns
    trained, train = [], SSTokenTrainer.train

    def counted(self, *args, **kwargs):  # the reference's own trainer would call train() again
        trained.append(self.args.output_dir)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SSTokenTrainer, "train", counted)
    rho1_run(QUICKSTART_ROWS[8:]).train()
    assert trained == [str(tmp_path / "out")] and os.stat(folder / WEIGHTS_FILE).st_mtime_ns == stamp
    with pytest.raises(ReferenceTrainingError, match="different data"):
        rho1_run(QUICKSTART_ROWS[12:]).train()
    assert os.stat(folder / WEIGHTS_FILE).st_mtime_ns == stamp
