"""Calibrates the learning rate of a real-model budget scale on full SFT, by the rule of `calibration.py`.

    python -m benchmarks.quality.calibrate --model smollm2 --scale real-cpu-300 --lrs 1e-3 3e-4 1e-4
    python -m benchmarks.quality.calibrate --model smollm2 --scale real-cpu-300 --lrs 3e-3 --resume  # extend the grid

One full-SFT run per candidate lr on the noisy data with the unreported calibration seed 99 (no other method, no
reported seed), trained and evaluated exactly as a harness run (`run._run_job`). After every finished lr it rewrites
`benchmarks/results/calibration/lr-<scale>-<model>.json` (runs, rule, choice so far) and appends a line to the
`.log` beside it, so a killed calibration keeps every lr it finished; `--resume` trains only the lrs not finished
yet (a failed one is tried again) and adds any new `--lrs` to the grid. The choice is final when the rule says so;
the harness reads it from there (`calibration.lr_for_run`).
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import calibration, methods, run  # noqa: E402
from .scales import SCALES, task_sets  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.calibrate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", choices=("smollm2", "gemma3"), required=True)
    parser.add_argument("--scale", choices=sorted(s for s in SCALES if s.startswith("real-")), required=True)
    parser.add_argument("--lrs", type=float, nargs="+", help="candidate learning rates (default: the scale's grid)")
    parser.add_argument("--resume", action="store_true", help="keep the lrs an earlier calibration finished")
    parser.add_argument("--tasks", choices=("short", "long"), default="short",
                        help="the task set calibrated on (long: long_tasks.py, its own file lr-<scale>-<model>-long)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="lrs trained in parallel")
    parser.add_argument("--threads-per-run", type=int, default=1, help="torch threads inside each run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default=str(calibration.DEFAULT_DIR), help="where the JSON and log go")
    args = parser.parse_args(argv)
    if args.tasks not in task_sets(args.scale):
        parser.error(f"--scale {args.scale} is for --tasks {' or '.join(task_sets(args.scale))} only (scales.py)")
    args.lrs = args.lrs or SCALES[args.scale].get("lr_candidates")
    if not args.lrs:
        parser.error(f"--lrs: --scale {args.scale} has no lr_candidates; name the candidate learning rates")
    return args


def model_path(name: str) -> str:
    from tools.real_models import real_model_path

    return str(real_model_path(name))


def _summary(run_record: dict) -> dict:
    """What the rule reads from a finished run."""
    result = run_record["result"]
    return {"status": "ok", "answer_nll": result["answer_nll"], "exact_match": result["exact_match"]["overall"]}


def choice_of(report: dict) -> dict:
    runs = {r["lr"]: _summary(r) if r["status"] == "ok" else {"status": r["status"]} for r in report["runs"]}
    return calibration.choose_lr(report["candidates"], runs)


def main(argv=None):
    args = parse_args(argv)
    run.quiet_libraries()
    scale = {**SCALES[args.scale], "model": args.model}
    if args.tasks == "long":
        from . import long_tasks

        scale = long_tasks.scale_for(scale)
    output = calibration.calibration_path(Path(args.output_dir), args.scale, args.model, args.tasks)
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = output.with_suffix(".log")
    command = f"python -m benchmarks.quality.calibrate {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    report = {
        "calibration": "learning rate of full SFT for a real-model scale (issue 27; rule: calibration.py)",
        "scale_name": args.scale, "model": args.model, "recipe": calibration.recipe_of(scale),
        "method": calibration.CALIBRATION_METHOD, "data": calibration.CALIBRATION_DATA,
        "seed": calibration.CALIBRATION_SEED, "rule_version": calibration.RULE_VERSION, "rule": calibration.RULE,
        "nll_tie": calibration.NLL_TIE, "candidates": sorted(set(args.lrs), reverse=True), "command": command,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": run.versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "workers": args.workers,
                    "threads_per_run": args.threads_per_run, "device": args.device},
        "runs": [],
    }  # fmt: skip
    if output.exists():
        if not args.resume:
            raise SystemExit(f"{output} exists: pass --resume to keep its finished lrs, or move it away")
        previous = json.loads(output.read_text())
        for field in ("scale_name", "model", "recipe", "method", "data", "seed", "rule_version"):
            if previous.get(field) != report[field]:
                raise SystemExit(f"--resume: {output} has another {field!r} ({previous.get(field)!r}, now "
                                 f"{report[field]!r}); refusing to mix them (move the file away to start afresh)")  # fmt: skip
        report["runs"] = [r for r in previous["runs"] if r["status"] == "ok"]
        report["candidates"] = sorted(set(previous["candidates"]) | set(args.lrs), reverse=True)
        report["earlier"] = {key: previous.get(key) for key in ("command", "started_at", "versions", "earlier")}
    finished = {r["lr"] for r in report["runs"]}
    todo = [lr for lr in report["candidates"] if lr not in finished]
    start = time.time()

    def save():
        report["choice"] = choice_of(report)
        report["wall_seconds"] = time.time() - start
        tmp = output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(output)

    def on_done(record, count, total):
        lr = record["lr"]
        report["runs"] = [r for r in report["runs"] if r["lr"] != lr] + [record]
        report["runs"].sort(key=lambda r: -r["lr"])
        save()
        if record["status"] == "ok":
            r = record["result"]
            line = (f"lr {calibration.format_lr(lr)}: answer NLL {r['answer_nll']:.4f}, exact "
                    f"{r['exact_match']['overall']:.4f}, strict {r['strict_match']['overall']:.4f}, train loss "
                    f"{r['train_loss_first_log']:.3f} -> {r['train_loss_last_log']:.3f}, {r['cpu_seconds']:.0f} CPU-s, "
                    f"{r['wall_seconds']:.0f} s wall")  # fmt: skip
        else:
            line = f"lr {calibration.format_lr(lr)}: FAILED {record['error']}"
        line = f"[{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] {args.scale} {args.model} [{count}/{total}] {line}"
        with log_path.open("a") as log_file:
            log_file.write(line + "\n")
        print(line, flush=True)

    save()
    run.log(f"calibration of {args.scale} / {args.model}: lrs {report['candidates']}, {len(todo)} to train "
            f"({len(finished)} kept); writing {output}")  # fmt: skip
    jobs = [{"group": "calibration", "name": calibration.CALIBRATION_METHOD, "data": calibration.CALIBRATION_DATA,
             "seed": calibration.CALIBRATION_SEED, "overrides": methods.overrides_for(calibration.CALIBRATION_METHOD,
             table=methods.REAL_METHODS), "lr": lr, "scale_overrides": {"sft_lr": lr}, "index": index}
            for index, lr in enumerate(todo)]  # fmt: skip
    if jobs:
        init_args = (scale, model_path(args.model), args.device, args.threads_per_run)
        run.run_jobs(jobs, args.workers, init_args, on_done)
    report["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    choice = report["choice"]
    verdict = f"final: lr {calibration.format_lr(choice['lr'])}" if choice["final"] else "NOT final"
    run.log(f"{verdict} ({choice['reason']})")
    if choice["extend_with"] is not None:
        run.log("extend the grid: " + calibration.calibrate_command(args.scale, args.model, [choice["extend_with"]],
                                                                     args.tasks) + " --resume")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
