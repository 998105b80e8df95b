"""The runs of a comparison: every candidate x seed trained from the same base model, data, seed and data order, and
evaluated on the same evaluation set; one folder per run, resumed from the finished ones.

Everything that can be wrong with the inputs (candidates, seeds, the metric, the evaluation set) is checked before
the first model is loaded. A run is finished when its folder holds `result.json` with the same settings; a rerun of
the command keeps those and trains the rest, and refuses a folder made by a comparison with other settings.

A run interrupted in the middle of its training continues from its last complete checkpoint (`checkpoint-N`, with
`save_strategy` steps or epoch), by the trainer's own verified resume, which restores the optimizer, the schedule,
the data position, the random states and the history, so it ends as the uninterrupted run would. That is safe only
for checkpoints of this very run: each run records its key (settings, data, metric) in `started.json` before it
trains, and checkpoints without that record, or with another key, are refused like a stale `result.json`.
"""

import dataclasses
import gc
import json
import os
import shlex
import time
from datetime import datetime, timezone

from . import evaluation, table
from .arguments import CompareArguments
from .spec import Candidate, parse_candidates


RECORD_FILE = "comparison.json"
MARKDOWN_FILE = "comparison.md"
PLOT_FILE = "comparison.png"
RESULT_FILE = "result.json"
STARTED_FILE = "started.json"  # the key of the run training in the folder: its checkpoints are resumed only if equal
REPORT_FILE = "selection_report.html"
NON_SELECTING = ("full", "dft")  # train on every response token: nothing to show in a selection report
REFERENCE_FIELDS = ("reference_model", "reference_adapter", "reference_dataset")
# Flags of `compare` only, left out of each run's equivalent `trl-sstoken train` command
COMPARE_FLAGS = {f"--{f.name}" for f in dataclasses.fields(CompareArguments)}
REFERENCE_FLAGS = {"--reference_model", "--reference_adapter", "--reference_dataset", "--reference_dataset_name"}


def log(message: str) -> None:
    print(f"[compare {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass
class Run:
    candidate: Candidate
    seed: int
    args: object  # the run's SSTokenConfig
    folder: str

    @property
    def args_need_reference(self) -> bool:
        from ..selection.methods import METHODS

        return METHODS[self.candidate.method].needs_reference

    @property
    def name(self) -> str:
        return f"{self.candidate.label} (seed {self.seed})"


def plan_runs(training_args, candidates: list[Candidate], seeds: list[int]) -> list[Run]:
    """Every run's config, an `SSTokenConfig` built and validated now (seed-major: a finished seed completes a
    table)."""
    from ..config import SSTokenConfig
    from ..selection.methods import METHODS

    runs = []
    for seed in seeds:
        for candidate in candidates:
            folder = os.path.join(training_args.output_dir, "runs", f"{candidate.slug}-seed{seed}")
            changes = dict(candidate.overrides, seed=seed, output_dir=folder)
            if not METHODS[candidate.method].needs_reference:  # a reference goes with rho1 only (else refused)
                changes.update({name: None for name in REFERENCE_FIELDS if getattr(training_args, name) is not None})
            values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(SSTokenConfig) if f.init}
            try:
                args = SSTokenConfig(**{**values, **changes})
            except ValueError as error:
                raise ValueError(f"--methods {candidate.label!r}: {error}") from None
            runs.append(Run(candidate, seed, args, folder))
    return runs


def check_compare_arguments(compare_args) -> None:
    seeds = compare_args.seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integer seeds, got {seeds!r}.")
    sample = compare_args.train_sample
    if sample is not None and not (0 < sample < 1 or (sample >= 1 and float(sample).is_integer())):
        raise ValueError(
            f"--train_sample={sample!r} is out of range; give a fraction in (0, 1) or a whole number of examples >= 1."
        )
    if compare_args.eval_num_examples is not None and compare_args.eval_num_examples < 1:
        raise ValueError(f"--eval_num_examples={compare_args.eval_num_examples} is out of range; it must be >= 1.")
    if compare_args.metric_max_new_tokens < 1:
        raise ValueError(f"--metric_max_new_tokens={compare_args.metric_max_new_tokens} is out of range; >= 1.")
    if compare_args.report_examples < 0:
        raise ValueError(f"--report_examples={compare_args.report_examples} is out of range; it must be >= 0.")


def sample_training_set(dataset, sample):
    """The same sample for every run: a shuffle with a fixed seed (0), then the first fraction or count of rows."""
    if sample is None:
        return dataset
    count = max(1, round(sample * len(dataset))) if sample < 1 else min(int(sample), len(dataset))
    return dataset.shuffle(seed=0).select(range(count))


def train_command(argv: list[str], run: Run) -> str:
    """The `trl-sstoken train` command that trains this run alone: the given flags without compare's own, plus the
    candidate's settings, the seed and the run's folder."""
    kept, skipping = [], False
    for item in argv:
        if item.startswith("--"):
            name = item.split("=", 1)[0]
            skipping = name in COMPARE_FLAGS or name in ("--output_dir", "--seed", "--selection_method")
            skipping = skipping or (not run.args_need_reference and name in REFERENCE_FLAGS)
            if skipping:
                continue
        elif skipping:
            continue
        kept.append(item)
    extra = [f"--{k}={v}" for k, v in run.candidate.overrides.items()]
    extra += [f"--seed={run.seed}", f"--output_dir={run.folder}"]
    return "trl-sstoken train " + shlex.join(kept + extra)


def run_key(run: Run, data_identity: dict, metric: str | None) -> dict:
    """What a finished run's result must have been made with to be kept."""
    settings = {k: v for k, v in run.args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    return json.loads(json.dumps({"settings": settings, "data": data_identity, "metric": metric}, default=str))


def load_inputs(script_args, training_args, model_args, dataset_args, loading_args, compare_args):
    """Tokenizer, training set (sampled) and evaluation set, as `train` loads them."""
    from ..loading import UsageError, load_sft_datasets, load_tokenizer, pick_split

    datasets = load_sft_datasets(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split, mixture=dataset_args
    )
    train_dataset = pick_split(datasets, script_args.dataset_train_split, "--dataset_train_split")
    if compare_args.eval_dataset_name is None:
        if compare_args.eval_split == script_args.dataset_train_split:
            raise ValueError(
                f"--eval_split {compare_args.eval_split!r} is the training split: a comparison needs an evaluation "
                "set the candidates did not train on. Pass --eval_split (another split) or --eval_dataset_name."
            )
        eval_dataset = pick_split(datasets, compare_args.eval_split, "--eval_split")
    else:
        try:
            eval_sets = load_sft_datasets(compare_args.eval_dataset_name, train_split=compare_args.eval_split)
        except UsageError as error:
            raise UsageError(str(error).replace("--dataset_name", "--eval_dataset_name")) from None
        eval_dataset = pick_split(eval_sets, compare_args.eval_split, "--eval_split")
    if compare_args.eval_num_examples is not None:
        eval_dataset = eval_dataset.select(range(min(compare_args.eval_num_examples, len(eval_dataset))))
    train_dataset = sample_training_set(train_dataset, compare_args.train_sample)
    tokenizer = load_tokenizer(
        loading_args.tokenizer_name_or_path or model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    return tokenizer, train_dataset, eval_dataset


def run_comparison(script_args, training_args, model_args, dataset_args, loading_args, compare_args, argv) -> dict:
    """The whole comparison; returns the JSON record it wrote."""
    from ..cli.train import _require_model

    start = time.time()
    _require_model(model_args)
    check_compare_arguments(compare_args)
    candidates = parse_candidates(compare_args.methods)
    metric_function = evaluation.load_metric(compare_args.metric)
    runs = plan_runs(training_args, candidates, compare_args.seeds)
    output_dir = training_args.output_dir
    tokenizer, train_dataset, eval_dataset = load_inputs(
        script_args, training_args, model_args, dataset_args, loading_args, compare_args
    )
    prompts = references = None
    if metric_function is not None:
        prompts, references = evaluation.prompts_and_references(eval_dataset)
        evaluation.check_metric(metric_function, compare_args.metric, references)
    data_identity = {
        "dataset": script_args.dataset_name,
        "train_split": script_args.dataset_train_split,
        "train_sample": compare_args.train_sample,
        "train_rows": len(train_dataset),
        "train_fingerprint": getattr(train_dataset, "_fingerprint", None),
        "eval_dataset": compare_args.eval_dataset_name or script_args.dataset_name,
        "eval_split": compare_args.eval_split,
        "eval_rows": len(eval_dataset),
        "eval_fingerprint": getattr(eval_dataset, "_fingerprint", None),
    }
    os.makedirs(output_dir, exist_ok=True)
    record = _start_record(output_dir, argv, candidates, compare_args, data_identity)
    results: dict[int, dict] = {}
    done_seconds = []  # wall seconds of the runs trained by this invocation, for the time estimate
    for index, run in enumerate(runs):
        key = run_key(run, data_identity, compare_args.metric)
        finished = _finished_result(run, key)
        prefix = f"[{index + 1}/{len(runs)}] {run.name}"
        if finished is not None:
            log(f"{prefix}: finished earlier, kept ({os.path.join(run.folder, RESULT_FILE)})")
            results[index] = {**finished, "kept_from_earlier_invocation": True}
        else:
            left = sum(1 for i in range(index, len(runs)) if i not in results)
            eta = f", about {sum(done_seconds) / len(done_seconds) * left / 60:.1f} min left" if done_seconds else ""
            resume = _can_resume(run, key)
            what = "resuming from its last complete checkpoint" if resume else "training"
            log(f"{prefix}: {what} ({time.time() - start:.0f}s elapsed{eta})")
            results[index] = _train_and_evaluate(
                run, model_args, tokenizer, train_dataset, eval_dataset, compare_args, metric_function, prompts,
                references, need_base=record.get("base_model_response_nll") is None, key=key,
                command=train_command(argv, run), resume=resume,
            )  # fmt: skip
            done_seconds.append(results[index]["result"]["wall_seconds"])
            if results[index]["result"].get("base_model_response_nll") is not None:
                record["base_model_response_nll"] = results[index]["result"]["base_model_response_nll"]
            result = results[index]["result"]
            log(f"{prefix}: response NLL {result['response_nll']:.4f}"
                + "".join(f", {k} {v:.4f}" for k, v in result.get("metric", {}).items())
                + f" ({result['wall_seconds']:.0f}s)")  # fmt: skip
        _finish_record(record, candidates, list(results.values()), len(runs), start, output_dir)
    return _write_outputs(record, candidates, list(results.values()), output_dir)


def _finished_result(run: Run, key: dict) -> dict | None:
    path = os.path.join(run.folder, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        stored = json.load(file)
    if stored.get("key") != key:
        raise ValueError(
            f"{path} was made by a comparison with other settings, data or metric than this one; it is not mixed "
            "into this table. Use another --output_dir, or delete that run's folder to train it again."
        )
    return stored


def _can_resume(run: Run, key: dict) -> bool:
    """Whether the unfinished run has checkpoints to continue from: only those of a run started with `key` (its
    `started.json`); checkpoints of another comparison, or of no recorded one, are refused (a resume would continue
    another experiment, and a fresh run would leave their later steps behind, to be resumed by mistake later)."""
    from ..saving.checkpoints import numbered_checkpoints

    if not numbered_checkpoints(run.folder):
        return False
    path = os.path.join(run.folder, STARTED_FILE)
    started = None
    if os.path.isfile(path):
        with open(path) as file:
            started = json.load(file)
    if started is None or started.get("key") != key:
        why = "no record of the comparison that made them" if started is None else "other settings, data or metric"
        raise ValueError(
            f"{run.folder} holds checkpoints of an unfinished run with {why} than this comparison; they are not "
            "resumed. Use another --output_dir, or delete that run's folder to train it again."
        )
    return True


def _train_loss_mean(state, output, resumed_step: int | None) -> float:
    """The run's mean training loss. A resumed run's `training_loss` covers the steps trained after the resume only:
    the steps before it are read off the checkpoint's logged losses (each a mean since the previous log), so steps
    after the last log before the checkpoint are left out."""
    if not resumed_step:
        return output.training_loss
    total = steps = previous = 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] <= resumed_step:
            total += entry["loss"] * (entry["step"] - previous)
            steps, previous = steps + entry["step"] - previous, entry["step"]
    now = state.global_step - resumed_step
    total, steps = total + output.training_loss * now, steps + now
    return total / steps if steps else output.training_loss


def _train_and_evaluate(run, model_args, tokenizer, train_dataset, eval_dataset, compare_args, metric_function,
                        prompts, references, need_base, key, command, resume=False) -> dict:  # fmt: skip
    from trl import get_quantization_config

    from ..cli.train import _model_init_kwargs, peft_config_from
    from ..report.collect import collect_examples, report_settings, special_tokens_of, write_report
    from ..saving.checkpoints import CheckpointError, checkpoint_step
    from ..trainer import SSTokenTrainer

    start = time.time()
    os.makedirs(run.folder, exist_ok=True)
    table.write_json(os.path.join(run.folder, STARTED_FILE), {"key": key, "command": command})
    args = run.args
    args.model_init_kwargs = {**_model_init_kwargs(model_args, args), **(args.model_init_kwargs or {})}
    trainer = SSTokenTrainer(
        model=model_args.model_name_or_path,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config_from(model_args),
    )
    result = {}
    if need_base:  # the LoRA adapter starts at zero: this is the base model
        result["base_model_response_nll"] = trainer.evaluate()["eval_loss"]
    train_start = time.time()
    try:
        output = trainer.train(resume_from_checkpoint=True if resume else None)
    except CheckpointError as error:  # raised before training: none of the run's checkpoints verifies
        log(f"{run.name}: no checkpoint to resume from ({error}); training from the start")
        output = trainer.train()
    resumed = trainer._resumed_from
    result["resumed_from_checkpoint"] = os.path.basename(resumed) if resumed else None
    result["train_seconds"] = time.time() - train_start  # of a resumed run: the steps trained after the resume
    result["train_loss_mean"] = _train_loss_mean(trainer.state, output, checkpoint_step(resumed) if resumed else None)
    fractions = [e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    result["selected_fraction"] = sum(fractions) / len(fractions) if fractions else None
    eval_start = time.time()
    result["response_nll"] = trainer.evaluate()["eval_loss"]
    if metric_function is not None:
        generations = evaluation.generate(
            trainer.model, tokenizer, prompts, compare_args.metric_max_new_tokens, args.per_device_eval_batch_size
        )
        result["metric"] = evaluation.score_metric(metric_function, compare_args.metric, generations, references)
        result["sample_generations"] = [{"reference": r, "generation": g} for r, g in
                                        list(zip(references, generations, strict=True))[:4]]  # fmt: skip
    result["eval_seconds"] = time.time() - eval_start
    trainer.save_model(run.folder)
    report = None
    if (
        run.candidate.method not in NON_SELECTING
        and compare_args.report_examples
        and run.seed == compare_args.seeds[0]
    ):
        report = os.path.join(run.folder, REPORT_FILE)
        examples = collect_examples(trainer, compare_args.report_examples, args.per_device_train_batch_size)
        settings = report_settings(trainer, model=model_args.model_name_or_path, candidate=run.candidate.label)
        write_report(report, examples, settings, special_tokens_of(tokenizer),
                     title=f"Selection report: {run.candidate.label} (trl-sstoken compare)")  # fmt: skip
    result["wall_seconds"] = time.time() - start
    stored = {
        "label": run.candidate.label, "method": run.candidate.method, "settings": run.candidate.settings,
        "seed": run.seed, "folder": run.folder, "status": "ok", "command": command, "selection_report": report,
        "result": result, "key": key,
    }  # fmt: skip
    table.write_json(os.path.join(run.folder, RESULT_FILE), stored)
    del trainer
    gc.collect()
    _empty_accelerator_cache()
    return stored


def _empty_accelerator_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _start_record(output_dir, argv, candidates, compare_args, data_identity) -> dict:
    from .. import __version__

    previous = {}
    path = os.path.join(output_dir, RECORD_FILE)
    if os.path.isfile(path):
        with open(path) as file:
            previous = json.load(file)
    return {
        "tool": f"trl-sstoken compare ({__version__})",
        "command": "trl-sstoken compare " + shlex.join(argv),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "earlier_invocations": previous.get("earlier_invocations", []) + ([previous["command"]] if previous else []),
        "candidates": [{"label": c.label, "method": c.method, "settings": c.settings} for c in candidates],
        "seeds": compare_args.seeds,
        "metric": compare_args.metric,
        "data": data_identity,
        "base_model_response_nll": previous.get("base_model_response_nll"),
        "versions": _versions(),
    }


def _finish_record(record, candidates, results, total, start, output_dir) -> None:
    record["runs"] = results
    record["summary"] = table.summarize(candidates, results)
    trained = [r for r in results if not r.get("kept_from_earlier_invocation")]
    record["status"] = "complete" if len(results) == total else f"partial ({len(results)} of {total} runs)"
    wall = time.time() - start
    inside = sum(r["result"]["wall_seconds"] for r in trained)
    record["timing"] = {
        "wall_seconds": wall,
        "runs_trained_now": len(trained),
        "runs_wall_seconds": inside,
        "train_seconds": sum(r["result"]["train_seconds"] for r in trained),
        "eval_seconds": sum(r["result"]["eval_seconds"] for r in trained),
        "overhead_seconds": wall - inside,
        "overhead_fraction_of_runs": (wall - inside) / inside if inside else None,
    }
    table.write_json(os.path.join(output_dir, RECORD_FILE), record)


def _write_outputs(record, candidates, results, output_dir) -> dict:
    summary, base = record["summary"], record.get("base_model_response_nll")
    markdown = table.markdown_table(summary, base)
    with open(os.path.join(output_dir, MARKDOWN_FILE), "w") as file:
        file.write(f"# trl-sstoken compare\n\n`{record['command']}`\n\n{markdown}\n")
    plot = table.plot(summary, base, os.path.join(output_dir, PLOT_FILE), title=record["command"][:110])
    record["plot"] = plot
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table.write_json(os.path.join(output_dir, RECORD_FILE), record)
    print()
    print(table.terminal_table(summary, base))
    print()
    timing = record["timing"]
    if timing["runs_wall_seconds"]:
        print(f"{len(results)} runs; this invocation: {timing['wall_seconds']:.0f}s wall, of which "
              f"{timing['runs_wall_seconds']:.0f}s in its {timing['runs_trained_now']} runs "
              f"(training {timing['train_seconds']:.0f}s, evaluation {timing['eval_seconds']:.0f}s); overhead of the "
              f"command itself {timing['overhead_seconds']:.0f}s.")  # fmt: skip
    if plot is None:
        print("No plot: matplotlib is not installed (pip install 'trl_sstoken[bench]').")
    print(f"Table: {os.path.join(output_dir, MARKDOWN_FILE)}; record: {os.path.join(output_dir, RECORD_FILE)}"
          + (f"; plot: {plot}" if plot else ""))  # fmt: skip
    for run in results:
        if run.get("selection_report"):
            print(f"Selection report of {run['label']}: {run['selection_report']}")
    return record


def _versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    from .. import __version__

    return {"trl_sstoken": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__}  # fmt: skip
