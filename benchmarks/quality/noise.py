"""Token-level noise of named kinds, applied to clean SFT responses, with every response word labelled by its kind.

The kinds and their rates are fixed here, before any method was compared (see benchmarks/quality/README.md):

- `corrupt` (CORRUPT_RATE = 0.2 per answer word): the answer word is replaced by a different word of the same type
  (an item by another item, a key by another key, a number by another number). The response then teaches a wrong answer at that position.
- `boilerplate` (BOILERPLATE_RATE = 0.5 per response): the response opens with BOILERPLATE, a sentence that the base
  model saw often in its pretraining filler text, so it already predicts it (after its first word).
- `random` (RANDOM_RATE = 0.3 per response): the response ends with "ref :" and 4 to 6 codes drawn uniformly from
  CODES, like a tracking id: nothing in the prompt predicts them, so they cannot be learned.

Word kinds in a (noisy or clean) response: `answer` (a correct answer word), `corrupt`, `format` ("answer", ":",
".", the "ref :" marker and, once tokenized, the end-of-turn token), `boilerplate`, `random` (the codes).
"""

import random
from dataclasses import dataclass

from .tasks import ANSWER_CLOSE, ANSWER_OPEN, ITEMS, KEYS, NUMBERS, Instance


CORRUPT_RATE = 0.2
BOILERPLATE_RATE = 0.5
RANDOM_RATE = 0.3
RANDOM_LENGTH = (4, 6)

BOILERPLATE = ("sure", "!", "here", "is", "what", "you", "asked", "for", ".")
RANDOM_MARKER = ("ref", ":")
CODES = tuple(f"k{index:02d}" for index in range(48))

KINDS = ("answer", "corrupt", "format", "boilerplate", "random")
NOISE_RATES = {
    "corrupt_per_answer_word": CORRUPT_RATE,
    "boilerplate_per_response": BOILERPLATE_RATE,
    "random_string_per_response": RANDOM_RATE,
    "random_string_length": list(RANDOM_LENGTH),
}


@dataclass(frozen=True)
class Response:
    """A response as words, and the kind of each word."""

    words: tuple[str, ...]
    kinds: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def clean_response(instance: Instance) -> Response:
    answer_kinds = ("answer",) * len(instance.answer)
    return Response(
        instance.clean_response,
        ("format",) * len(ANSWER_OPEN) + answer_kinds + ("format",) * len(ANSWER_CLOSE),
    )


def _corrupt_word(word: str, rng: random.Random) -> str:
    pool = NUMBERS if word in NUMBERS else KEYS if word in KEYS else ITEMS
    return rng.choice([other for other in pool if other != word])


def noisy_response(instance: Instance, rng: random.Random) -> Response:
    """The clean response with each kind of noise drawn independently at its rate (a fixed number of draws, so the
    random stream never depends on earlier outcomes' types)."""
    words, kinds = [], []
    if rng.random() < BOILERPLATE_RATE:
        words += BOILERPLATE
        kinds += ["boilerplate"] * len(BOILERPLATE)
    words += ANSWER_OPEN
    kinds += ["format"] * len(ANSWER_OPEN)
    for word in instance.answer:
        corrupt = rng.random() < CORRUPT_RATE
        replacement = _corrupt_word(word, rng)
        words.append(replacement if corrupt else word)
        kinds.append("corrupt" if corrupt else "answer")
    words += ANSWER_CLOSE
    kinds += ["format"] * len(ANSWER_CLOSE)
    add_random = rng.random() < RANDOM_RATE
    codes = [rng.choice(CODES) for _ in range(rng.randint(*RANDOM_LENGTH))]
    if add_random:
        words += list(RANDOM_MARKER) + codes
        kinds += ["format"] * len(RANDOM_MARKER) + ["random"] * len(codes)
    return Response(tuple(words), tuple(kinds))
