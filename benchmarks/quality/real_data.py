"""Real-model mode: natural-language tasks, token-level noise and tokenization with a kind on every response token.

The same four task families as the lab benchmark (`tasks.py`: their generators and ground truth are reused), written
as a user would ask them, with answers that can be checked exactly:

| family  | prompt                                                      | clean response                |
|---------|-------------------------------------------------------------|-------------------------------|
| add     | `What is 23 + 14?`                                          | `Answer: 37`                  |
| reverse | `Reverse the list: ant, cat, fox.`                          | `Answer: fox, cat, ant`       |
| lookup  | `Table: red 4, blue 17, gold 2. What is the value of blue?` | `Answer: 17`                  |
| replace | `Replace cat with owl in: ant, cat, fox, cat.`              | `Answer: ant, owl, fox, owl`  |

Noise (rates fixed in `noise.py`, the same as the lab benchmark), each response token labelled by its kind:
- `corrupt`: each answer item (a number or a list item) is replaced, with probability 0.2, by another of its type;
- `boilerplate`: with probability 0.5 the response opens with `Sure! Here is what you asked for. `;
- `random`: with probability 0.3 it ends with ` Ref: ` and 4-6 random codes such as `K07 Q33 Z12`.
`format` is `Answer:`, the separators `, `, the ` Ref:` marker and the end-of-turn token.

A response is built from (kind, text) segments; after tokenizing the whole example (canonical tokenization, as TRL
would), each response token gets the kind of the segment holding its first non-space character.

The long-response families (`--tasks long`, issue 27: `long_tasks.py`, a procedure answered step by step) go through
the same functions: each dispatches on the instance's family, so tokenization, kinds and the harness are shared.

Prompt formats: SmolLM2 uses its own ChatML template (with the default system prompt it inserts, as a user of the
model would get); gemma-3-270m is a base model without a chat template and gets `<bos>User: {prompt}\\nAssistant:\\n`
with the response ended by `<eos>`.
"""

import random
from dataclasses import dataclass

from datasets import Dataset

from . import data, long_tasks, noise
from .tasks import Instance


BOILERPLATE_TEXT = "Sure! Here is what you asked for. "
RANDOM_MARKER_TEXT = " Ref:"
CODE_LETTERS = "KQZXJV"
KINDS = noise.KINDS
TASK_SETS = ("short", "long")  # the four short families of tasks.py, or the long-response ones of long_tasks.py


@dataclass(frozen=True)
class RealResponse:
    segments: tuple[tuple[str, str], ...]  # (kind, text)

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.segments)


def prompt_text(instance: Instance) -> str:
    """The natural-language prompt of a lab instance (same numbers, items and keys); a long task's is its own."""
    if instance.family in long_tasks.FAMILIES:
        return instance.prompt
    words = instance.prompt.split()
    if instance.family == "add":
        return f"What is {words[1]} + {words[3]}?"
    if instance.family == "reverse":
        return f"Reverse the list: {', '.join(words[words.index(':') + 1 :])}."
    if instance.family == "lookup":
        table = words[2 : words.index(".")]
        pairs = [f"{key} {value}" for key, value in zip(table[0::3], table[1::3], strict=False)]
        return f"Table: {', '.join(pairs)}. What is the value of {words[-2]}?"
    if instance.family == "replace":
        items = words[words.index("list") + 2 :]
        return f"Replace {words[3]} with {words[5]} in: {', '.join(items)}."
    raise ValueError(f"unknown family {instance.family!r}")


def answer_items(instance: Instance) -> tuple[str, ...]:
    """The answer as items: lookup answers only the value (the key is in the question)."""
    if instance.family in long_tasks.FAMILIES:
        return instance.answer
    return instance.answer[1:] if instance.family == "lookup" else instance.answer


def answer_text(instance: Instance) -> str:
    return ", ".join(answer_items(instance))


def clean_response(instance: Instance) -> RealResponse:
    if instance.family in long_tasks.FAMILIES:
        return RealResponse(tuple(long_tasks.clean_segments(instance)))
    segments = [("format", "Answer: ")]
    for index, item in enumerate(answer_items(instance)):
        if index:
            segments.append(("format", ", "))
        segments.append(("answer", item))
    return RealResponse(tuple(segments))


def _code(rng: random.Random) -> str:
    return f"{rng.choice(CODE_LETTERS)}{rng.randint(0, 99):02d}"


def noisy_response(instance: Instance, rng: random.Random) -> RealResponse:
    """Noise drawn like `noise.noisy_response` (same rates, a fixed number of draws per response)."""
    if instance.family in long_tasks.FAMILIES:
        segments = long_tasks.noisy_segments(instance, rng, BOILERPLATE_TEXT, RANDOM_MARKER_TEXT, _code)
        return RealResponse(tuple(segments))
    segments = []
    if rng.random() < noise.BOILERPLATE_RATE:
        segments.append(("boilerplate", BOILERPLATE_TEXT))
    segments.append(("format", "Answer: "))
    for index, item in enumerate(answer_items(instance)):
        corrupt = rng.random() < noise.CORRUPT_RATE
        replacement = noise._corrupt_word(item, rng)
        if index:
            segments.append(("format", ", "))
        segments.append(("corrupt", replacement) if corrupt else ("answer", item))
    add_random = rng.random() < noise.RANDOM_RATE
    codes = [_code(rng) for _ in range(rng.randint(*noise.RANDOM_LENGTH))]
    if add_random:
        segments.append(("format", RANDOM_MARKER_TEXT))
        segments.append(("random", " " + " ".join(codes)))
    return RealResponse(tuple(segments))


def build_splits(
    data_seed: int, train_per_family: int, eval_per_family: int, reference_per_family: int, tasks: str = "short"
):
    """The lab benchmark's splits (same instances, same noise draws), with real-model responses; with
    tasks="long", the long-response families' splits, drawn the same way."""
    if tasks not in TASK_SETS:
        raise ValueError(f"tasks={tasks!r}: allowed values are {TASK_SETS}")
    generators = long_tasks.GENERATORS if tasks == "long" else None
    return data.build_splits(data_seed, train_per_family, eval_per_family, reference_per_family,
                             clean=clean_response, noisy=noisy_response, generators=generators)  # fmt: skip


# ----- prompt formats and tokenization -----


def format_prompt(tokenizer, model_name: str, prompt: str) -> str:
    """The text up to where the response starts."""
    if model_name == "smollm2":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return f"{tokenizer.bos_token}User: {prompt}\nAssistant:\n"


def end_of_turn(tokenizer, model_name: str) -> str:
    return "<|im_end|>" if model_name == "smollm2" else tokenizer.eos_token


def end_of_turn_id(tokenizer, model_name: str) -> int:
    return tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, model_name))


def prompt_ids(tokenizer, model_name: str, prompt: str) -> list[int]:
    return tokenizer(format_prompt(tokenizer, model_name, prompt), add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer, model_name: str, prompt: str, response: RealResponse) -> dict:
    """input_ids, labels (-100 on the prompt) and one kind index per token (-1 off the response)."""
    head = format_prompt(tokenizer, model_name, prompt)
    eot = end_of_turn(tokenizer, model_name)
    text = head + response.text + eot
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    # character span of every segment, the end-of-turn token being "format"
    spans, position = [], len(head)
    for kind, segment in (*response.segments, ("format", eot)):
        spans.append((position, position + len(segment), kind))
        position += len(segment)
    kinds, labels = [], []
    for token, (start, end) in zip(ids, offsets, strict=False):
        if end <= len(head):
            kinds.append(-1)
            labels.append(-100)
            continue
        if start < len(head):
            raise ValueError(f"a token straddles the prompt/response boundary in {text!r}")
        first = start
        while first < end - 1 and text[first].isspace():
            first += 1
        kind = next(k for s, e, k in spans if s <= first < e)
        kinds.append(KINDS.index(kind))
        labels.append(token)
    return {"input_ids": ids, "labels": labels, "kinds": kinds}


def sft_dataset(tokenizer, model_name: str, instances: list[Instance], responses: list[RealResponse]) -> Dataset:
    rows = []
    for instance, response in zip(instances, responses, strict=True):
        row = tokenize_example(tokenizer, model_name, prompt_text(instance), response)
        row["family"] = instance.family
        rows.append(row)
    return Dataset.from_list(rows)


def kind_counts(responses: list[RealResponse], tokenizer=None, model_name=None, instances=None) -> dict:
    """Realised noise, in segments (words or items) and, with a tokenizer, in tokens."""
    counts = dict.fromkeys(KINDS, 0)
    for response in responses:
        for kind, _ in response.segments:
            counts[kind] += 1
    result = {
        "segments_by_kind": counts,
        "corrupt_fraction_of_answer_items": counts["corrupt"] / max(counts["answer"] + counts["corrupt"], 1),
        "responses_with_boilerplate": sum(any(k == "boilerplate" for k, _ in r.segments) for r in responses)
        / max(len(responses), 1),
        "responses_with_random_string": sum(any(k == "random" for k, _ in r.segments) for r in responses)
        / max(len(responses), 1),
        "responses_with_a_corrupt_answer": sum(any(k == "corrupt" for k, _ in r.segments) for r in responses)
        / max(len(responses), 1),
    }
    if tokenizer is not None:
        tokens = dict.fromkeys(KINDS, 0)
        for instance, response in zip(instances, responses, strict=False):
            for kind in tokenize_example(tokenizer, model_name, prompt_text(instance), response)["kinds"]:
                if kind >= 0:
                    tokens[KINDS[kind]] += 1
        total = sum(tokens.values())
        result["response_tokens_by_kind"] = tokens
        result["response_token_fraction_by_kind"] = {k: v / total for k, v in tokens.items()} if total else {}
    return result
