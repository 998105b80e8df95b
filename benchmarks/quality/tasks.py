"""Task families with ground truth, in two surface forms: raw text (for pretraining) and chat (for SFT and eval).

Every word is one token of the benchmark's word-level tokenizer (no punctuation inside a word), so a response is a
list of words and every word of it can be labelled with what it is (answer, format, noise). Each family's answer
depends on the prompt: nothing can be answered without reading it.

Families (the chat prompt -> the clean response; the raw pretraining form of the same instance):
- reverse: "reverse the list : ant cat fox"                -> "answer : fox cat ant ."
           raw: "ant cat fox backwards is fox cat ant ."
- add:     "add 7 and 5"                                    -> "answer : 12 ."
           raw: "7 and 5 together make 12 ."
- lookup:  "table : red 4 , blue 7 , gold 2 . what is blue ?" -> "answer : blue 7 ."
           raw: "in red 4 , blue 7 , gold 2 look up blue : blue 7 ."
- replace: "rule : replace cat with owl . list : ant cat fox" -> "answer : ant owl fox ."
           raw: "swapping cat for owl turns ant cat fox into ant owl fox ."
"""

import random
from dataclasses import dataclass


FAMILIES = ("reverse", "add", "lookup", "replace")

ITEMS = (
    "ant",
    "bee",
    "cat",
    "dog",
    "elk",
    "fox",
    "gnu",
    "hen",
    "jay",
    "koi",
    "owl",
    "pig",
    "rat",
    "yak",
    "emu",
    "cod",
)
KEYS = ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy")
MAX_NUMBER = 60
NUMBERS = tuple(str(n) for n in range(MAX_NUMBER + 1))
ADD_MAX_OPERAND = 29  # a, b in [0, 29], so a + b <= MAX_NUMBER

# Words that open and close every clean response. The answer is the span between them.
ANSWER_OPEN = ("answer", ":")
ANSWER_CLOSE = (".",)


@dataclass(frozen=True)
class Instance:
    """One task instance: its family, the chat prompt, the ground-truth answer words and the raw pretraining text.

    The raw text is `raw_prefix + answer + " ."`, so the base model can be asked the raw form too.
    """

    family: str
    prompt: str
    answer: tuple[str, ...]
    raw_prefix: str

    @property
    def raw(self) -> str:
        return f"{self.raw_prefix} {' '.join(self.answer)} ."

    @property
    def clean_response(self) -> tuple[str, ...]:
        return ANSWER_OPEN + self.answer + ANSWER_CLOSE


def _reverse(rng: random.Random) -> Instance:
    items = rng.sample(ITEMS, rng.randint(3, 6))
    answer = tuple(reversed(items))
    listed = " ".join(items)
    return Instance(
        "reverse",
        f"reverse the list : {listed}",
        answer,
        f"{listed} backwards is",
    )


def _add(rng: random.Random) -> Instance:
    a, b = rng.randint(0, ADD_MAX_OPERAND), rng.randint(0, ADD_MAX_OPERAND)
    return Instance("add", f"add {a} and {b}", (str(a + b),), f"{a} and {b} together make")


def _lookup(rng: random.Random) -> Instance:
    keys = rng.sample(KEYS, rng.randint(3, 5))
    values = [str(rng.randint(0, MAX_NUMBER)) for _ in keys]
    query = rng.randrange(len(keys))
    table = " , ".join(f"{key} {value}" for key, value in zip(keys, values, strict=True))
    return Instance(
        "lookup",
        f"table : {table} . what is {keys[query]} ?",
        (keys[query], values[query]),
        f"in {table} look up {keys[query]} :",
    )


def _replace(rng: random.Random) -> Instance:
    source, target = rng.sample(ITEMS, 2)
    others = [item for item in ITEMS if item not in (source, target)]
    length = rng.randint(4, 6)
    items = [rng.choice(others) for _ in range(length)]
    for position in rng.sample(range(length), rng.randint(1, 2)):  # the rule applies at least once
        items[position] = source
    answer = tuple(target if item == source else item for item in items)
    listed = " ".join(items)
    return Instance(
        "replace",
        f"rule : replace {source} with {target} . list : {listed}",
        answer,
        f"swapping {source} for {target} turns {listed} into",
    )


GENERATORS = {"reverse": _reverse, "add": _add, "lookup": _lookup, "replace": _replace}


def ground_truth(family: str, prompt: str) -> tuple[str, ...]:
    """The answer, recomputed from the prompt text alone (an independent check of the generators)."""
    words = prompt.split()
    if family == "reverse":
        return tuple(reversed(words[words.index(":") + 1 :]))
    if family == "add":
        return (str(int(words[1]) + int(words[3])),)
    if family == "lookup":
        table = words[2 : words.index(".")]
        pairs = dict(zip(table[0::3], table[1::3], strict=False))
        return (words[-2], pairs[words[-2]])
    if family == "replace":
        source, target = words[3], words[5]
        items = words[words.index("list") + 2 :]
        return tuple(target if item == source else item for item in items)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def generate(
    rng: random.Random, count_per_family: int, exclude_prompts: set[str] = frozenset(), generators: dict = None
) -> list:
    """`count_per_family` distinct instances of each family (round-robin order), none of whose prompts is excluded.
    `generators` (family -> rng -> instance) defaults to these four families; `long_tasks` passes its own."""
    generators = generators or GENERATORS
    instances, seen = [], set(exclude_prompts)
    per_family = dict.fromkeys(generators, 0)
    attempts = 0
    while min(per_family.values()) < count_per_family:
        for family in generators:
            if per_family[family] >= count_per_family:
                continue
            attempts += 1
            if attempts > 200 * count_per_family * len(generators):
                raise RuntimeError(f"could not draw {count_per_family} distinct {family} instances")
            instance = generators[family](rng)
            if instance.prompt in seen:
                continue
            seen.add(instance.prompt)
            instances.append(instance)
            per_family[family] += 1
    return instances
