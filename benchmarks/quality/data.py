"""Everything the benchmark trains or evaluates on: the pretraining stream, the SFT sets (noisy and clean), the rho1
reference subset and the held-out eval prompts, with a kind label on every response token.

All of it is a pure function of (data seed, sizes): the same seed gives the same words, ids and noise.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from datasets import Dataset

from trl_sstoken.tiny import build_tiny_tokenizer

from .noise import BOILERPLATE, CODES, KINDS, RANDOM_MARKER, Response, clean_response, noisy_response
from .tasks import FAMILIES, GENERATORS, ITEMS, KEYS, NUMBERS, Instance, generate


# ----- filler text for pretraining: plain sentences, the boilerplate sentence, and sentences with codes -----
ADJECTIVES = ("old", "small", "tall", "quiet", "happy", "busy")
NOUNS = ("man", "girl", "farmer", "friend", "teacher", "boy")
VERBS = ("walked", "ran", "looked", "went", "came")
PLACES = ("river", "house", "market", "garden", "school", "hill")
FILLER_BOILERPLATE_RATE = 0.15  # of filler sentences: the boilerplate sentence, so the base model learns it
FILLER_CODES_RATE = 0.10  # of filler sentences: "order number <codes> was sent ." so code tokens are not untrained
PRETRAIN_TASK_FRACTION = 0.6  # of pretraining sentences: a raw task instance; the rest is filler
TEMPLATE_WORDS = (
    "reverse the list : add and table , . what is ? rule replace with answer "
    "backwards together make in look up swapping for turns into order number was sent to a"
)


def vocabulary_text() -> str:
    """A text holding every word the benchmark can produce (the tokenizer's vocabulary is built from it)."""
    words = [*ITEMS, *KEYS, *NUMBERS, *CODES, *BOILERPLATE, *RANDOM_MARKER, *ADJECTIVES, *NOUNS, *VERBS, *PLACES]
    return " ".join(words) + " " + TEMPLATE_WORDS


def build_tokenizer():
    return build_tiny_tokenizer([vocabulary_text()])


def filler_sentence(rng: random.Random) -> str:
    draw = rng.random()
    if draw < FILLER_BOILERPLATE_RATE:
        return " ".join(BOILERPLATE)
    if draw < FILLER_BOILERPLATE_RATE + FILLER_CODES_RATE:
        codes = " ".join(rng.choice(CODES) for _ in range(rng.randint(3, 6)))
        return f"order number {codes} was sent ."
    return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} to the {rng.choice(PLACES)} ."


def pretraining_sentence(rng: random.Random) -> str:
    """One sentence of the base model's pretraining text: a raw-form task instance or filler, never chat format."""
    if rng.random() < PRETRAIN_TASK_FRACTION:
        family = FAMILIES[rng.randrange(len(FAMILIES))]
        return GENERATORS[family](rng).raw
    return filler_sentence(rng)


# ----- SFT data -----


@dataclass
class SFTSplits:
    """Instances and responses of every split. `train_noisy` and `train_clean` share their prompts. The response
    type is the lab's `Response` here and `real_data.RealResponse` in the real-model mode."""

    eval: list[Instance]
    train: list[Instance]
    train_noisy: list
    train_clean: list
    reference: list[Instance]  # the rho1 reference's clean subset (a subset of the train prompts)
    clean: Callable = field(default=None, repr=False)  # instance -> clean response

    def reference_responses(self) -> list:
        return [self.clean(instance) for instance in self.reference]


def build_splits(
    data_seed: int,
    train_per_family: int,
    eval_per_family: int,
    reference_per_family: int,
    clean: Callable = None,
    noisy: Callable = None,
    generators: dict = None,
) -> SFTSplits:
    """The splits, with responses made by `clean(instance)` and `noisy(instance, rng)` (default: the lab's), of the
    families of `generators` (default: the four of `tasks.py`)."""
    clean = clean or clean_response
    noisy = noisy or noisy_response
    generators = generators or GENERATORS
    rng = random.Random(data_seed)
    eval_instances = generate(rng, eval_per_family, generators=generators)
    train = generate(rng, train_per_family, exclude_prompts={i.prompt for i in eval_instances}, generators=generators)
    noise_rng = random.Random(data_seed + 1)
    train_noisy = [noisy(instance, noise_rng) for instance in train]
    train_clean = [clean(instance) for instance in train]
    reference = []
    for family in generators:
        reference += [i for i in train if i.family == family][:reference_per_family]
    return SFTSplits(eval_instances, train, train_noisy, train_clean, reference, clean)


def chat_prompt(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5 and a list in 4."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_example(tokenizer, prompt: str, response: Response) -> dict:
    """input_ids and labels (-100 on the prompt) as TRL would build them, plus one kind per token (-1 off-response).

    Checks that every response word is exactly one token, so kinds line up with tokens.
    """
    prompt_ids = tokenizer.apply_chat_template(chat_prompt(prompt), add_generation_prompt=True, tokenize=True)
    prompt_ids = _ids(prompt_ids)
    response_ids = tokenizer.convert_tokens_to_ids(list(response.words)) + [tokenizer.eos_token_id]
    if tokenizer.unk_token_id in response_ids:
        raise ValueError(f"response has a word outside the vocabulary: {response.text!r}")
    full = tokenizer.apply_chat_template(
        chat_prompt(prompt) + [{"role": "assistant", "content": response.text}], tokenize=True
    )
    full = _ids(full)
    if full[: len(prompt_ids) + len(response_ids)] != prompt_ids + response_ids:
        raise ValueError(f"chat template does not tokenize the response word by word: {response.text!r}")
    kinds = [-1] * len(prompt_ids) + [KINDS.index(kind) for kind in response.kinds] + [KINDS.index("format")]
    input_ids = prompt_ids + response_ids
    return {"input_ids": input_ids, "labels": [-100] * len(prompt_ids) + response_ids, "kinds": kinds}


def sft_dataset(tokenizer, instances: list[Instance], responses: list[Response]) -> Dataset:
    """A pre-tokenized dataset (TRL skips its own tokenization when `input_ids` is present)."""
    rows = [tokenize_example(tokenizer, i.prompt, r) for i, r in zip(instances, responses, strict=True)]
    for row, instance in zip(rows, instances, strict=True):
        row["family"] = instance.family
    return Dataset.from_list(rows)


def kind_counts(responses: list[Response]) -> dict:
    """Realised noise: counts of response words by kind, and the fraction of responses carrying each noise kind."""
    counts = dict.fromkeys(KINDS, 0)
    for response in responses:
        for kind in response.kinds:
            counts[kind] += 1
    total = sum(counts.values())
    answer_words = counts["answer"] + counts["corrupt"]
    return {
        "response_words_by_kind": counts,
        "response_word_fraction_by_kind": {kind: counts[kind] / total for kind in KINDS} if total else {},
        "corrupt_fraction_of_answer_words": counts["corrupt"] / answer_words if answer_words else 0.0,
        "responses_with_boilerplate": sum("boilerplate" in r.kinds for r in responses) / max(len(responses), 1),
        "responses_with_random_string": sum("random" in r.kinds for r in responses) / max(len(responses), 1),
        "responses_with_a_corrupt_answer": sum("corrupt" in r.kinds for r in responses) / max(len(responses), 1),
    }
