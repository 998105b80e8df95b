"""The quality benchmark, end to end: data -> base model (cached) -> every method (rho1 trains its reference) and ablation on
every seed -> JSON, markdown table, PNG plot and docs/benchmarks.md.

    python -m benchmarks.quality.run                 # default CPU scale, ~30 min on 2 cores
    python -m benchmarks.quality.run --quick         # smoke test of the whole pipeline (tiny scale), ~1 min
    python -m benchmarks.quality.run --scale gpu --device cuda

Runs are independent and each one is deterministic given its seed: every run uses `--threads-per-run` threads
(default 1), whatever `--workers` is, so the numbers do not depend on how many runs go in parallel.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from trl_sstoken.compare.stats import mean_std  # noqa: E402  (shared with `trl-sstoken compare`)

from . import base_model, calibration, data, evaluate, methods, noise, position_matched, tasks  # noqa: E402
from .scales import SCALES, task_sets  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("noisy", "clean")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="model, data and step sizes")
    parser.add_argument("--quick", action="store_true", help="same as --scale tiny: a smoke test of the pipeline")
    parser.add_argument(
        "--model",
        choices=("lab", "smollm2", "gemma3"),
        default="lab",
        help="lab: the benchmark's own small model, pretrained here; smollm2 / gemma3: a real pretrained model "
        "(tools.real_models) with natural-language tasks (real-model mode, scales real-*)",
    )
    parser.add_argument(
        "--tasks",
        choices=("short", "long"),
        default="short",
        help="real-model mode: short (the four families, `Answer: 37`) or long (a procedure answered step by step, "
        "80-300 tokens: long_tasks.py); long sets the scale's sizes, max_length and max new tokens",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the scale's, 0 1 2)")
    parser.add_argument("--methods", nargs="+", choices=list(methods.REAL_METHODS), help="default: all")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--ablations", nargs="*", default=None, help="ablation names to run (default: all; pass none for none)"
    )
    parser.add_argument(
        "--only-ablations", action="store_true", help="run the ablations only, not the main table (a later stage)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a number of the scale, e.g. --set sft_steps=300 sft_lr=1e-3 (recorded in the JSON)",
    )
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="parallel runs")
    parser.add_argument("--threads-per-run", type=int, default=1, help="torch threads inside each run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cache-dir", default=str(REPO_ROOT / "benchmarks" / ".cache"), help="base models, refs")
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/quality-<scale>.json)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--calibration-dir",
        default=str(calibration.DEFAULT_DIR),
        help="where a budget scale (real-cpu-100, real-cpu-300) reads its calibrated learning rate "
        "(lr-<scale>-<model>.json, written by python -m benchmarks.quality.calibrate)",
    )
    parser.add_argument(
        "--lr-calibrated-on",
        choices=("smollm2", "gemma3"),
        help="a budget scale reads this model's calibrated learning rate instead of --model's (recorded in the "
        "JSON; e.g. gemma3 at SmolLM2's lr, as the 24-step design did)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of an earlier invocation's results JSON (same scale and design only) and do "
        "the rest; the first kept run is trained again as a check that the code still gives the same numbers; the "
        "file's runs of other --methods / --datasets stay in it, so a sweep can fill one file in stages",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.scale = "tiny" if args.model == "lab" else "real-tiny"
    elif args.model != "lab" and not args.scale.startswith("real-"):
        args.scale = "real-cpu"
    if args.tasks == "long" and args.model == "lab":
        parser.error("--tasks long is for the real-model mode (--model smollm2|gemma3)")
    if args.scale in SCALES and args.tasks not in task_sets(args.scale):
        parser.error(f"--scale {args.scale} is for --tasks {' or '.join(task_sets(args.scale))} only (scales.py)")
    if (args.model == "lab") == args.scale.startswith("real-"):
        parser.error(f"--scale {args.scale} does not go with --model {args.model} (real-* scales are for real models)")
    return args


def log(message: str):
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ----- provenance -----


def versions() -> dict:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl

    import trl_sstoken

    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "trl_sstoken": trl_sstoken.__version__,
        "trl_sstoken_path": str(Path(trl_sstoken.__file__).parent),
        "git_commit": git("rev-parse", "HEAD"),
        "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def design(real: bool = False, method_table: dict | None = None, task_set: str = "short") -> dict:
    """The fixed design of the benchmark (see README.md): tasks, noise, shared selection settings, scoring."""
    if task_set == "long":
        from . import long_tasks, real_data

        return {
            "families": list(long_tasks.FAMILIES),
            "noise_rates": noise.NOISE_RATES,
            "boilerplate": real_data.BOILERPLATE_TEXT,
            "shared_selection_settings": methods.SHARED,
            "methods": methods.REAL_METHODS,
            "headline_metric": "exact_match: every step's stated result ('Step i (...): <result>') and the final answer "
            "(after the first 'Answer:') equal the ground truth",
            "secondary_metrics": "step_accuracy (fraction of steps stated right); final_match (the final answer "
            "alone); strict_match (the whole generation is the clean response); answer_nll (teacher-forced mean NLL "
            "of the payload tokens of the clean eval responses: every step's result and the final answer)",
            "decoding": f"greedy, max {long_tasks.MAX_NEW_TOKENS} new tokens, stop at the end-of-turn token",
            "std": "sample standard deviation over seeds (n - 1 denominator)",
        }
    if real:
        from . import real_data

        return {
            "families": list(tasks.FAMILIES),
            "noise_rates": noise.NOISE_RATES,
            "boilerplate": real_data.BOILERPLATE_TEXT,
            "shared_selection_settings": methods.SHARED,
            "methods": methods.REAL_METHODS,
            "headline_metric": "exact_match: text after the first 'Answer:' (up to newline / ' Ref:' / end, stripped "
            "of spaces and a final '.') equals the ground truth",
            "secondary_metrics": "strict_match (the whole generation is the clean response); answer_nll (teacher-"
            "forced mean NLL of the clean answer tokens of the eval prompts)",
            "decoding": "greedy, max 48 new tokens (24 in the first, stopped attempt), stop at the end-of-turn token",
            "std": "sample standard deviation over seeds (n - 1 denominator)",
        }
    return {
        "families": list(tasks.FAMILIES),
        "noise_rates": noise.NOISE_RATES,
        "boilerplate": " ".join(noise.BOILERPLATE),
        "shared_selection_settings": methods.SHARED,
        "methods": methods.METHODS if method_table is None else method_table,
        "headline_metric": "exact_match: words between the first 'answer :' and the next '.' equal the ground truth",
        "secondary_metric": "strict_match: the whole generation equals 'answer : <answer> .'",
        "decoding": "greedy, max 32 new tokens, stop at <|im_end|>",
        "std": "sample standard deviation over seeds (n - 1 denominator)",
    }


# ----- the work of one run, in a worker process -----

_WORKER: dict = {}


def quiet_libraries():
    """No progress bars or per-step log dicts from transformers, datasets and TRL: one line per run instead."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _init_worker(scale: dict, base_path: str, device: str, threads: int):
    quiet_libraries()
    torch.set_num_threads(threads)
    if scale.get("model", "lab") != "lab":
        return _init_real_worker(scale, base_path, device, threads)
    tokenizer = base_model.load_tokenizer(base_path)
    splits = data.build_splits(
        scale["data_seed"], scale["train_per_family"], scale["eval_per_family"], scale["reference_per_family"]
    )
    _WORKER.update(
        scale=scale,
        base_path=base_path,
        device=device,
        threads=threads,
        tokenizer=tokenizer,
        splits=splits,
        datasets={
            "noisy": data.sft_dataset(tokenizer, splits.train, splits.train_noisy),
            "clean": data.sft_dataset(tokenizer, splits.train, splits.train_clean),
            "reference": data.sft_dataset(tokenizer, splits.reference, splits.reference_responses()),
        },
    )


def _init_real_worker(scale: dict, base_path: str, device: str, threads: int):
    from transformers import AutoTokenizer

    from . import real_data

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    splits = real_data.build_splits(scale["data_seed"], scale["train_per_family"], scale["eval_per_family"],
                                    scale["reference_per_family"], tasks=scale.get("tasks", "short"))  # fmt: skip
    name = scale["model"]
    _WORKER.update(
        scale=scale, base_path=base_path, device=device, threads=threads, tokenizer=tokenizer, splits=splits,
        datasets={
            "noisy": real_data.sft_dataset(tokenizer, name, splits.train, splits.train_noisy),
            "clean": real_data.sft_dataset(tokenizer, name, splits.train, splits.train_clean),
            "reference": real_data.sft_dataset(tokenizer, name, splits.reference, splits.reference_responses()),
        },
    )  # fmt: skip


def _run_job(job: dict) -> dict:
    from .sft import train_and_evaluate

    torch.set_num_threads(_WORKER["threads"])
    scale = {**_WORKER["scale"], **job.get("scale_overrides", {})}  # the calibration's candidate learning rate
    overrides = dict(job["overrides"])
    if overrides.get("reference_dataset") == methods.REFERENCE_DATA:  # rho1 trains its reference on the clean subset
        overrides["reference_dataset"] = _WORKER["datasets"]["reference"]
    if "position_profile" in job:  # the position-matched control: the profile `position_matched.resolve` read
        overrides["position_profile"] = job["position_profile"]
    with tempfile.TemporaryDirectory() as output_dir, position_matched.registered():
        try:
            result = train_and_evaluate(
                _WORKER["base_path"],
                _WORKER["tokenizer"],
                _WORKER["datasets"][job["data"]],
                _WORKER["splits"].eval,
                scale,
                overrides,
                job["seed"],
                output_dir,
                device=_WORKER["device"],
                max_steps=job.get("max_steps"),
                save_adapter_to=job.get("save_adapter_to"),
            )
            return {**job, "status": "ok", "result": result}
        except Exception as error:  # a failed run is recorded, never dropped
            import traceback

            return {**job, "status": "failed", "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-4000:]}  # fmt: skip


def run_jobs(jobs: list[dict], workers: int, init_args: tuple, on_done, earlier=(), method_table=None) -> list[dict]:
    """Runs the jobs in their order, `workers` at a time. A job that reads another run's result (the position-matched
    control reads the profile of its `sstoken` run, `position_matched.resolve`) starts only once that run has
    finished, here or among the `earlier` runs of the --resume file; the next job in order takes its place meanwhile.
    If that run failed or is in neither, the job is recorded as failed with the reason: it never runs on a default."""
    method_table = methods.REAL_METHODS if method_table is None else method_table
    results, pending, running = [], list(jobs), {}

    def record(run):
        results.append(run)
        on_done(run, len(results), len(jobs))

    def take():  # the first pending job that can start now; the ones that never can are recorded on the way
        for job in list(pending):
            unfinished = [*pending, *running.values()]
            state, value = position_matched.resolve(job, [*earlier, *results], unfinished, method_table)
            if state == "wait":
                continue
            pending.remove(job)
            if state == "ready":
                return value
            record({**job, "status": "failed", "error": value})
        return None

    if workers <= 1:
        _init_worker(*init_args)
        while (job := take()) is not None:
            record(_run_job(job))
        return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=init_args) as pool:  # fmt: skip
        while pending or running:
            while len(running) < workers and (job := take()) is not None:
                running[pool.submit(_run_job, job)] = job
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                record(future.result())
    return sorted(results, key=lambda r: r["index"])


# ----- aggregation -----


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every (group, name, data) cell."""
    cells: dict = {}
    for run in runs:
        if run["status"] != "ok" or run["group"] not in ("main", "ablation"):
            continue
        cells.setdefault((run["group"], run["name"], run["data"]), []).append(run)
    summary: dict = {"main": {}, "ablations": {}}
    for (group, name, dataset), cell in sorted(cells.items()):
        cell.sort(key=lambda r: r["seed"])
        result = {
            "seeds": [r["seed"] for r in cell],
            "exact_match": mean_std([r["result"]["exact_match"]["overall"] for r in cell]),
            "strict_match": mean_std([r["result"]["strict_match"]["overall"] for r in cell]),
            "exact_match_by_family": {  # the task set's families (tasks.FAMILIES, or long_tasks.FAMILIES)
                family: mean_std([r["result"]["exact_match"][family] for r in cell])
                for family in cell[0]["result"]["exact_match"]
                if family != "overall"
            },
            "kept_fraction_by_kind": {
                kind: statistics.fmean(r["result"]["selection"]["kept_fraction_by_kind"].get(kind, 0.0) for r in cell)
                for kind in noise.KINDS
                if any(kind in r["result"]["selection"]["kept_fraction_by_kind"] for r in cell)
            },
            "train_loss_mean": statistics.fmean(r["result"]["train_loss_mean"] for r in cell),
            **_profile_target(cell),
            **_real_cell_metrics(cell),
            "cpu_seconds_mean": statistics.fmean(r["result"]["cpu_seconds"] for r in cell),
        }
        summary["main" if group == "main" else "ablations"].setdefault(name, {})[dataset] = result
    return summary


def _profile_target(cell: list[dict]) -> dict:
    """The position-matched control: the profile its runs copied (mean over seeds; each run's is in the JSON)."""
    profiles = [r["position_profile"] for r in cell if "position_profile" in r]
    if not profiles:
        return {}
    return {"position_profile_target": [statistics.fmean(values) for values in zip(*profiles, strict=True)]}


def _real_cell_metrics(cell: list[dict]) -> dict:
    """Real-model mode only: clean-answer NLL, kept fraction by position decile, attention diagnostics."""
    if "answer_nll" not in cell[0]["result"]:
        return {}
    deciles = []
    for decile in range(10):
        values = [r["result"]["selection"]["kept_fraction_by_position_decile"][decile] for r in cell]
        values = [v for v in values if v is not None]
        deciles.append(statistics.fmean(values) if values else None)
    attention = [r["result"]["attention"] for r in cell]
    long_tasks_only = {key: mean_std([r["result"][key]["overall"] for r in cell])
                       for key in ("step_accuracy", "final_match") if key in cell[0]["result"]}  # fmt: skip
    return {
        **long_tasks_only,
        "answer_nll": mean_std([r["result"]["answer_nll"] for r in cell]),
        "response_nll": mean_std([r["result"]["response_nll"] for r in cell]),
        "kept_fraction_by_position_decile": deciles,
        "sink_share_of_context_mass": statistics.fmean(a["sink_share_of_context_mass"] for a in attention),
        "train_wall_seconds_mean": statistics.fmean(r["result"]["train_wall_seconds"] for r in cell),
    }


# ----- the benchmark -----


def _run_real_jobs(jobs, workers, init_args, on_done, earlier=()):
    """Real-model mode: jobs in the priority order of the README (`methods.real_priority`)."""
    jobs.sort(key=methods.real_priority)
    for index, job in enumerate(jobs):
        job["index"] = index
    first = sum(methods.real_priority(j)[0] == 0 for j in jobs)
    log(f"{len(jobs)} runs to do ({first} in the first tier)")
    run_jobs(jobs, workers, init_args, on_done, earlier, methods.REAL_METHODS)


def _real_base_model(name: str, scale: dict, splits, device: str, report: dict):
    """A real pretrained model: where it starts on the eval prompts, and what its attention statistic measures."""
    from tools.real_models import real_model_path
    from transformers import AutoTokenizer

    from . import real_data, real_evaluate
    from .sft import load_real_model

    path = str(real_model_path(name))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_real_model(path, device)
    longest = max(len(real_data.tokenize_example(tokenizer, name, real_data.prompt_text(i), r)["input_ids"])
                  for instances, responses in ((splits.train, splits.train_noisy), (splits.train, splits.train_clean),
                                               (splits.reference, splits.reference_responses()))
                  for i, r in zip(instances, responses, strict=True))  # fmt: skip
    report["data"]["longest_example_tokens"] = longest
    if longest > scale["max_length"]:  # TRL would truncate it: the response's end (the answer) would be lost
        raise SystemExit(f"max_length={scale['max_length']} would truncate the longest training example "
                         f"({longest} tokens); raise it (--set max_length=...)")  # fmt: skip
    noisy_rows = [real_data.tokenize_example(tokenizer, name, real_data.prompt_text(i), r)
                  for i, r in list(zip(splits.train, splits.train_noisy, strict=False))[: scale["diagnostic_rows"]]]  # fmt: skip
    report["data"]["noisy_realised"] = real_data.kind_counts(splits.train_noisy, tokenizer, name, splits.train)
    report["data"]["clean_realised"] = real_data.kind_counts(splits.train_clean, tokenizer, name, splits.train)
    report["data"]["example_noisy_response"] = [r.text for r in splits.train_noisy[:4]]
    report["base_model"] = {
        "path": path,
        "name": name,
        "num_layers": model.config.num_hidden_layers,
        "eval_before_sft": real_evaluate.evaluate(
            model, tokenizer, name, splits.eval, max_new_tokens=scale.get("max_new_tokens", 48)
        ),  # fmt: skip
        "attention_before_sft": {
            str(layer): real_evaluate.attention_diagnostics(model, noisy_rows, layer, tokenizer.pad_token_id)
            for layer in (-1, scale["num_layers"] // 2, round(0.7 * scale["num_layers"]))
        },
    }
    before = report["base_model"]["eval_before_sft"]
    log(f"{name} before SFT: exact match {before['exact_match']['overall']:.3f}, strict "
        f"{before['strict_match']['overall']:.3f}, answer NLL {before['answer_nll']:.3f}")  # fmt: skip
    return model, tokenizer, {"path": path, "recipe_hash": name}


def _job_key(job: dict) -> str:
    return json.dumps([job["group"], job["name"], job["data"], job["seed"], job["overrides"]], sort_keys=True)


def _as_stored(value):
    """A value as it reads back from the results JSON (tuples become lists, paths strings), so the two compare."""
    return json.loads(json.dumps(value, default=str))


def resume_from(output: Path, report: dict, jobs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The finished runs of an earlier results JSON that match jobs of this grid, then the earlier runs outside this
    grid (kept as they were, `outside_grid`), and the jobs still to do.

    Runs are deterministic given their seed, so a finished run is not trained again, but only when the earlier file
    has the same scale and design; anything else is refused rather than mixed into one table. The first kept run goes
    back in as a `resume_check` job (not in the tables): its numbers, next to the kept ones, show whether the code
    between the two invocations still trains the same way.
    """
    previous = json.loads(output.read_text())
    for field in ("scale", "design", "seeds"):
        earlier, now = previous.get(field), report[field]
        if _comparable(field, earlier, now) != _comparable(field, now, earlier):
            raise SystemExit(f"--resume: {output} has another {field!r} than this invocation; refusing to mix them "
                             f"(move the file away to start afresh)")  # fmt: skip
    runs = previous.get("runs", [])
    finished = {_job_key(run): run for run in runs if run["status"] == "ok" and run["group"] in ("main", "ablation")}
    kept = [{**_without(finished[_job_key(job)], "outside_grid"), "resumed": True} for job in jobs
            if _job_key(job) in finished]  # fmt: skip
    todo = [job for job in jobs if _job_key(job) not in finished]
    # the earlier file's runs that this invocation's grid does not ask for (another stage's --methods or --datasets)
    # stay in the file as they were, failed ones and earlier resume checks too (every run is reported); a finished
    # one wins over a failed one
    grid = {_job_key(job) for job in jobs}
    outside = {}
    for run in runs:
        key = _job_key(run)
        if key not in grid and (key not in outside or run["status"] == "ok"):
            outside[key] = {**run, "resumed": True, "outside_grid": True}
    report["resumed_from"] = {
        "file": str(output), "started_at": previous.get("started_at"), "command": previous.get("command"),
        "git_commit": (previous.get("versions") or {}).get("git_commit"), "runs_kept": len(kept),
        "runs_kept_outside_grid": len(outside), "resume_check": previous.get("resume_check"),
        "earlier": previous.get("resumed_from"),  # the chain of sessions behind one table
    }  # fmt: skip
    if kept:
        check = {key: kept[0][key] for key in ("name", "data", "seed", "overrides")}
        todo.insert(0, {**check, "group": "resume_check", "of": _job_key(kept[0])})
    return kept + list(outside.values()), todo


def _without(run: dict, key: str) -> dict:
    return {k: v for k, v in run.items() if k != key}


def _comparable(field: str, value, other):
    """`value` as --resume compares it with `other`: as stored; for the design, its method table only on the methods
    both have, so that a method added to the table later (issue 27's) does not refuse an earlier file, while a
    method whose overrides changed does."""
    value, other = _as_stored(value), _as_stored(other)
    if field == "design" and isinstance(value, dict) and isinstance(other, dict):
        table, others = value.get("methods"), other.get("methods")
        if isinstance(table, dict) and isinstance(others, dict):
            value = {**value, "methods": {name: table[name] for name in table if name in others}}
    return value


def _earlier_runs(output: Path, resume: bool) -> list[dict]:
    """The runs of the results JSON that --resume would keep from (none without --resume or without the file)."""
    if not (resume and output.exists()):
        return []
    return json.loads(output.read_text()).get("runs", [])


def resume_check(check: dict, done: list[dict]) -> dict:
    """The kept run next to the same run trained again by this invocation's code."""
    original = next(run for run in done if run.get("resumed") and _job_key(run) == check["of"])
    metrics = ("answer_nll", "train_loss_mean", "selected_fraction_mean")
    if check["status"] != "ok":
        return {"of": check["of"], "verdict": f"the check run failed: {check['error']}"}
    pairs = {m: (original["result"][m], check["result"][m]) for m in metrics if m in original["result"]}
    pairs["exact_match"] = (original["result"]["exact_match"]["overall"], check["result"]["exact_match"]["overall"])
    largest = max(abs(a - b) for a, b in pairs.values())
    verdict = "identical" if largest == 0 else f"differs by up to {largest:.3g}"
    return {"of": check["of"], "kept_vs_rerun": pairs, "verdict": verdict}


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    started, start_time = datetime.now(timezone.utc), time.time()
    scale = dict(SCALES[args.scale])
    if args.tasks == "long":  # the task set's sizes, max_length and max new tokens (long_tasks.py); --set still wins
        from . import long_tasks

        scale = long_tasks.scale_for(scale)
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in scale or key == "seeds":
            raise SystemExit(f"--set {item}: unknown scale key {key!r}; known: {sorted(set(scale) - {'seeds'})}")
        numeric = isinstance(scale[key], (int, float)) or scale[key] is None  # None: a budget scale's sft_lr
        scale[key] = (float(value) if scale[key] is None else type(scale[key])(float(value))) if numeric else value
    seeds = args.seeds if args.seeds else scale["seeds"]
    real = args.model != "lab"
    method_table = methods.REAL_METHODS if real else methods.METHODS
    if not real and args.methods:  # a real-model method asked for by name runs on the lab model too (the tests')
        method_table = {**method_table, **{name: methods.REAL_METHODS[name] for name in args.methods}}
    chosen_methods = args.methods or list(scale.get("methods") or method_table)
    lr_calibration = None
    if real:  # before anything is loaded: a budget scale refuses compared methods until its lr is calibrated
        lr_set = any(item.partition("=")[0] == "sft_lr" for item in args.overrides)
        scale["sft_lr"], lr_calibration = calibration.lr_for_run(
            args.scale, scale, args.model, chosen_methods, lr_set, Path(args.calibration_dir), args.lr_calibrated_on
        )
    if real:
        from tools.real_models import real_model_path
        from transformers import AutoConfig

        scale["model"] = args.model
        scale["num_layers"] = AutoConfig.from_pretrained(real_model_path(args.model)).num_hidden_layers
    torch.set_num_threads(max(1, args.workers * args.threads_per_run))
    scale_name = (f"{args.scale}-{args.model}" if real else args.scale) + ("-long" if args.tasks == "long" else "")
    scale_name += "-ablations" if args.only_ablations else ""
    output = Path(args.output) if args.output else REPO_ROOT / "benchmarks" / "results" / f"quality-{scale_name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = f"python -m benchmarks.quality.run {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    earlier_runs = _earlier_runs(output, args.resume)
    by_data = scale.get("methods_by_data") or {}
    missing = position_matched.missing_sources(chosen_methods, args.datasets, seeds, by_data, earlier_runs)
    # refused before anything is loaded: a control without its source never runs on a default
    if missing and not args.only_ablations:
        raise SystemExit("the position-matched control copies the measured position profile of a run on the same "
                         "data and seed, and " + "; ".join(missing) + " is neither in this invocation's --methods "
                         "nor a finished run of the --resume file. Add that method to --methods (it runs first), or "
                         "--resume from a results JSON that has it.")  # fmt: skip
    log(f"quality benchmark, scale {args.scale}, seeds {seeds}, {args.workers} worker(s) x "
        f"{args.threads_per_run} thread(s), device {args.device}")  # fmt: skip

    # data
    if real:
        from . import real_data

        data_module = real_data
    else:
        data_module = data
    splits = data_module.build_splits(
        scale["data_seed"],
        scale["train_per_family"],
        scale["eval_per_family"],
        scale["reference_per_family"],
        **({"tasks": args.tasks} if real else {}),
    )
    report = {
        "benchmark": "trl_sstoken quality benchmark (issue 5; real-model mode: issue 13)",
        "model": args.model,
        "status": "running",
        "command": command,
        "started_at": started.isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "workers": args.workers,
            "threads_per_run": args.threads_per_run,
            "device": args.device,
        },
        "scale_name": scale_name,
        "scale": scale,
        "scale_overrides": args.overrides,
        **({"lr_calibration": lr_calibration} if lr_calibration is not None else {}),
        "seeds": seeds,
        "design": design(real, None if real else method_table, args.tasks),
        "data": {
            "train_examples": len(splits.train),
            "eval_examples": len(splits.eval),
            "reference_examples": len(splits.reference),
            "eval_prompts_in_train": len({i.prompt for i in splits.eval} & {i.prompt for i in splits.train}),
            "noisy_realised": data.kind_counts(splits.train_noisy) if not real else None,
            "clean_realised": data.kind_counts(splits.train_clean) if not real else None,
        },
    }

    if real:
        model, tokenizer, info = _real_base_model(args.model, scale, splits, args.device, report)
    else:
        # base model, and where it starts on the chat eval (the "before") and on the raw form it was pretrained on
        model, tokenizer, info = base_model.load_or_pretrain(scale, cache_dir, device=args.device, log=log)
        report["base_model"] = {
            **info,
            "chat_eval_before_sft": evaluate.evaluate_chat(model, tokenizer, splits.eval, samples=4),
            "raw_form_exact_match": evaluate.evaluate_raw(model, tokenizer, splits.eval),
        }
        log(f"base model: chat exact match "
            f"{report['base_model']['chat_eval_before_sft']['exact_match']['overall']:.3f}, "
            f"raw-form exact match {report['base_model']['raw_form_exact_match']['overall']:.3f}")  # fmt: skip
    del model

    # which methods can run
    report["methods"] = {}
    for name in chosen_methods:
        available, reason = methods.availability(name, method_table)
        report["methods"][name] = {"status": "ok" if available else "skipped (not available)", "reason": reason}
        if not available:
            log(f"SKIPPED method {name}: not available in the installed trl_sstoken: {reason}")
    runnable = [name for name in chosen_methods if report["methods"][name]["status"] == "ok"]

    def save(status: str, runs: list[dict]):
        report["status"] = status
        report["runs"] = runs
        report["summary"] = summarize(runs)
        report["wall_seconds"] = time.time() - start_time
        tmp = output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(output)

    init_args = (scale, info["path"], args.device, args.threads_per_run)
    done: list[dict] = []

    def on_done(run, finished, total):
        done.append(run)
        if run["status"] == "ok":
            r = run["result"]
            log(f"[{finished}/{total}] {run['group']}/{run['name']} {run['data']} seed {run['seed']}: "
                f"exact {r['exact_match']['overall']:.3f} strict {r['strict_match']['overall']:.3f} "
                f"({r['wall_seconds']:.0f}s wall, {r['cpu_seconds']:.0f}s cpu)")  # fmt: skip
        else:
            log(f"[{finished}/{total}] {run['group']}/{run['name']} {run['data']} seed {run['seed']}: FAILED "
                f"{run['error']}")  # fmt: skip
        if run["group"] == "resume_check":
            report["resume_check"] = resume_check(run, done)
            log(f"--resume check: {report['resume_check']['verdict']}")
        save(f"partial ({len(done)} runs finished)", done)

    # the grid: main table (every method on noisy and clean data) first, then the ablations of sstoken
    jobs = []
    for seed in [] if args.only_ablations else seeds:
        for dataset in args.datasets:
            for name in runnable:
                if real and name not in scale["methods_by_data"].get(dataset, [name]):
                    continue  # the real-model scale's priority list: see README, "Real pretrained models"
                jobs.append({"group": "main", "name": name, "data": dataset, "seed": seed,
                             "overrides": methods.overrides_for(name, scale["reference_steps"], table=method_table)})  # fmt: skip
    grid = (methods.real_ablations(scale["num_layers"], scale["sft_steps"]) if real
            else methods.ablations(scale["num_layers"], scale["sft_steps"]))  # fmt: skip
    default_ablations = scale.get("ablations")
    default_ablations = list(grid) if default_ablations is None else default_ablations
    chosen_ablations = default_ablations if args.ablations is None else [a for a in args.ablations if a != "none"]
    unknown = set(chosen_ablations) - set(grid)
    if unknown:
        raise SystemExit(f"unknown ablation(s) {sorted(unknown)}; known: {list(grid)}")
    if "sstoken" in runnable:
        for seed in seeds:
            for name in chosen_ablations:
                jobs.append({"group": "ablation", "name": name, "data": "noisy", "seed": seed,
                             "overrides": methods.overrides_for("sstoken", extra=grid[name])})  # fmt: skip
    report["ablation_grid"] = {name: grid[name] for name in chosen_ablations}
    kept = []
    if args.resume and output.exists():
        kept, jobs = resume_from(output, report, jobs)
        done.extend(kept)
        check = "; the first is trained again as a check" if report["resumed_from"]["runs_kept"] else ""
        outside = report["resumed_from"]["runs_kept_outside_grid"]
        log(f"--resume: kept {len(kept) - outside} finished run(s) of {output.name}{check}, and {outside} run(s) "
            "outside this invocation's grid as they were")  # fmt: skip
        save(f"partial ({len(done)} runs finished)", done)
    if real:
        _run_real_jobs(jobs, args.workers, init_args, on_done, kept)
    else:
        for index, job in enumerate(jobs):
            job["index"] = index
        log(f"{len(jobs)} runs to do")
        run_jobs(jobs, args.workers, init_args, on_done, kept, method_table)

    failed = [r for r in done if r["status"] != "ok"]
    save("complete" if not failed else f"complete with {len(failed)} failed run(s)", done)
    report["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save(report["status"], done)
    log(f"results: {output} ({report['wall_seconds'] / 60:.1f} min)")

    from .report import write_reports

    written = write_reports(output, update_docs=not args.no_docs)  # real mode: report.markdown_real
    for path in written:
        log(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
