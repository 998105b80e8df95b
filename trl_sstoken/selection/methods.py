"""The selection methods: one class each, and the registry that config, trainer, report and CLI read.

A method declares what its step needs (a history forward for REL, the attention capture, a reference model), how
many tokens it keeps per gradient-accumulation window (known from the labels alone, before any forward, for every
method but `profit`), which tokens it keeps, and the weight of each kept token's NLL. The math is in `scoring.py`;
a method only says which of it applies. Per-sequence methods work on one row per original sequence
(`Regions.to_sequences`), so padded, padding-free and packed batches are selected alike, and map the result back.

Adding a method: one subclass of `SelectionMethod` under `@register` (in or out of the package), and its tests. The
registry is read at use time: config validation, the `selection_method` choices, the trainer, the report and the
model card all look the name up in `METHODS` when they need it, so a method registered by user code is a method like
any other. `register` checks the class when it is registered (PEFT's `register_peft_method` style).
"""

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..markdown_escape import markdown_code
from .regions import Regions
from .scoring import (
    balanced_top_k_per_batch,
    balanced_top_k_per_row,
    combine_scores,
    num_to_keep,
    probability_weights,
    select_by_probability,
    select_random,
    top_k_per_batch,
    top_k_per_row,
)


@dataclass
class StepPlan:
    """What one micro-batch needs, decided from its labels before any forward pass."""

    gamma: torch.Tensor | None  # (S,) REL weight per sequence (Regions.layout); None for methods without a score
    needs_history: bool
    needs_attention: bool
    in_warmup: bool = False
    needs_reference: bool = False
    rel_only_sequences: int = 0  # sequences with a response but no context, selected by REL alone


@dataclass
class Signals:
    """What the forward passes of one micro-batch produced, in prediction space (B, T-1); None where not computed."""

    current_logps: torch.Tensor  # detached
    rel: torch.Tensor | None = None  # log p_cur - log p_hist
    attention: torch.Tensor | None = None  # attention mass on the context, in [0, 1]
    excess_loss: torch.Tensor | None = None  # Rho-1: L_cur - L_ref
    generator: torch.Generator | None = None  # for methods that draw at random


@dataclass
class Selection:
    """The outcome of scoring one micro-batch. Token tensors are (B, T-1), in prediction space."""

    keep: torch.Tensor  # bool, the tokens trained on
    regions: Regions
    plan: StepPlan
    score: torch.Tensor | None = None  # the combined ssToken score the step ranked by; None for other methods
    signals: Signals | None = None  # what the step's forwards produced (REL, attention, excess loss)

    @property
    def rel(self) -> torch.Tensor | None:
        return None if self.signals is None else self.signals.rel

    @property
    def attention(self) -> torch.Tensor | None:
        return None if self.signals is None else self.signals.attention

    @property
    def excess_loss(self) -> torch.Tensor | None:
        return None if self.signals is None else self.signals.excess_loss


class SelectionMethod:
    """One way of choosing the response tokens to train on. Subclasses set the class attributes and `select`."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for the `selection_method` help
    needs_history: ClassVar[bool] = False  # REL: a history forward (sstoken, rel)
    needs_attention: ClassVar[bool] = False  # the attention capture on one layer
    needs_reference: ClassVar[bool] = False  # a reference model or adapter (rho1)
    draws_at_random: ClassVar[bool] = False
    kept_count_known: ClassVar[bool] = True  # kept count follows from labels: `selected` normalisation works
    balances_positions: ClassVar[bool] = False  # ranks a top-k that `selection_positions="balanced"` can balance
    gamma: ClassVar[float | None] = None  # fixed REL weight of a scored method; None: `selection_gamma`

    def __init__(self, args):
        self.args = args
        self.ratio = args.selection_ratio
        # Buckets of the position-balanced top-k; None: the paper's top-k over the whole response
        balanced = getattr(args, "selection_positions", "paper") == "balanced"
        self.position_buckets = getattr(args, "selection_position_buckets", 10) if balanced else None

    def plan(self, regions: Regions, in_warmup: bool, attention_available: bool) -> StepPlan:
        return StepPlan(None, needs_history=False, needs_attention=False, needs_reference=self.needs_reference)

    def kept_count(self, regions: Regions) -> torch.Tensor:
        """Tokens this method keeps from the micro-batch, () long, from its labels alone."""
        return regions.num_response.sum()

    def select(self, signals: Signals, regions: Regions, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep (B, T-1) bool, score (B, T-1) or None)."""
        raise NotImplementedError

    def token_weights(self, log_probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The weight of each token's NLL in the loss, (B, T-1) in `log_probs`' dtype: 1 on kept tokens, else 0."""
        return keep.to(log_probs.dtype)

    def describe(self) -> str:
        """What a run of this method trained on and ranked by, with this run's numbers: the model card's sentence
        (completes "each training step trained on ..."). The default restates `description`."""
        return f"the tokens the `{self.name}` method selects: {self.description}"

    def describe_positions(self) -> str:
        """The model card's clause for `selection_positions='balanced'`; empty for the paper's top-k."""
        if self.position_buckets is None:
            return ""
        return (
            f", taken position-balanced (`selection_positions='balanced'`: quotas from {self.position_buckets} "
            "relative-position buckets of each response)"
        )


METHODS: dict[str, type[SelectionMethod]] = {}
_FLAGS = (
    "needs_history",
    "needs_attention",
    "needs_reference",
    "draws_at_random",
    "kept_count_known",
    "balances_positions",
)


def register(method: type[SelectionMethod]) -> type[SelectionMethod]:
    """Adds `method` to `METHODS` under its `name`, after checking it: a `SelectionMethod` subclass with a new
    identifier-like `name`, a one-line `description`, boolean flags, and its own `select`. Usable as a decorator."""
    if not (isinstance(method, type) and issubclass(method, SelectionMethod)):
        raise TypeError(f"register() takes a SelectionMethod subclass, got {method!r}.")
    name = method.__dict__.get("name")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(
            f"{method.__qualname__} needs its own class attribute `name`, a non-empty identifier such as 'my_method' "
            f"(got {name!r})."
        )
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(
            f"selection method {name!r} is already registered by {METHODS[name].__module__}."
            f"{METHODS[name].__qualname__}; choose another name."
        )
    description = getattr(method, "description", None)
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"{method.__qualname__} needs a class attribute `description` (one line for the help).")
    for flag in _FLAGS:
        if not isinstance(getattr(method, flag), bool):
            raise ValueError(f"{method.__qualname__}.{flag} must be True or False, got {getattr(method, flag)!r}.")
    if method.select is SelectionMethod.select:
        raise ValueError(f"{method.__qualname__} must define select(signals, regions, plan).")
    METHODS[name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The names of the registered methods, now (the registry is open: read it at use time)."""
    return tuple(METHODS)


class PerSequenceTopK(SelectionMethod):
    """Keeps ceil(ratio * n) of each sequence's n response tokens."""

    balances_positions = True

    def kept_count(self, regions: Regions) -> torch.Tensor:
        return num_to_keep(regions.sequence_response, self.ratio).sum()

    def top_k(self, score: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """The kept tokens of each sequence row (S, L): the paper's top-k, or its position-balanced variant."""
        k = num_to_keep(response, self.ratio)
        if self.position_buckets is None:
            return top_k_per_row(score, response, k)
        return balanced_top_k_per_row(score, response, k, self.position_buckets)


class ScoredMethod(PerSequenceTopK):
    """ssToken's family: the top tokens of each sequence by `gamma * minmax(REL) + (1 - gamma) * attention`."""

    needs_attention = True

    def plan(self, regions: Regions, in_warmup: bool, attention_available: bool) -> StepPlan:
        in_warmup = in_warmup and self.needs_history  # the warm-up selects by attention while history == current
        gamma = self.args.selection_gamma if self.gamma is None else self.gamma
        gamma = torch.full(regions.num_response.shape, 0.0 if in_warmup else gamma)
        if not attention_available:  # allow_rel_fallback: the attention cannot be captured
            return StepPlan(torch.ones_like(gamma), needs_history=True, needs_attention=False)
        has_response = (regions.num_response > 0).cpu()
        no_context = has_response & ~regions.has_context.cpu()
        if bool(no_context.any()):
            self.check_context(int(no_context.sum()))
            gamma = torch.where(no_context, 1.0, gamma)
        active = gamma[has_response]
        return StepPlan(
            gamma,
            needs_history=bool((active > 0).any()),
            needs_attention=bool((active < 1).any()),
            in_warmup=in_warmup,
            rel_only_sequences=int(no_context.sum()),
        )

    def check_context(self, num_without_context: int) -> None:
        """Sequences without any context have no attention score: by default they are selected by REL alone."""

    def describe(self) -> str:
        gamma = self.args.selection_gamma if self.gamma is None else self.gamma
        attention = f"attention to the prompt (`attention_score={self.args.attention_score!r}`)"
        if gamma == 1:
            ranking = "REL alone"
        elif gamma == 0:
            ranking = f"{attention} alone"
        else:
            ranking = f"`{gamma:g} * minmax(REL) + {1 - gamma:g} * attention` (attention to the prompt, "
            ranking += f"`attention_score={self.args.attention_score!r}`)"
        text = f"the top {self.ratio:g} of every response's tokens, ranked by {ranking}"
        if self.needs_history and gamma > 0:
            text += (
                f", where REL is the retrospective excess loss against the history model (`history={self.args.history!r}`) "
                "([Qin et al., 2025](https://arxiv.org/abs/2510.18250))"
            )
            if self.args.attention_warmup_ratio > 0:
                text += f"; the first {self.args.attention_warmup_ratio:g} of the steps ranked by attention alone"
        return text + self.describe_positions()

    def select(self, signals: Signals, regions: Regions, plan: StepPlan):
        response = regions.sequence_response  # (S, L)
        rel, attention = (
            None if values is None else regions.to_sequences(values.float(), 0.0)
            for values in (signals.rel, signals.attention)
        )
        score = combine_scores(rel, attention, response, plan.gamma)  # (S, L)
        keep = self.top_k(score, response)
        return regions.to_predictions(keep, False), regions.to_predictions(score, 0.0)


@register
class SSToken(ScoredMethod):
    name = "sstoken"
    description = "gamma * minmax(REL) + (1 - gamma) * attention to the context"
    needs_history = True


@register
class RELOnly(ScoredMethod):
    name = "rel"
    description = "REL only, gamma = 1 (attention only during the warm-up)"
    needs_history = True
    gamma = 1.0


@register
class AttentionOnly(ScoredMethod):
    name = "attention"
    description = "attention to the context only, gamma = 0 (no history forward)"
    gamma = 0.0

    def check_context(self, num_without_context: int) -> None:
        raise ValueError(
            f"selection_method='attention' needs a context (prompt) before each response, but "
            f"{num_without_context} sequence(s) in this batch have none (no label -100 position before their "
            "first response token), e.g. plain language-modeling text. Use selection_method='sstoken', which "
            "falls back to REL for such sequences, or a prompt-completion / conversational dataset."
        )


@register
class RandomSubset(PerSequenceTopK):
    name = "random"
    description = "a uniform random subset of the same size"
    draws_at_random = True

    def select(self, signals: Signals, regions: Regions, plan: StepPlan):
        keep = select_random(regions.sequence_response, self.ratio, signals.generator, self.position_buckets)
        return regions.to_predictions(keep, False), None

    def describe(self) -> str:
        return f"a uniform random {self.ratio:g} of every response's tokens (a control: no score){self.describe_positions()}"


@register
class Full(SelectionMethod):
    name = "full"
    description = "every response token (plain SFT on the same code path)"

    def select(self, signals: Signals, regions: Regions, plan: StepPlan):
        return regions.response, None

    def describe(self) -> str:
        return "every response token (plain SFT, no selection)"


@register
class Rho1(SelectionMethod):
    name = "rho1"
    description = (
        "baseline: Rho-1's excess loss L_cur - L_ref against reference_model or reference_adapter, top "
        "selection_ratio of the micro-batch's response tokens"
    )
    needs_reference = True
    balances_positions = True  # per batch: quotas from relative-position buckets pooled over the sequences

    def kept_count(self, regions: Regions) -> torch.Tensor:  # top-k over the whole micro-batch
        return num_to_keep(regions.sequence_response.reshape(1, -1), self.ratio).sum()

    def select(self, signals: Signals, regions: Regions, plan: StepPlan):
        if self.position_buckets is None:
            return top_k_per_batch(signals.excess_loss, regions.response, self.ratio), None
        scores = regions.to_sequences(signals.excess_loss.float(), 0.0)
        keep = balanced_top_k_per_batch(scores, regions.sequence_response, self.ratio, self.position_buckets)
        return regions.to_predictions(keep, False), None

    def describe(self) -> str:
        args = self.args
        if args.reference_model is not None:
            reference = f"the reference model {markdown_code(args.reference_model)}"
        elif args.reference_adapter is not None:
            reference = f"the reference adapter {markdown_code(args.reference_adapter)}"
        else:
            reference = "a reference adapter trained on `reference_dataset` first"
        return (
            f"the top {self.ratio:g} of each micro-batch's response tokens, ranked by Rho-1's excess loss "
            f"`L_current - L_reference` against {reference}"
        ) + self.describe_positions()


@register
class ProFit(SelectionMethod):
    name = "profit"
    description = "baseline: tokens whose current probability is at least profit_threshold"
    kept_count_known = False  # known only after the forward; never used as a denominator

    def select(self, signals: Signals, regions: Regions, plan: StepPlan):
        return select_by_probability(signals.current_logps, regions.response, self.args.profit_threshold), None

    def describe(self) -> str:
        return f"the response tokens whose current probability is at least {self.args.profit_threshold:g} (ProFit)"


@register
class DFT(Full):
    name = "dft"
    description = "baseline: every response token, its NLL weighted by its detached probability"

    def token_weights(self, log_probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return probability_weights(log_probs, keep).to(log_probs.dtype)

    def describe(self) -> str:
        return "every response token, each token's NLL weighted by its detached probability (DFT)"


# The methods the package ships (a method registered later is in METHODS, not here: never validate against this)
BUILTIN_METHODS = tuple(METHODS)


def warmup_steps(ratio: float, max_steps: int) -> int:
    """Optimizer steps at the start that select by attention only (REL methods): ceil(ratio * max_steps)."""
    return math.ceil(round(ratio * max_steps, 6))


def step_generator(seed: int, global_step: int, micro_step: int, process_index: int) -> torch.Generator:
    """The generator of a method that draws at random, seeded by (seed, step, micro-step, process): reproducible and
    independent of the history."""
    key = f"{seed}:{global_step}:{micro_step}:{process_index}"
    return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))


def selection_method_help() -> str:
    """The `selection_method` help: every registered method with its one-line description."""
    return (
        "How response tokens are chosen. "
        + "; ".join(f"'{name}': {method.description}" for name, method in METHODS.items())
        + "."
    )
