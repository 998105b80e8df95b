"""The prepared GPU check: one entry point that verifies the CUDA path of trl_sstoken and measures its cost.

    python -m benchmarks.gpu.check --out $OUT                 # on the GPU machine (see benchmarks/gpu/README.md)
    python -m benchmarks.gpu.check --dry-run --out /tmp/gpu   # the same code on the CPU at toy shapes

Stages (each in its own process, with its own time budget, so that a CUDA error, an out-of-memory or a hang in one
is recorded and the next still runs): env, correctness, cost, memory_cap, distributed, quality. Each writes
`<out>/stage-<name>.json` as it goes; this process merges them into `<out>/gpu-check.json` after every stage.
This file imports only the standard library: the first stage is the one that finds out whether torch,
transformers, trl, peft, bitsandbytes and datasets import at all.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.gpu import wheels  # noqa: E402
from benchmarks.gpu.record import log, write_json  # noqa: E402
from benchmarks.gpu.settings import SCALES, STAGES, load  # noqa: E402


QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "PYTHONUNBUFFERED": "1",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder")
    parser.add_argument("--scale", choices=list(SCALES), default="gpu")
    parser.add_argument("--dry-run", action="store_true", help="same as --scale toy: the CPU, tiny shapes")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--budget", type=float, default=None, help="seconds for all stages (default: the scale's)")
    parser.add_argument("--work", default=None, help="scratch folder for random checkpoints (default: /tmp/...)")
    parser.add_argument(
        "--site",
        default=None,
        help="the --target folder the wheels were installed into (the device command's /tmp/site): "
        "missing or too old requirements are then installed there from .whl/compat",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override one entry of settings.py for this run, e.g. --set cost_steps=3",
    )
    parser.add_argument(
        "--quality-args",
        default=None,
        help="arguments for python -m benchmarks.quality.run in the quality stage (default: --help)",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.scale = "toy"
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    os.environ["GPU_CHECK_OVERRIDES"] = json.dumps(overrides)
    settings = load(args.scale)  # fails here, at once, on an unknown key
    out = os.path.abspath(args.out)
    work = os.path.abspath(args.work or os.path.join("/tmp", f"gpu-check-work-{args.scale}"))
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    budget = args.budget if args.budget is not None else settings["total_budget"]
    deadline = time.time() + budget
    summary_path = os.path.join(out, "gpu-check.json")
    summary = {
        "command": "python -m benchmarks.gpu.check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scale": args.scale,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_seconds": budget,
        "overrides": overrides,
        "git_commit": _git_commit(),
        "stages": {},
    }
    log("check", f"scale {args.scale}, {budget:.0f} s for stages {', '.join(args.stages)}; results in {out}")

    # Before anything imports transformers: are its requirements met, and can .whl/compat fix those that are not?
    summary["requirements"] = wheels.check_and_fix(site=args.site, compat_dir=os.path.join(ROOT, ".whl", "compat"))
    for line in wheels.describe(summary["requirements"]):
        log("check", line)
    write_json(summary_path, summary)

    env = dict(os.environ, **QUIET_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, ROOT, env.get("PYTHONPATH")) if p)
    prepare = None  # without a correctness stage to overlap with, a later stage writes its checkpoint itself
    for stage in args.stages:
        env_failed = summary["stages"].get("env", {}).get("status") == "failed"
        if stage == "correctness" and not env_failed and {"cost", "memory_cap"} & set(args.stages):
            prepare = start_prepare(args, out, work, deadline, env)
        left = deadline - time.time()
        if stage != "env" and summary["stages"].get("env", {}).get("status") == "failed":
            summary["stages"][stage] = {
                "status": "skipped",
                "reason": "the env stage failed: the stack does not import",
            }
        elif left < 5:
            summary["stages"][stage] = {"status": "skipped", "reason": f"total time budget spent ({left:.0f} s left)"}
        else:
            timeout = min(settings["budgets"][stage], left)
            summary["stages"][stage] = run_stage(stage, args, out, work, timeout, env)
        write_json(summary_path, summary)
    if prepare:
        summary["prepare"] = finish_prepare(prepare, out)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary["wall_seconds"] = round(time.time() - (deadline - budget), 1)
    write_json(summary_path, summary)
    for line in headline(summary):
        log("result", line)
    statuses = {name: entry["status"] for name, entry in summary["stages"].items()}
    log("check", f"done in {summary['wall_seconds']:.0f} s: {statuses}; {summary_path}")
    return 0


def headline(summary):
    """A few lines with the main figures, so that the output tail alone says what happened."""
    lines = []
    for name, stage in summary["stages"].items():
        substeps = stage.get("substeps", {})
        bad = [
            f"{sub}: {entry.get('error', entry['status'])[:160]}"
            for sub, entry in substeps.items()
            if entry.get("status") not in ("ok", "skipped")
        ]
        skipped = sum(entry.get("status") == "skipped" for entry in substeps.values())
        lines.append(
            f"{name}: {stage['status']}, {len(substeps)} sub-steps, {skipped} skipped"
            + (f"; {stage.get('reason') or stage.get('error', '')[:200]}" if stage["status"] != "ok" else "")
        )
        lines += [f"  {line}" for line in bad[:6]]
    cost = summary["stages"].get("cost", {}).get("substeps", {})
    for sub, entry in cost.items():
        if sub.startswith("side-by-side-") and entry.get("variants"):
            parts = []
            for variant, result in entry["variants"].items():
                memory = result.get("memory_vs_sft")
                parts.append(
                    f"{variant} {result.get('time_vs_sft', float('nan')):.3f}x" + (f"/{memory:.2f}m" if memory else "")
                )
            lines.append(f"{sub[len('side-by-side-') :]} time (/memory) vs sft: " + ", ".join(parts))
        if sub.startswith("attention-share-"):
            shares = {key: value["share"] for key, value in entry.items() if key.startswith("seq")}
            if shares:
                lines.append(f"{sub}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
    fits = summary["stages"].get("memory_cap", {}).get("fits")
    if fits:
        lines.append(f"24 GB cap, fits: {fits}")
    return lines


def start_prepare(args, out, work, deadline, env):
    """The `prepare` stage in the background, from the start of `correctness`: random checkpoints of the big shapes
    (models.random_checkpoint: a later stage that needs one waits for it, under a lock)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu.stages",
        "prepare",
        "--out",
        out,
        "--scale",
        args.scale,
        "--work",
        work,
        "--deadline",
        str(deadline),
    ]
    log("check", "prepare: writing the random checkpoints of the cost shapes in the background")
    stderr = open(os.path.join(out, "stage-prepare.log"), "w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr, start_new_session=True), stderr


def finish_prepare(prepare, out):
    process, stderr = prepare
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stderr.close()
    path = os.path.join(out, "stage-prepare.json")
    if not os.path.exists(path):
        return {"status": "failed", "error": "no stage-prepare.json"}
    with open(path) as handle:
        return json.load(handle)


def run_stage(stage, args, out, work, timeout, env):
    """One stage in a child process, killed (with its children) at `timeout`; returns its JSON plus the outcome."""
    path = os.path.join(out, f"stage-{stage}.json")
    if os.path.exists(path):
        os.remove(path)
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu.stages",
        stage,
        "--out",
        out,
        "--scale",
        args.scale,
        "--work",
        work,
        "--deadline",
        str(time.time() + timeout - 3),
    ]
    if stage == "quality" and args.quality_args:
        command += ["--quality-args", args.quality_args]
    log("check", f"stage {stage}: start, {timeout:.0f} s budget")
    began = time.time()
    with open(os.path.join(out, f"stage-{stage}.log"), "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode, timed_out = process.wait(), True
    result = {}
    if os.path.exists(path):
        with open(path) as handle:
            result = json.load(handle)
    result["seconds"] = round(time.time() - began, 1)
    if timed_out:
        result["status"] = "timeout"
        result["reason"] = f"killed at its {timeout:.0f} s budget; the sub-steps above are what it measured"
    elif returncode != 0 or result.get("status") in (None, "running"):
        result["status"] = "failed"
        result["error"] = f"the stage process exited with {returncode}; see stage-{stage}.log: " + _tail(
            os.path.join(out, f"stage-{stage}.log")
        )
    log("check", f"stage {stage}: {result['status']} in {result['seconds']:.0f} s")
    return result


def _tail(path, characters=1500):
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-characters:]
    except OSError:
        return ""


def _git_commit():
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
