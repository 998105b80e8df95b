"""Real-model mode: greedy decoding on held-out clean prompts, teacher-forced NLL of the clean answers, and what the
attention statistic measures (its share on the sink, each score variant per token kind).

Scoring of a generation (decoded text up to the end-of-turn token):
- `exact_match` (headline): the text after the first `Answer:` up to the first newline, ` Ref:` or the end, stripped
  of spaces and a final `.`, equals the ground-truth answer (`37`, `fox, cat, ant`). Boilerplate before `Answer:` and
  a ` Ref: ...` tail are not penalised; a wrong, missing or extra item is.
- `strict_match`: the whole generation equals the clean response `Answer: <answer>` (no noise emitted).
- the long-response tasks (`--tasks long`) are scored by `long_tasks.score_generation`: exact match = every step and
  the final answer right, plus `step_accuracy` (fraction of steps right) and `final_match` (the answer alone).
- `answer_nll`: mean negative log-likelihood of the answer tokens of the clean eval responses, teacher-forced (cheap
  and low-variance; lower is better); `response_nll` over every clean response token.
"""

import contextlib

import torch

from trl_sstoken.attention.capture import (
    ATTENTION_SCORES,
    CAPTURE_ATTRIBUTE,
    IMPLEMENTATION_PREFIX,
    AttentionCapture,
    attention_modules,
    sink_keys,
)

from . import long_tasks, real_data
from .noise import KINDS


def extract_answer(text: str) -> str | None:
    if "Answer:" not in text:
        return None
    rest = text.split("Answer:", 1)[1]
    for stop in ("\n", " Ref:", "Ref:"):
        rest = rest.split(stop, 1)[0]
    return rest.strip().rstrip(".").strip()


def score_generation(text: str, instance) -> dict:
    if instance.family in long_tasks.FAMILIES:  # every step and the final answer, plus per-step accuracy
        return long_tasks.score_generation(text, instance, real_data.clean_response(instance).text)
    return {
        "exact_match": extract_answer(text) == real_data.answer_text(instance),
        "strict_match": text.strip() == real_data.clean_response(instance).text,
    }


@contextlib.contextmanager
def contiguous_head_input(model):
    """Hands the LM head a contiguous copy of its input while generating.

    generate's prefill gives the head a strided slice (`hidden_states[:, -1:]`, logits of the last position only).
    On torch 2.13's CPU, a bf16 linear on such a 3-D slice goes through a batched matmul that copies the weight for
    every row: measured 11.5 s against 0.05 s for batch 8 and gemma's 262k x 640 head, and at batch 64 a 21 GB
    spike that ran a 24 GB machine out of memory (pytorch/pytorch#151934). The logits are bitwise the same.
    """
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def greedy_generate(model, tokenizer, model_name, prompts_ids, max_new_tokens, batch_size=64):
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eot = real_data.end_of_turn_id(tokenizer, model_name)
    texts = []
    for begin in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[begin : begin + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        with contiguous_head_input(model):
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=[eot, tokenizer.eos_token_id],
            )[:, width:]  # fmt: skip
        for row in generated.tolist():
            for stop in (eot, tokenizer.eos_token_id):
                if stop in row:
                    row = row[: row.index(stop)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def _summarize(per_example, instances, key):
    result = {"overall": sum(s[key] for s in per_example) / len(per_example)}
    for family in dict.fromkeys(i.family for i in instances):  # the task set's families, in order
        scores = [s[key] for s, i in zip(per_example, instances, strict=False) if i.family == family]
        if scores:
            result[family] = sum(scores) / len(scores)
    return result


@torch.no_grad()
def clean_nll(model, tokenizer, model_name, instances, batch_size=32) -> dict:
    """Teacher-forced mean NLL of the clean answers (answer tokens) and of whole clean responses."""
    model.eval()
    device = next(model.parameters()).device
    rows = [real_data.tokenize_example(tokenizer, model_name, real_data.prompt_text(i), real_data.clean_response(i))
            for i in instances]  # fmt: skip
    answer_kind = KINDS.index("answer")
    totals = {"answer": [0.0, 0], "response": [0.0, 0]}
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * (width - len(r["input_ids"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
        kinds = torch.tensor([r["kinds"] + [-1] * (width - len(r["kinds"])) for r in chunk])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
        target_kinds = kinds[:, 1:]
        for name, where in (("answer", target_kinds == answer_kind), ("response", target_kinds >= 0)):
            totals[name][0] += float(-logp[where].sum())
            totals[name][1] += int(where.sum())
    return {f"{name}_nll": total / max(count, 1) for name, (total, count) in totals.items()}


def evaluate(model, tokenizer, model_name, instances, max_new_tokens=48, samples=4) -> dict:
    prompts = [real_data.prompt_ids(tokenizer, model_name, real_data.prompt_text(i)) for i in instances]
    texts = greedy_generate(model, tokenizer, model_name, prompts, max_new_tokens)
    per_example = [score_generation(text, instance) for text, instance in zip(texts, instances, strict=False)]
    return {
        "exact_match": _summarize(per_example, instances, "exact_match"),
        "strict_match": _summarize(per_example, instances, "strict_match"),
        # long-response tasks only: the final answer alone, and the fraction of steps stated right
        **{
            key: _summarize(per_example, instances, key)
            for key in ("final_match", "step_accuracy")
            if key in per_example[0]
        },  # fmt: skip
        **clean_nll(model, tokenizer, model_name, instances),
        "samples": [
            {"prompt": real_data.prompt_text(i), "generation": t, "answer": real_data.answer_text(i)}
            for i, t in list(zip(instances, texts, strict=False))[:samples]
        ],  # fmt: skip
    }


@torch.no_grad()
def attention_diagnostics(model, rows, layer: int, pad_token_id: int) -> dict:
    """On fixed training rows: the share of the context mass on the sink, and each score's mean per token kind.

    rows: dicts with input_ids and kinds (-1 on the prompt). Uses the same capture as training (one layer, q/k).
    """
    model.eval()
    device = next(model.parameters()).device
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_token_id] * (width - len(r["input_ids"])) for r in rows], device=device)
    valid = torch.tensor([[True] * len(r["input_ids"]) + [False] * (width - len(r["input_ids"])) for r in rows])
    kinds = torch.tensor([r["kinds"] + [-1] * (width - len(r["kinds"])) for r in rows])
    context = (kinds < 0) & valid
    sink = sink_keys(valid)
    values = {}
    runs = [(score, context) for score in ATTENTION_SCORES] + [("context_mass_without_sink", context & ~sink)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    training_implementation = base.config._attn_implementation  # a trainer's capture may still be installed
    if training_implementation.startswith(IMPLEMENTATION_PREFIX):
        base.set_attn_implementation(training_implementation[len(IMPLEMENTATION_PREFIX) :])
    modules = attention_modules(base)
    module = modules[layer % len(modules)]
    previous = getattr(module, CAPTURE_ATTRIBUTE, None)
    try:
        for name, context_keys in runs:
            capture = AttentionCapture(model, layer, score=name if name in ATTENTION_SCORES else "context_mass")
            try:
                with capture.armed(context_keys.to(device), valid.to(device)):
                    model(input_ids=ids, attention_mask=valid.long().to(device))
                values[name] = capture.take().cpu()
            finally:
                capture.remove()
    finally:
        base.set_attn_implementation(training_implementation)
        if previous is not None:
            setattr(module, CAPTURE_ATTRIBUTE, previous)
    response = kinds >= 0
    mass, without = values["context_mass"][response], values["context_mass_without_sink"][response]
    result = {"sink_share_of_context_mass": float(1 - without.sum() / mass.sum().clamp_min(1e-12))}
    for score in ATTENTION_SCORES:
        result[f"{score}_by_kind"] = {
            KINDS[k]: float(values[score][kinds == k].mean()) for k in range(len(KINDS)) if (kinds == k).any()
        }
    return result
