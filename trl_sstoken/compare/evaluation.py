"""How `trl-sstoken compare` scores a trained candidate on the evaluation set the user trusts.

- **Response NLL**, always: the trainer's own evaluation (`SSTokenTrainer.evaluate`), which is plain NLL over every
  response token whatever the selection method, so every candidate is measured the same way, and the base model's
  value (before training) is measured alongside.
- **A user metric**, optionally: `module:function`, called as `function(predictions, references)` with the greedy
  generations for the evaluation prompts and the reference responses (lists of strings); it returns a number or a
  dict of numbers (higher is better). It is imported and called once on the references themselves before any
  training, so a bad one fails at once with its name.
"""

import importlib
import math
import numbers

import torch


class MetricError(ValueError):
    """A `--metric` that cannot be imported, called or read."""


def load_metric(spec: str | None):
    """The function named by `module:function` (None for None), checked on a toy input."""
    if spec is None:
        return None
    module_name, colon, function_name = str(spec).partition(":")
    if not colon or not module_name or not function_name:
        raise MetricError(
            f"--metric {str(spec)[:120]!r} is not module:function (e.g. my_metrics:exact_match, a function of "
            "(predictions, references) returning a number or a dict of numbers)."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or an error raised while importing the user's module
        raise MetricError(
            f"--metric {spec[:120]!r}: the module {module_name!r} cannot be imported ({type(error).__name__}: "
            f"{str(error)[:200]}). Is it on PYTHONPATH (the current directory is)?"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise MetricError(
            f"--metric {spec[:120]!r}: {module_name!r} has no function {function_name!r}"
            + (" (it is not callable)" if function is not None else "")
            + "."
        )
    return function


def check_metric(function, spec: str, references: list[str]) -> None:
    """Calls the metric on the references scored against themselves: it must return a number or a dict of numbers."""
    sample = references[: min(4, len(references))]
    score_metric(function, spec, sample, sample)


def score_metric(function, spec: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """The metric's value(s) as {name: float}: a plain number is named after the function."""
    try:
        value = function(list(predictions), list(references))
    except Exception as error:
        raise MetricError(
            f"--metric {spec[:120]!r} raised {type(error).__name__}: {str(error)[:300]} when called as "
            "function(predictions: list[str], references: list[str])."
        ) from None
    name = spec.partition(":")[2]
    values = value if isinstance(value, dict) else {name: value}
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)}
    if not values or bad or not all(math.isfinite(float(v)) for v in values.values()):
        raise MetricError(
            f"--metric {spec[:120]!r} returned {str(value)[:200]!r}; it must return a finite number or a dict of "
            "finite numbers (higher is better)."
        )
    return {str(k): float(v) for k, v in values.items()}


def prompts_and_references(dataset) -> tuple[list, list[str]]:
    """The prompts to generate from and the reference responses of an evaluation set: prompt-completion rows (text
    or conversational) or `messages` rows whose last turn is the assistant's. Plain `text` rows have neither."""
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        prompts = list(dataset["prompt"])
        references = [_text(completion) for completion in dataset["completion"]]
        return prompts, references
    if "messages" in columns:
        prompts, references = [], []
        for index, messages in enumerate(dataset["messages"]):
            if not messages or messages[-1].get("role") != "assistant":
                raise MetricError(
                    f"--metric: evaluation row {index} does not end with an assistant turn, so it has no reference "
                    "response to score against."
                )
            prompts.append(messages[:-1])
            references.append(_text(messages[-1:]))
        return prompts, references
    raise MetricError(
        f"--metric needs an evaluation set with prompt/completion or messages columns (prompts to generate from and "
        f"reference responses); this one has {sorted(columns)[:10]}. Drop --metric to compare by response NLL only."
    )


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return "".join(message.get("content", "") for message in value)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of `prompts` (strings, or message lists rendered by the chat template), as text."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            if isinstance(batch[0], str):
                encoded = tokenizer(batch, return_tensors="pt", padding=True)
            else:
                texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
                encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = generated[:, encoded["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
