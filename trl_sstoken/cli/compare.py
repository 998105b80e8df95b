"""`trl-sstoken compare`: `train`'s config and flags, plus the candidates, seeds, evaluation set and metric
(`trl_sstoken/compare/`)."""


def make_parser(prog: str):
    """`train`'s dataclasses, with the config read as `ComparedTrainingConfig` (each candidate sets its own
    selection method), then `CompareArguments`."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from ..compare.arguments import CompareArguments, ComparedTrainingConfig
    from .arguments import LoadingArguments

    dataclasses = (ScriptArguments, ComparedTrainingConfig, ModelConfig, DatasetMixtureConfig, LoadingArguments)
    return TrlParser((*dataclasses, CompareArguments), prog=prog)


def main(script_args, training_args, model_args, dataset_args, loading_args, compare_args, argv=()):
    """Trains every candidate of --methods on every seed and compares them on the evaluation set. The output_dir is
    locked from the start (`saving/output_lock.py`); each run locks its own folder under it."""
    from ..compare.runner import run_comparison
    from ..saving.output_lock import run_locked
    from ..saving.writable import check_writable_dir

    check_writable_dir(training_args.output_dir, "--output_dir")
    with run_locked(training_args, owner=None):
        return run_comparison(
            script_args, training_args, model_args, dataset_args, loading_args, compare_args, list(argv)
        )
