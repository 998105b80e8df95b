"""Selection reports: run a trainer's scoring and selection over examples (no training) and write what it keeps.

`collect_examples` feeds the trainer's own prepared dataset, in order, through its own collator and
`SSTokenTrainer.preview_selection`, so a report shows exactly the tokens a training step at the trainer's current
state would keep. The drawing itself is `visualize.py`.
"""

import itertools
import os

import torch
from tqdm.auto import tqdm

from ..selection.methods import METHODS
from ..trainer import SSTokenTrainer
from .visualize import ExampleView, examples_from_selection, render_html, render_svg, summarize


def token_texts(tokenizer, input_ids: torch.Tensor) -> list[list[str]]:
    """Each token's own text, (B, T) strings: decoded one id at a time, so byte-level BPE keeps its spaces."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    cache: dict[int, str] = {}
    texts = []
    for row in input_ids.tolist():
        for token_id in row:
            if token_id not in cache:
                cache[token_id] = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        texts.append([cache[token_id] for token_id in row])
    return texts


def collect_examples(
    trainer: SSTokenTrainer, num_examples: int, batch_size: int = 8, progress: bool = True
) -> list[ExampleView]:
    """The first `num_examples` examples of `trainer.train_dataset`, scored and selected as a training step would.

    Runs `trainer.preview_selection` batch by batch (eval mode, no gradients), with a progress bar.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    dataset = trainer.train_dataset
    try:
        total = min(num_examples, len(dataset))
    except TypeError:  # an IterableDataset has no length
        total = num_examples
    rows = itertools.islice(iter(dataset), total)
    examples: list[ExampleView] = []
    with tqdm(total=total, desc="Scoring examples", unit="example", disable=not progress) as bar:
        while True:
            batch_rows = list(itertools.islice(rows, batch_size))
            if not batch_rows:
                break
            batch = trainer.data_collator(batch_rows)
            selection = trainer.preview_selection(batch)
            examples += examples_from_selection(
                token_texts(trainer.processing_class, batch["input_ids"]),
                selection.regions.valid.cpu(),
                selection.regions.response.cpu(),
                selection.keep.cpu(),
                score=_cpu(selection.score),  # what the step ranked by, per original sequence, mapped back
                rel=_cpu(selection.rel),
                attention=_cpu(selection.attention),
                first_index=len(examples),
            )
            bar.update(len(batch_rows))
    return examples


def report_settings(trainer: SSTokenTrainer, **extra) -> dict[str, object]:
    """The settings a report states: what was scored with what."""
    args = trainer.args
    settings = dict(extra)
    settings.update(
        selection_method=args.selection_method,
        selection_ratio=args.selection_ratio,
        selection_gamma=args.effective_gamma,
        attention_layer=args.attention_layer,
        history=args.history if METHODS[args.selection_method].needs_history else "(not used)",
        max_length=args.max_length,
        optimizer_step=trainer.state.global_step,
    )
    return settings


def write_report(
    path: str,
    examples: list[ExampleView],
    settings: dict[str, object],
    special_tokens: frozenset[str] = frozenset(),
    title: str = "ssToken selection report",
):
    """Writes the HTML report to `path` (folders created) and returns its `Summary`."""
    summary = summarize(examples, special_tokens=special_tokens)
    page = render_html(examples, summary, title=title, settings=settings)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write(page)
    return summary


def write_figure(path: str, examples: list[ExampleView], title: str | None = None):
    """Writes a static SVG picture of `examples` to `path`."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(render_svg(examples, title=title))


def special_tokens_of(tokenizer) -> frozenset[str]:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return frozenset(getattr(tokenizer, "all_special_tokens", []))


def _cpu(values):
    return None if values is None else values.cpu()
