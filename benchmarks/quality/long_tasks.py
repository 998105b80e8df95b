r"""Long-response tasks (issue 27, item 3): a stated procedure carried out step by step, every step checkable.

The short families (`tasks.py`, `real_data.py`) answer in a handful of tokens (`Answer: 37`), while the SFT data of
the ssToken paper (Flan, Alpaca, Dolly, WizardLM, OASST) has responses of hundreds of tokens, and the paper's score
keeps mostly the first tokens of each response. Here the checkable payload is spread through a response of about
80-300 SmolLM2 tokens: the prompt states a start value and a list of operations, and the response gives the result of
each operation in turn, then the final answer. Each step's result depends on the previous one, so no step can be
right without doing the ones before it, and everything depends on the prompt.

- list_steps: `Start with the list: ant, cat, fox, emu. Apply these steps in order: 1) reverse it; 2) replace cat
  with owl; 3) move the first item to the end; ... Give the result after each step, then the final answer.`
  -> `Step 1 (reverse it): emu, fox, cat, ant.\nStep 2 (replace cat with owl): emu, fox, owl, ant.\nStep 3 (move the
  first item to the end): fox, owl, ant, emu.\n...\nAnswer: <the last step's list>`
  (start: 4-6 distinct animals; 5-8 steps of reverse, rotate either way, swap the ends, replace, remove, append).
- number_steps: `Start with 23. Apply these steps in order: 1) add 9; 2) double it; 3) subtract 14; ...`
  -> `Step 1 (add 9): 32.\nStep 2 (double it): 64.\nStep 3 (subtract 14): 50.\n...\nAnswer: <the last value>`
  (start 0-99; 8-12 steps of add / subtract 2-19, double, halve, every value staying in 0-99).
No operation directly undoes the one before it (reverse twice, double then halve), so a step's result is seldom a
copy of the one before.

Payload items (kind `answer`, corruptible by the noise): every list item or number of every step's result and of the
final answer. `format`: the `Step i (<operation>): ` headers, the `, ` separators, `.\n`, `Answer: `. The noise is
the short families' (`noise.py` rates, `real_data.py` texts): each payload item is corrupted with probability 0.2
(the steps after it still state the true values: a wrong label at that position, not a different procedure), the
boilerplate opener with probability 0.5, a ` Ref:` codes tail after the answer with probability 0.3.
"""

import random
import re
from dataclasses import dataclass

from . import noise
from .tasks import ITEMS


FAMILIES = ("list_steps", "number_steps")

LIST_LENGTH = (4, 6)  # items of the start list (distinct)
LIST_BOUNDS = (3, 7)  # the list never gets shorter or longer than this
LIST_STEPS = (5, 8)
NUMBER_STEPS = (8, 12)
MAX_VALUE = 99  # every running value stays in 0..99
ADD_RANGE = (2, 19)

PROMPT_TAIL = "Give the result after each step, then the final answer."

# What the harness uses with `--tasks long` (run.py, `scale_for`): per-family sizes doubled so that the totals equal
# the short set's (4 families there, 2 here), and lengths measured with `exploration/long_lengths.py` (README, "Long
# responses"). Longest whole noisy training example: 382 SmolLM2 tokens at real-cpu, 406 at real-gpu (gemma: 356), so
# max_length 448 truncates none (the harness checks it). Longest clean eval response: 221 tokens (real-gpu 231) with
# the end-of-turn; + 9 for a boilerplate opener and a margin: 288 new tokens.
PER_FAMILY_FACTOR = 2
MAX_LENGTH = 448
MAX_NEW_TOKENS = 288


def scale_for(scale: dict) -> dict:
    """A real-model scale for the long task set: same recipe, the sizes and lengths above. A scale made for the long
    set (`tasks="long"` in scales.py: `real-cpu-75`) has the long set's sizes already and keeps them."""
    sized = {key: scale[key] if scale.get("tasks") == "long" else PER_FAMILY_FACTOR * scale[key]
             for key in ("train_per_family", "eval_per_family", "reference_per_family")}  # fmt: skip
    return {**scale, **sized, "tasks": "long", "max_length": MAX_LENGTH, "max_new_tokens": MAX_NEW_TOKENS}


@dataclass(frozen=True)
class LongInstance:
    """One instance: `prompt` is the natural-language prompt itself (no lab word form), `operations` the stated
    operations, `steps` the result after each operation (as items), `answer` the final result (= the last step)."""

    family: str
    prompt: str
    operations: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...]

    @property
    def answer(self) -> tuple[str, ...]:
        return self.steps[-1]


# ----- the operations: text -> function of the current state, and when each may be applied -----


def apply_list_operation(operation: str, items: list[str]) -> list[str]:
    if operation == "reverse it":
        return items[::-1]
    if operation == "move the first item to the end":
        return items[1:] + items[:1]
    if operation == "move the last item to the front":
        return items[-1:] + items[:-1]
    if operation == "swap the first and last items":
        return items[-1:] + items[1:-1] + items[:1]
    words = operation.split()
    if words[0] == "replace":  # replace X with Y
        return [words[3] if item == words[1] else item for item in items]
    if words[0] == "remove":  # remove X
        return [item for item in items if item != words[1]]
    if words[0] == "append":  # append X
        return [*items, words[1]]
    raise ValueError(f"unknown list operation {operation!r}")


def apply_number_operation(operation: str, value: int) -> int:
    words = operation.split()
    if words[0] == "add":
        return value + int(words[1])
    if words[0] == "subtract":
        return value - int(words[1])
    if operation == "double it":
        return 2 * value
    if operation == "halve it":
        return value // 2
    raise ValueError(f"unknown number operation {operation!r}")


def _list_operations(items: list[str], rng: random.Random) -> list[str]:
    """The operations allowed on `items`: each changes the list (so no step is a copy of the one before)."""
    absent = [item for item in ITEMS if item not in items]
    options = ["reverse it", "move the first item to the end", "move the last item to the front",
               "swap the first and last items", f"replace {rng.choice(items)} with {rng.choice(absent)}"]  # fmt: skip
    if len(items) > LIST_BOUNDS[0]:
        options.append(f"remove {rng.choice(items)}")
    if len(items) < LIST_BOUNDS[1]:
        options.append(f"append {rng.choice(absent)}")
    return options


def _number_operations(value: int, rng: random.Random) -> list[str]:
    options = []
    if value + ADD_RANGE[0] <= MAX_VALUE:
        options.append(f"add {rng.randint(ADD_RANGE[0], min(ADD_RANGE[1], MAX_VALUE - value))}")
    if value >= ADD_RANGE[0]:
        options.append(f"subtract {rng.randint(ADD_RANGE[0], min(ADD_RANGE[1], value))}")
    if 1 <= value <= MAX_VALUE // 2:
        options.append("double it")
    if value >= 2 and value % 2 == 0:
        options.append("halve it")
    return options


def _prompt(start: str, operations: list[str]) -> str:
    listed = "; ".join(f"{index}) {operation}" for index, operation in enumerate(operations, 1))
    return f"Start with {start}. Apply these steps in order: {listed}. {PROMPT_TAIL}"


# An operation never directly undoes the one before it, so that a step's result is seldom a copy of an earlier one.
UNDOES = {
    "reverse it": "reverse it",
    "swap the first and last items": "swap the first and last items",
    "move the first item to the end": "move the last item to the front",
    "move the last item to the front": "move the first item to the end",
    "double it": "halve it",
    "halve it": "double it",
}


def _pick(options: list[str], previous: str | None, rng: random.Random) -> str:
    options = [option for option in options if previous is None or UNDOES.get(previous) != option]
    return options[rng.randrange(len(options))]


def _list_steps(rng: random.Random) -> LongInstance:
    items = rng.sample(ITEMS, rng.randint(*LIST_LENGTH))
    start, operations, steps = ", ".join(items), [], []
    for _ in range(rng.randint(*LIST_STEPS)):
        operation = _pick(_list_operations(items, rng), operations[-1] if operations else None, rng)
        items = apply_list_operation(operation, items)
        operations.append(operation)
        steps.append(tuple(items))
    return LongInstance("list_steps", _prompt(f"the list: {start}", operations), tuple(operations), tuple(steps))


def _number_steps(rng: random.Random) -> LongInstance:
    value = rng.randint(0, MAX_VALUE)
    start, operations, steps = str(value), [], []
    for _ in range(rng.randint(*NUMBER_STEPS)):
        operation = _pick(_number_operations(value, rng), operations[-1] if operations else None, rng)
        value = apply_number_operation(operation, value)
        operations.append(operation)
        steps.append((str(value),))
    return LongInstance("number_steps", _prompt(start, operations), tuple(operations), tuple(steps))


GENERATORS = {"list_steps": _list_steps, "number_steps": _number_steps}

_PROMPT = re.compile(r"Start with (?:the list: )?(?P<start>.*?)\. Apply these steps in order: (?P<steps>.*)\. "
                     + re.escape(PROMPT_TAIL) + "$")  # fmt: skip


def ground_truth(family: str, prompt: str) -> tuple[tuple[str, ...], ...]:
    """Every step's result, recomputed from the prompt text alone (an independent check of the generators)."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"not a long-task prompt: {prompt!r}")
    operations = [re.sub(r"^\d+\) ", "", part) for part in match["steps"].split("; ")]
    steps = []
    if family == "list_steps":
        state = match["start"].split(", ")
        for operation in operations:
            state = apply_list_operation(operation, state)
            steps.append(tuple(state))
    elif family == "number_steps":
        state = int(match["start"])
        for operation in operations:
            state = apply_number_operation(operation, state)
            steps.append((str(state),))
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return tuple(steps)


# ----- responses: (kind, text) segments, as real_data's -----


def step_header(index: int, operation: str) -> str:
    return f"Step {index} ({operation}): "


def _items(kind_of, items) -> list[tuple[str, str]]:
    segments = []
    for index, item in enumerate(items):
        if index:
            segments.append(("format", ", "))
        segments.append(kind_of(item))
    return segments


def _body(instance: LongInstance, kind_of) -> list[tuple[str, str]]:
    """The steps and the final answer; `kind_of(item)` gives each payload item's (kind, text)."""
    segments = []
    for index, (operation, result) in enumerate(zip(instance.operations, instance.steps, strict=True), 1):
        segments.append(("format", step_header(index, operation)))
        segments += _items(kind_of, result)
        segments.append(("format", ".\n"))
    segments.append(("format", "Answer: "))
    return segments + _items(kind_of, instance.answer)


def clean_segments(instance: LongInstance) -> list[tuple[str, str]]:
    return _body(instance, lambda item: ("answer", item))


def corrupt_item(item: str, rng: random.Random) -> str:
    """Another item of the same type: a number 0-99 for a number, another animal for an animal."""
    if item.isdigit():
        return str(rng.choice([n for n in range(MAX_VALUE + 1) if n != int(item)]))
    return rng.choice([other for other in ITEMS if other != item])


def noisy_segments(instance: LongInstance, rng: random.Random, boilerplate: str, marker: str, code) -> list:
    """Noise drawn like `real_data.noisy_response`: the boilerplate draw, then for every payload item a corrupt draw
    and its replacement draw, then the random-tail draw and its codes (a fixed number of draws per item)."""

    def kind_of(item):
        corrupt = rng.random() < noise.CORRUPT_RATE
        replacement = corrupt_item(item, rng)
        return ("corrupt", replacement) if corrupt else ("answer", item)

    segments = [("boilerplate", boilerplate)] if rng.random() < noise.BOILERPLATE_RATE else []
    segments += _body(instance, kind_of)
    add_random = rng.random() < noise.RANDOM_RATE
    codes = [code(rng) for _ in range(rng.randint(*noise.RANDOM_LENGTH))]
    if add_random:
        segments += [("format", marker), ("random", " " + " ".join(codes))]
    return segments


# ----- scoring a generation -----


def _clean_item_text(text: str) -> str:
    for stop in ("\n", " Ref:", "Ref:"):
        text = text.split(stop, 1)[0]
    return text.strip().rstrip(".").strip()


def stated_steps(text: str, count: int) -> list[str | None]:
    """What a generation states as the result of steps 1..count: the text after `Step i (...):` up to the end of its
    line (stripped of spaces and a final `.`), None where the step is missing. The first occurrence counts."""
    results = []
    for index in range(1, count + 1):
        match = re.search(rf"Step {index} \([^)\n]*\):([^\n]*)", text)
        results.append(_clean_item_text(match[1]) if match else None)
    return results


def stated_answer(text: str) -> str | None:
    """The text after the first `Answer:` up to a newline, ` Ref:` or the end (as the short families)."""
    return _clean_item_text(text.split("Answer:", 1)[1]) if "Answer:" in text else None


def score_generation(text: str, instance: LongInstance, clean_text: str) -> dict:
    """exact_match: every step and the final answer are right (the payload is spread through the response, so a
    generation right only at the start is not an exact match); step_accuracy: the fraction of steps whose stated
    result is right; final_match: the final answer alone; strict_match: the whole generation is the clean one."""
    steps = stated_steps(text, len(instance.steps))
    correct = [stated == ", ".join(truth) for stated, truth in zip(steps, instance.steps, strict=True)]
    final = stated_answer(text) == ", ".join(instance.answer)
    return {
        "exact_match": final and all(correct),
        "strict_match": text.strip() == clean_text.strip(),
        "final_match": final,
        "step_accuracy": sum(correct) / len(correct),
    }
