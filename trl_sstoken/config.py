"""`SSTokenConfig`: every knob of ssToken selection, on top of TRL's `SFTConfig`."""

import dataclasses
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import TrainingArguments
from trl import SFTConfig

from .attention.scores import ATTENTION_SCORES
from .bounded import bounded_repr
from .history.modes import HISTORY_MODES
from .selection.methods import BUILTIN_METHODS, METHODS, selection_method_help


SELECTION_METHODS = BUILTIN_METHODS  # the shipped methods; validation reads the live registry (METHODS)
LOSS_NORMALIZATIONS = ("selected", "sequence", "all")
SELECTION_POSITIONS = ("paper", "balanced")

# Every ssToken field's metadata says, besides its `help`:
# - `group`: its documentation group, a heading of the class docstring and of the configuration reference
#   (`field_groups`); the fields are declared group after group, in this order;
GROUP_SELECTION = "Parameters that control which tokens are trained on"
GROUP_HISTORY = "Parameters that control the history model"
GROUP_BASELINES = "Parameters that control the baselines"
GROUP_REFERENCE_TRAINING = "Parameters that train the Rho-1 reference from a clean set"
GROUP_DIVERGENCE = "Parameters that stop a diverging run"
# - `resume`: what resuming a checkpoint requires of it (`saving/resume.py` records and compares the settings):
RESUME_MUST_MATCH = "must_match"  # the checkpoint's value: it decides what is selected or what state is saved
RESUME_WHETHER_SET = "must_match_whether_set"  # only whether it is set (a cache folder may move, not appear)
RESUME_FREE = "free"  # may change on resume: memory, devices, side passes, when to stop
RESUME_RULES = (RESUME_MUST_MATCH, RESUME_WHETHER_SET, RESUME_FREE)

# The fields SSTokenConfig inherits (SFTConfig, TrainingArguments) that a resume must match, and why. Any other
# inherited field may change on resume and takes effect from the resumed step on (max_steps, logging, saving, ...).
# The examples per optimizer step (per_device_train_batch_size x gradient_accumulation_steps x world size) must
# match too, as `total_train_batch_size`; how they are split may change (a smaller GPU, more accumulation).
SFT_RESUME_MUST_MATCH = {
    "seed": "draws the data order (without data_seed) and the random selection",
    "data_seed": "draws the data order; the position in the data is part of the checkpoint",
    "max_length": "truncates the training sequences",
    "packing": "decides the training sequences",
    "completion_only_loss": "decides which tokens are trained on",
    "assistant_only_loss": "decides which tokens are trained on",
    "learning_rate": "the optimizer and scheduler states come from the checkpoint: a new value would be ignored",
    "lr_scheduler_type": "the schedule would change in the middle of the run",
    "lr_scheduler_kwargs": "the schedule would change in the middle of the run",
    "warmup_steps": "the schedule would change in the middle of the run",
    "weight_decay": "kept in the optimizer state: a new value would be ignored",
    "adam_beta1": "kept in the optimizer state: a new value would be ignored",
    "adam_beta2": "kept in the optimizer state: a new value would be ignored",
    "adam_epsilon": "kept in the optimizer state: a new value would be ignored",
    "optim": "the optimizer state belongs to this optimizer",
    "optim_args": "the optimizer state belongs to this optimizer",
}


@dataclass
class SSTokenConfig(SFTConfig):
    r"""
    Configuration class for [`SSTokenTrainer`]: everything [`~trl.SFTConfig`] takes, plus the fields below.

    Parameters:
        > Parameters that control which tokens are trained on

        selection_method (`str`, *optional*, defaults to `"sstoken"`):
            How response tokens are chosen: the name of a registered selection method
            (`trl_sstoken.selection.methods.METHODS`: the ssToken family, the controls and the baselines the package
            ships, and any registered with `register`). Each method's one-line description is in the field's help
            (`trl-sstoken train --help`) and in docs/configuration.md, read from the registry.
        selection_ratio (`float`, *optional*, defaults to `0.6`):
            Fraction of each sequence's response tokens that is trained on: `ceil(selection_ratio * n)` per sequence.
        selection_gamma (`float`, *optional*, defaults to `0.5`):
            Weight of the min-max normalised REL in the `"sstoken"` score; the attention score gets `1 - gamma`.
        selection_positions (`str`, *optional*, defaults to `"paper"`):
            How each sequence's top-k is taken. `"paper"`: one top-k over the whole response (the paper's);
            `"balanced"`: the same k, taken as quotas from `selection_position_buckets` contiguous relative-position
            buckets of the sequence's response tokens (largest-remainder quotas proportional to the bucket sizes), so
            the kept fraction is flat along the response and the score chooses within each bucket. For every method
            that ranks a top-k (`sstoken`, `rel`, `attention`, `random`; `rho1` with buckets pooled over the
            micro-batch); refused for `full`, `dft` and `profit`. See docs/method.md, "Position-balanced selection".
        selection_position_buckets (`int`, *optional*, defaults to `10`):
            Number of relative-position buckets of `selection_positions="balanced"` (tenths by default). 1 is the
            paper's top-k exactly; a response shorter than this has buckets of one token and empty ones.
        attention_layer (`int`, *optional*, defaults to `-1`):
            Attention layer whose attention to the context is measured, counting only the layers that have
            attention (hybrid models interleave them with Mamba layers). Negative values count from the end: -1 is
            the last.
        attention_score (`str`, *optional*, defaults to `"context_mass"`):
            Which attention statistic is the semantic signal. `"context_mass"`: the paper's, the head-mean attention
            mass on every context key (the attention sink included); `"sink_free"`: the context mass with the sink
            (the first token of each sequence) removed and the rest renormalised, pooled over heads;
            `"position_corrected"`: the sink-free mass relative to uniform attention over the visible keys,
            `m / (m + u)` (0.5 = uniform), so a late response token is not penalised for seeing more response tokens.
            See docs/method.md.
        attention_warmup_ratio (`float`, *optional*, defaults to `0.2`):
            Fraction of the training steps at the start during which REL-based methods select by attention only.
        allow_rel_fallback (`bool`, *optional*, defaults to `False`):
            If the model's attention cannot be captured (an architecture whose attention does not run through
            transformers' `AttentionInterface`, such as Bloom's ALiBi or Falcon, or an unknown attention
            implementation), select by REL alone (warm-up included) instead of raising.
        attention_chunk_size (`int`, *optional*, defaults to `256`):
            Number of query rows whose attention is materialised at a time when computing the attention score.
        selection_loss_normalization (`str`, *optional*, defaults to `"selected"`):
            Denominator of the loss. `"selected"`: the number of kept tokens in the whole gradient-accumulation window
            (and across processes); `"sequence"`: mean over the kept tokens of each sequence, then over sequences;
            `"all"`: TRL's denominator, every response token.

        > Parameters that control the history model

        history (`str`, *optional*, defaults to `"base"`):
            The earlier state of the model REL compares against. `"base"`: the model with its LoRA adapter disabled;
            `"lagged"`: a frozen copy of the adapter, refreshed every `history_update_steps` optimizer steps; `"ema"`:
            an exponential moving average of the adapter, updated every `history_update_steps` optimizer steps.
        history_update_steps (`int`, *optional*, defaults to `50`):
            Optimizer steps between two updates of a `"lagged"` or `"ema"` history.
        history_ema_alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the old history in an `"ema"` update: `history <- alpha * history + (1 - alpha) * adapter`.
        history_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            With `history="base"`: compute the base model's log-probs once, in a no-grad pass over the training set
            before training, store them in this directory and reuse them in later runs; training then runs no history
            forward at all.
        history_cache_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Batch size of the caching pass. `None` uses twice `per_device_train_batch_size`.
        history_device (`str` or `None`, *optional*, defaults to `None`):
            Full fine-tuning only: device of the history model copy (e.g. `"cpu"` or `"cuda:1"`). `None` keeps it on
            the model's device.
        history_copy_max_gb (`float` or `None`, *optional*, defaults to `None`):
            Full fine-tuning only: refuse to build a history model copy larger than this many GiB of parameters.

        > Parameters that control the baselines

        profit_threshold (`float`, *optional*, defaults to `0.1`):
            `"profit"` keeps the response tokens whose current probability is at least this.
        reference_model (`str` or `None`, *optional*, defaults to `None`):
            `"rho1"`: hub id or local path of the reference model, loaded frozen next to the trained one.
        reference_adapter (`str` or `None`, *optional*, defaults to `None`):
            `"rho1"`: local path of a LoRA adapter loaded as a frozen extra adapter on the trained model's base.

        > Parameters that train the Rho-1 reference from a clean set

        reference_dataset (`datasets.Dataset`, `str` or `None`, *optional*, defaults to `None`):
            `"rho1"`: a small trusted (clean) dataset, in the same formats as the training data: a `datasets.Dataset`,
            or (also `--reference_dataset_name` on the command line) a hub id, a local .json/.jsonl/.csv/.parquet
            file or a dataset folder. Before the main run the trainer trains a LoRA reference adapter on it (full SFT,
            the main run's LoRA, learning rate, batch size, schedule and max length, `reference_max_steps` steps),
            saves it in `output_dir/_rho1_reference/` with a fingerprint of the data, the base model and the recipe,
            and reuses it on resume and rerun (a stale one is refused). Needs a PEFT adapter (`peft_config`).
        reference_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of `reference_dataset` when it names a dataset with several splits (or a data file).
        reference_max_steps (`int`, *optional*, defaults to `16`):
            Optimizer steps of the reference adapter's training: the benchmark's recipe (16 steps of batch 8 on 48
            clean examples, about 2.7 epochs). With a larger clean set, raise it to about 3 epochs.

        > Parameters that stop a diverging run

        max_consecutive_skipped_steps (`int` or `None`, *optional*, defaults to `5`):
            Training stops with `TrainingDivergedError` after this many optimizer steps in a row in which every
            micro-batch (on every process) had non-finite log-probabilities and was skipped. `None` never stops for
            skips alone; non-finite trained weights always stop the run (docs/reliability.md, "Divergence").
    """

    # Parameters that control which tokens are trained on
    selection_method: str = field(
        default="sstoken",
        metadata={
            "help": selection_method_help(),
            "choices": METHODS.keys(),  # a live view: methods registered later too
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    selection_ratio: float = field(
        default=0.6,
        metadata={
            "help": "Fraction of each sequence's response tokens to train on: ceil(selection_ratio * n) per "
            "sequence. In (0, 1].",
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    selection_gamma: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the min-max normalised REL in the 'sstoken' score; attention gets 1 - gamma. In [0, 1].",
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    selection_positions: str = field(
        default="paper",
        metadata={
            "help": "How each sequence's top-k is taken: 'paper' (one top-k over the whole response) or 'balanced' "
            "(the same k as quotas from selection_position_buckets contiguous relative-position buckets of the "
            "response, proportional to their sizes, so the kept fraction is flat along the response while the score "
            "chooses within each bucket). For sstoken, rel, attention, random and rho1 (buckets pooled over the "
            "micro-batch); not for full, dft or profit.",
            "choices": list(SELECTION_POSITIONS),
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    selection_position_buckets: int = field(
        default=10,
        metadata={
            "help": "Relative-position buckets of selection_positions='balanced' (10: tenths of the response). Each "
            "bucket's quota is within one token of proportional; a response with fewer tokens than buckets has "
            "buckets of one token and empty ones, and still keeps exactly k; 1 is the paper's top-k. At least 1.",
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    attention_layer: int = field(
        default=-1,
        metadata={
            "help": "Attention layer whose attention to the context is measured, counting only layers that have "
            "attention (hybrids interleave them with Mamba layers); negative values count from the end (-1 = the "
            "last attention layer).",
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    attention_score: str = field(
        default="context_mass",
        metadata={
            "help": "Attention statistic used as the semantic signal: 'context_mass' (the paper's: mass on every "
            "context key, sink included), 'sink_free' (the first token of each sequence removed and the rest "
            "renormalised, pooled over heads) or 'position_corrected' (sink-free mass relative to uniform "
            "attention over the visible keys, m / (m + u)).",
            "choices": ATTENTION_SCORES.keys(),
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    attention_warmup_ratio: float = field(
        default=0.2,
        metadata={
            "help": "Fraction of training steps at the start during which 'sstoken' and 'rel' select by attention "
            "only, because the history still equals the current model. In [0, 1].",
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    allow_rel_fallback: bool = field(
        default=False,
        metadata={
            "help": "If the model's attention cannot be captured, select by REL alone (warm-up included) instead of "
            "raising. Only for 'sstoken' and 'rel'.",
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    attention_chunk_size: int = field(
        default=256,
        metadata={
            "help": "Query rows whose attention is materialised at a time when computing the attention score. "
            "Bounds its extra memory to (chunk x sequence length) per head. At least 1.",
            "group": GROUP_SELECTION,
            "resume": RESUME_FREE,
        },
    )
    selection_loss_normalization: str = field(
        default="selected",
        metadata={
            "help": "Loss denominator: 'selected' (kept tokens in the whole accumulation window, split-invariant), "
            "'sequence' (mean per sequence, then over sequences) or 'all' (every response token, as TRL).",
            "choices": list(LOSS_NORMALIZATIONS),
            "group": GROUP_SELECTION,
            "resume": RESUME_MUST_MATCH,
        },
    )
    # Parameters that control the history model
    history: str = field(
        default="base",
        metadata={
            "help": "History model REL compares against: 'base' (adapter disabled), 'lagged' (adapter copy "
            "refreshed every history_update_steps) or 'ema' (moving average of the adapter).",
            "choices": HISTORY_MODES.keys(),
            "group": GROUP_HISTORY,
            "resume": RESUME_MUST_MATCH,
        },
    )
    history_update_steps: int = field(
        default=50,
        metadata={
            "help": "Optimizer steps between two updates of a 'lagged' or 'ema' history. At least 1.",
            "group": GROUP_HISTORY,
            "resume": RESUME_MUST_MATCH,
        },
    )
    history_ema_alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the old history in an 'ema' update: history <- alpha * history + (1 - alpha) * "
            "adapter. In [0, 1).",
            "group": GROUP_HISTORY,
            "resume": RESUME_MUST_MATCH,
        },
    )

    history_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "With history='base': cache the base model's log-probs here in one no-grad pass before training "
            "and reuse them (this run and later ones), so training runs no history forward.",
            "group": GROUP_HISTORY,
            "resume": RESUME_WHETHER_SET,
        },
    )
    history_cache_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the history caching pass; None uses 2 x per_device_train_batch_size.",
            "group": GROUP_HISTORY,
            "resume": RESUME_FREE,
        },
    )
    history_device: str | None = field(
        default=None,
        metadata={
            "help": "Full fine-tuning only: device of the history model copy, e.g. 'cpu' or 'cuda:1'. None keeps "
            "it on the model's device.",
            "group": GROUP_HISTORY,
            "resume": RESUME_FREE,
        },
    )
    history_copy_max_gb: float | None = field(
        default=None,
        metadata={
            "help": "Full fine-tuning only: refuse to build a history model copy larger than this many GiB of "
            "parameters. None sets no limit.",
            "group": GROUP_HISTORY,
            "resume": RESUME_FREE,
        },
    )

    # Parameters that control the baselines
    profit_threshold: float = field(
        default=0.1,
        metadata={
            "help": "'profit' keeps the response tokens whose current probability is at least this. In (0, 1).",
            "group": GROUP_BASELINES,
            "resume": RESUME_MUST_MATCH,
        },
    )
    reference_model: str | None = field(
        default=None,
        metadata={
            "help": "'rho1': hub id or local path of the reference model (same tokenizer), loaded frozen.",
            "group": GROUP_BASELINES,
            "resume": RESUME_MUST_MATCH,
        },
    )
    reference_adapter: str | None = field(
        default=None,
        metadata={
            "help": "'rho1': local path of a LoRA adapter loaded as a frozen extra adapter on the trained base.",
            "group": GROUP_BASELINES,
            "resume": RESUME_MUST_MATCH,
        },
    )

    # Parameters that train the Rho-1 reference from a clean set (history/reference_training.py)
    reference_dataset: Dataset | str | None = field(
        default=None,
        metadata={
            "help": "'rho1': a small trusted dataset (same formats as the training data: a hub id, a local "
            ".json/.jsonl/.csv/.parquet file or a dataset folder; a datasets.Dataset in Python). The trainer trains "
            "the reference LoRA adapter on it before the main run (full SFT, the main run's recipe, "
            "reference_max_steps steps) and keeps it in output_dir/_rho1_reference/, reused when it still matches.",
            "aliases": ["--reference_dataset_name"],
            "group": GROUP_REFERENCE_TRAINING,
            "resume": RESUME_MUST_MATCH,
        },
    )
    reference_dataset_split: str = field(
        default="train",
        metadata={
            "help": "Split of reference_dataset (for a data file: the name it is loaded under).",
            "group": GROUP_REFERENCE_TRAINING,
            "resume": RESUME_MUST_MATCH,
        },
    )
    reference_max_steps: int = field(
        default=16,
        metadata={
            "help": "Optimizer steps of the reference adapter trained on reference_dataset (the benchmark's recipe: "
            "16 steps of batch 8 on 48 clean examples, ~2.7 epochs). At least 1.",
            "group": GROUP_REFERENCE_TRAINING,
            "resume": RESUME_MUST_MATCH,
        },
    )

    # Parameters that stop a diverging run
    max_consecutive_skipped_steps: int | None = field(
        default=5,
        metadata={
            "help": "Stop with TrainingDivergedError after this many optimizer steps in a row in which every "
            "micro-batch had non-finite log-probabilities and was skipped. At least 1; None never stops for skips "
            "alone (non-finite trained weights always stop the run).",
            "group": GROUP_DIVERGENCE,
            "resume": RESUME_FREE,
        },
    )

    def __post_init__(self):
        self._validate_selection_fields()
        super().__post_init__()

    def validate(self) -> None:
        """Checks the ssToken fields again, e.g. after one was edited; `SSTokenTrainer` calls it when it is built."""
        self._validate_selection_fields()

    def _validate_selection_fields(self):
        """Checks the ssToken fields before `SFTConfig` does any work, so a typo fails at once."""
        _check_choice("selection_method", self.selection_method, METHODS)  # the registry now, not at import
        _check_choice("history", self.history, HISTORY_MODES)
        _check_choice("attention_score", self.attention_score, ATTENTION_SCORES)
        _check_choice("selection_loss_normalization", self.selection_loss_normalization, LOSS_NORMALIZATIONS)
        _check_choice("selection_positions", self.selection_positions, SELECTION_POSITIONS)
        _check_integer("selection_position_buckets", self.selection_position_buckets, minimum=1)
        _check_number("selection_ratio", self.selection_ratio, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_number("selection_gamma", self.selection_gamma, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("attention_warmup_ratio", self.attention_warmup_ratio, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("history_ema_alpha", self.history_ema_alpha, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_integer("history_update_steps", self.history_update_steps, minimum=1)
        _check_integer("attention_chunk_size", self.attention_chunk_size, minimum=1)
        _check_integer("attention_layer", self.attention_layer, minimum=None)
        _check_number("profit_threshold", self.profit_threshold, "in (0, 1)", lambda v: 0 < v < 1)
        method = METHODS[self.selection_method]
        if self.selection_positions == "balanced" and not method.balances_positions:
            raise ValueError(
                f"selection_positions='balanced' balances a top-k by response position, but "
                f"selection_method={self.selection_method!r} takes no top-k (it keeps every response token, or a "
                "number known only after the forward). Use selection_positions='paper' with this method, or one of "
                f"{', '.join(repr(name) for name, m in METHODS.items() if m.balances_positions)}."
            )
        self._validate_reference_dataset(method)
        references = [self.reference_model, self.reference_adapter, self.reference_dataset]
        if method.needs_reference and sum(value is not None for value in references) != 1:
            raise ValueError(
                f"selection_method={self.selection_method!r} needs exactly one reference: set reference_model (a "
                "model path or hub id), reference_adapter (a LoRA adapter path) or reference_dataset (a clean set "
                f"to train the reference adapter on); got reference_model={bounded_repr(self.reference_model)}, "
                f"reference_adapter={bounded_repr(self.reference_adapter)}, "
                f"reference_dataset={describe_reference_dataset(self.reference_dataset)}."
            )
        if not method.kept_count_known and self.selection_loss_normalization == "selected":
            raise ValueError(
                f"selection_method={self.selection_method!r} keeps a number of tokens that is only known after the "
                "forward pass, so selection_loss_normalization='selected' cannot be normalised over the accumulation "
                "window. Use selection_loss_normalization='all' (ProFit's own normalisation) or 'sequence'."
            )
        if self.history_cache_batch_size is not None:
            _check_integer("history_cache_batch_size", self.history_cache_batch_size, minimum=1)
        if self.history_copy_max_gb is not None:
            _check_number("history_copy_max_gb", self.history_copy_max_gb, "> 0", lambda v: v > 0)
        if self.history_cache_dir is not None and (
            not isinstance(self.history_cache_dir, (str, os.PathLike)) or not str(self.history_cache_dir).strip()
        ):
            raise ValueError(
                f"history_cache_dir={bounded_repr(self.history_cache_dir)} is not a directory path (an empty string "
                "would write the cache into the current directory). Give a directory, or None to compute the history "
                "on the fly."
            )
        if self.history_cache_dir is not None and not HISTORY_MODES[self.history].fixed:
            raise ValueError(
                f"history_cache_dir is only valid with history='base' (got history={self.history!r}): only the base "
                "model's log-probs stay fixed during training. Unset history_cache_dir or use history='base'."
            )
        if self.max_consecutive_skipped_steps is not None:
            _check_integer("max_consecutive_skipped_steps", self.max_consecutive_skipped_steps, minimum=1)
        _check_optimizer_fields(self)
        _check_run_fields(self)
        if self.loss_type != "nll":
            raise ValueError(
                f"loss_type={bounded_repr(self.loss_type)} is not supported by SSTokenTrainer: its loss is the NLL of "
                "the selected tokens, computed by the trainer itself. Use loss_type='nll' (the default); for DFT use "
                "selection_method='dft'."
            )

    def _validate_reference_dataset(self, method):
        """`reference_dataset` and its settings: checked before any model or data is loaded."""
        _check_integer("reference_max_steps", self.reference_max_steps, minimum=1)
        if not isinstance(self.reference_dataset_split, str) or not self.reference_dataset_split.strip():
            raise ValueError(
                "reference_dataset_split must be a split name such as 'train', got "
                f"{bounded_repr(self.reference_dataset_split)}."
            )
        value = self.reference_dataset
        if value is None:
            return
        if not method.needs_reference:
            raise ValueError(
                f"reference_dataset is only used by selection_method='rho1' (it trains Rho-1's reference adapter); "
                f"got selection_method={self.selection_method!r}. Unset reference_dataset or use 'rho1'."
            )
        if isinstance(value, Dataset):
            if len(value) == 0:
                raise ValueError("reference_dataset is empty (0 rows); the reference adapter needs clean examples.")
            return
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ValueError(
                f"reference_dataset must be a datasets.Dataset, a hub id, a local data file or a dataset folder; got "
                f"{describe_reference_dataset(value)} ({type(value).__name__}). A DatasetDict: pick a split, e.g. "
                "dataset['train']."
            )
        from .loading import looks_like_a_path

        if not os.path.exists(value) and looks_like_a_path(str(value)):
            raise ValueError(
                f"reference_dataset={str(value)[:200]!r} looks like a local path, but no such file or folder exists. "
                "Pass an existing .json/.jsonl/.csv/.parquet file, a dataset folder, or a hub id."
            )

    def to_dict(self):
        """As `TrainingArguments.to_dict`, with a `reference_dataset` object written as a short description, so that
        the settings stay JSON (logs, model cards)."""
        values = super().to_dict()
        if "reference_dataset" in values and not isinstance(values["reference_dataset"], (str, type(None))):
            values["reference_dataset"] = describe_reference_dataset(values["reference_dataset"])
        return values

    @property
    def effective_gamma(self) -> float:
        """The REL weight the selection method implies, outside the warm-up."""
        gamma = METHODS[self.selection_method].gamma
        return self.selection_gamma if gamma is None else gamma


OTHER_GROUP = "Other ssToken parameters"
SSTOKEN_METADATA_KEYS = ("group", "resume")


class FieldMetadata(Mapping):
    """The metadata of an ssToken field, readable by key, with `group` and `resume` left out of iteration.

    `HfArgumentParser` (so TRL's `TrlParser`, the CLI and any `trl sft`-style script parsing `SSTokenConfig`) passes
    every key it iterates (or copies) in a field's metadata to argparse's `add_argument`, which refuses keys it does not know.
    ssToken's own keys are therefore read by name (`field.metadata["resume"]`, `.get("group")`), and iterating the
    metadata gives what argparse takes (`help`, `choices`, `aliases`).
    """

    def __init__(self, values):
        self._values = dict(values)

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return (key for key in self._values if key not in SSTOKEN_METADATA_KEYS)

    def __len__(self):
        return sum(1 for _ in self)

    def copy(self) -> dict:
        """What a parser copies (TRL's `HfArgumentParser` calls `field.metadata.copy()`): the argparse keys."""
        return {key: self._values[key] for key in self}

    def __repr__(self):
        return f"FieldMetadata({self._values!r})"


def sstoken_fields() -> list[dataclasses.Field]:
    """The fields `SSTokenConfig` adds to `SFTConfig`, in declaration order."""
    inherited = {field.name for field in dataclasses.fields(SFTConfig)}
    return [field for field in dataclasses.fields(SSTokenConfig) if field.name not in inherited]


def field_groups() -> dict[str, list[dataclasses.Field]]:
    """The ssToken fields under their `group` headings ("Parameters that ..."), groups and fields in declaration
    order. A field without a `group` lands in OTHER_GROUP, so it still reaches the reference (and a test fails)."""
    groups = {}
    for declared in sstoken_fields():
        groups.setdefault(declared.metadata.get("group", OTHER_GROUP), []).append(declared)
    if OTHER_GROUP in groups:
        groups[OTHER_GROUP] = groups.pop(OTHER_GROUP)
    return groups


def resume_rule(declared: dataclasses.Field) -> str:
    """What a resume requires of a field (RESUME_RULES); one without the metadata must match, the safe side."""
    return declared.metadata.get("resume", RESUME_MUST_MATCH)


for _field in sstoken_fields():
    _field.metadata = types.MappingProxyType(FieldMetadata(_field.metadata))
del _field

# The docstring's and the reference's groups, in order: {heading: field names}, read off the metadata
FIELD_GROUPS = {heading: tuple(field.name for field in fields) for heading, fields in field_groups().items()}


def describe_reference_dataset(value) -> str:
    """A short text for a `reference_dataset` value: a Dataset by its size and columns, a name bounded in length."""
    if isinstance(value, Dataset):
        return f"<datasets.Dataset: {len(value)} rows, columns {value.column_names}>"
    return repr(value)[:200]


def as_sstoken_config(model, args) -> SSTokenConfig:
    """Like SFTTrainer with SFTConfig: None gets defaults, other training arguments are converted."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return SSTokenConfig(f"{str(model_name).split('/')[-1]}-SSToken")
    if isinstance(args, SSTokenConfig):
        return args
    if isinstance(args, TrainingArguments):
        dict_args = args.to_dict()
        # to_dict masks every `*_token` field (hub_token, but also SFTConfig's eos_token and pad_token)
        dict_args.update({name: getattr(args, name) for name in dict_args if name.endswith("_token")})
        return SSTokenConfig(**dict_args)
    raise TypeError(f"args must be an SSTokenConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")


def _check_choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:  # a list is no choice (and `in` a dict would raise)
        raise ValueError(
            f"{name}={bounded_repr(value)} is not supported; allowed values: {', '.join(map(repr, allowed))}."
        )


def _check_number(name, value, allowed_text, is_allowed):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a number {allowed_text}, got {bounded_repr(value)} ({type(value).__name__})."
        )
    if not is_allowed(value):
        raise ValueError(f"{name}={bounded_repr(value)} is out of range; it must be {allowed_text}.")


def _check_integer(name, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {bounded_repr(value)} ({type(value).__name__}).")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(
            f"{name}={bounded_repr(value)} is out of range; it must be an integer in [{minimum}, {maximum}]."
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={bounded_repr(value)} is out of range; it must be an integer >= {minimum}.")


# numpy's legacy seeding (transformers.set_seed seeds random, numpy and torch) takes 0 to 2**32 - 1 only
MAX_SEED = 2**32 - 1


def _check_run_fields(args) -> None:
    """Fields inherited from `TrainingArguments` and `SFTConfig`, which check none of these, refused at construction
    because they fail only after the model and data are loaded, or silently: a negative `max_length` cut every
    sequence from its end (Python slicing) and trained on the rest; `gradient_accumulation_steps=0` was a
    ZeroDivisionError when training started; a seed of 1.5 or -1 a raw numpy error naming no field."""
    _check_integer("seed", args.seed, minimum=0, maximum=MAX_SEED)
    if args.data_seed is not None:
        _check_integer("data_seed", args.data_seed, minimum=0, maximum=MAX_SEED)
    if args.max_length is not None:
        _check_integer("max_length", args.max_length, minimum=1)
    _check_integer("gradient_accumulation_steps", args.gradient_accumulation_steps, minimum=1)
    _check_integer("per_device_train_batch_size", args.per_device_train_batch_size, minimum=1)
    _check_integer("per_device_eval_batch_size", args.per_device_eval_batch_size, minimum=1)


def _check_optimizer_fields(args) -> None:
    """The optimizer's hyperparameters (inherited from `TrainingArguments`, which checks none of these), refused at
    construction when they can only produce NaN weights or no training: an infinite learning rate or weight decay,
    a zero `adam_epsilon` (0 / 0 on the first step of a weight whose gradient is 0), betas outside [0, 1), ..."""
    finite = math.isfinite
    _check_number("learning_rate", args.learning_rate, "finite and > 0", lambda v: finite(v) and v > 0)
    _check_number("weight_decay", args.weight_decay, "finite and >= 0", lambda v: finite(v) and v >= 0)
    _check_number("adam_beta1", args.adam_beta1, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_number("adam_beta2", args.adam_beta2, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_number("adam_epsilon", args.adam_epsilon, "finite and > 0", lambda v: finite(v) and v > 0)
    _check_number(
        "max_grad_norm", args.max_grad_norm, "finite and >= 0 (0 turns clipping off)", lambda v: finite(v) and v >= 0
    )
    _check_number("warmup_steps", args.warmup_steps, "finite and >= 0", lambda v: finite(v) and v >= 0)
    if args.neftune_noise_alpha is not None:
        _check_number(
            "neftune_noise_alpha", args.neftune_noise_alpha, "finite and >= 0, or None", lambda v: finite(v) and v >= 0
        )
