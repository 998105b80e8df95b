"""Greedy decoding on held-out clean prompts and exact-match scoring, per family and overall.

Scoring of a chat generation (the words the model wrote, up to its end-of-turn token):
- `exact_match` (the headline): the words after the first "answer :" and before the next "." (or the end) equal
  the ground-truth answer exactly. Boilerplate before "answer :" or a "ref : ..." tail after the "." does not
  matter; a wrong, missing or extra answer word does. No "answer :" at all scores 0.
- `strict_match`: the whole generation equals the clean response "answer : <answer> ." (no noise emitted).
Raw-form scoring (for the base model): the words generated after the raw prefix, up to the first ".".
"""

import torch

from .data import chat_prompt
from .tasks import ANSWER_CLOSE, ANSWER_OPEN, FAMILIES, Instance


def extract_answer(words: list[str]) -> tuple[str, ...] | None:
    """The answer span of a generation, or None when it has no "answer :"."""
    for start in range(len(words) - len(ANSWER_OPEN) + 1):
        if tuple(words[start : start + len(ANSWER_OPEN)]) == ANSWER_OPEN:
            rest = words[start + len(ANSWER_OPEN) :]
            end = rest.index(ANSWER_CLOSE[0]) if ANSWER_CLOSE[0] in rest else len(rest)
            return tuple(rest[:end])
    return None


def score_generation(words: list[str], instance: Instance) -> dict:
    return {
        "exact_match": extract_answer(words) == instance.answer,
        "strict_match": tuple(words) == instance.clean_response,
    }


def score_raw_generation(words: list[str], instance: Instance) -> bool:
    end = words.index(".") if "." in words else len(words)
    return tuple(words[:end]) == instance.answer


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int, batch_size: int = 128):
    """Greedy continuation of each prompt (left-padded batches), as word lists, stopping at end-of-turn."""
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    outputs = []
    for begin in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[begin : begin + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, width:]
        for row in generated.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            outputs.append(tokenizer.convert_ids_to_tokens([token for token in row if token != pad]))
    return outputs


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(chat_prompt(prompt), add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def summarize(per_example: list[dict], instances: list[Instance], key: str) -> dict:
    """{"overall": mean, "<family>": mean, ...} of one boolean score."""
    result = {"overall": sum(score[key] for score in per_example) / len(per_example)}
    for family in FAMILIES:
        scores = [
            score[key] for score, instance in zip(per_example, instances, strict=True) if instance.family == family
        ]
        if scores:
            result[family] = sum(scores) / len(scores)
    return result


def evaluate_chat(model, tokenizer, instances: list[Instance], max_new_tokens: int = 32, samples: int = 0) -> dict:
    """Exact match (headline) and strict match, per family and overall, on the chat prompts of `instances`."""
    generations = greedy_generate(
        model, tokenizer, [chat_prompt_ids(tokenizer, i.prompt) for i in instances], max_new_tokens
    )
    per_example = [score_generation(words, instance) for words, instance in zip(generations, instances, strict=True)]
    return {
        "exact_match": summarize(per_example, instances, "exact_match"),
        "strict_match": summarize(per_example, instances, "strict_match"),
        "samples": [
            {"prompt": i.prompt, "generation": " ".join(words), "answer": " ".join(i.answer)}
            for i, words in list(zip(instances, generations, strict=True))[:samples]
        ],
    }


def evaluate_raw(model, tokenizer, instances: list[Instance], max_new_tokens: int = 10) -> dict:
    """Exact match of the base model on the raw (pretraining) form of `instances`, per family and overall."""
    vocab = tokenizer.get_vocab()
    prompts = [[vocab[word] for word in instance.raw_prefix.split()] for instance in instances]
    generations = greedy_generate(model, tokenizer, prompts, max_new_tokens)
    per_example = [{"exact_match": score_raw_generation(w, i)} for w, i in zip(generations, instances, strict=True)]
    return summarize(per_example, instances, "exact_match")
