"""The options `trl-sstoken compare` adds to `train`'s (which it takes unchanged: the same YAML and flags)."""

from dataclasses import dataclass, field

from ..config import SSTokenConfig


@dataclass
class CompareArguments:
    """Options of `compare`. The training config (YAML and flags) is `train`'s; `--output_dir` is the comparison's
    folder, with one subfolder per run."""

    methods: list[str] = field(
        default_factory=lambda: ["full", "sstoken"],
        metadata={
            "help": "The candidates, each a selection method optionally with settings: full sstoken rho1 "
            "'sstoken:selection_ratio=0.8,selection_gamma=0.25'. The first one is the row the others are compared "
            "with. rho1 needs a reference (--reference_dataset_name, a small clean set)."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Training seeds; each candidate is trained once per seed (mean and spread over seeds)."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The evaluation set you trust: a hub id, a local data file or a dataset folder. Defaults to "
            "--dataset_name (with --eval_split, which must then differ from --dataset_train_split)."
        },
    )
    eval_split: str = field(default="test", metadata={"help": "Split of the evaluation set."})
    eval_num_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples of the evaluation set only. At least 1."}
    )
    train_sample: float | None = field(
        default=None,
        metadata={
            "help": "Train every candidate on a sample of the training set: a fraction in (0, 1) (e.g. 0.05 for "
            "5%%) or a number of examples (>= 1). The same sample (fixed seed) for every run."
        },
    )
    metric: str | None = field(
        default=None,
        metadata={
            "help": "Optional metric as module:function, called as function(predictions, references) on greedy "
            "generations for the evaluation prompts and their reference responses (lists of str); returns a number "
            "or a dict of numbers, higher is better. Checked before any training."
        },
    )
    metric_max_new_tokens: int = field(
        default=64, metadata={"help": "Most new tokens per generation for --metric. At least 1."}
    )
    report_examples: int = field(
        default=16,
        metadata={"help": "Examples in each selecting method's selection report (0: no reports). At least 0."},
    )


@dataclass
class ComparedTrainingConfig(SSTokenConfig):
    """`train`'s config as `compare` reads it. Each candidate sets its own `selection_method`, so the checks that tie a
    method to its settings (a rho1 reference, ProFit's normalisation) run per candidate when the runs are planned
    (`runner.plan_runs`, before anything loads); here a given reference is checked as rho1 would check it."""

    def _validate_selection_fields(self):
        given = self.selection_method
        references = (self.reference_model, self.reference_adapter, self.reference_dataset)
        self.selection_method = "rho1" if any(value is not None for value in references) else "full"
        try:
            super()._validate_selection_fields()
        finally:
            self.selection_method = given
