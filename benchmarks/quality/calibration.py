"""The learning rate of a real-model budget scale: the selection rule, the calibration file, and what a run reads.

A budget scale (`real-cpu-100`, `real-cpu-300`, scales.py) has no learning rate of its own (`sft_lr=None`): it reads
the one chosen by `python -m benchmarks.quality.calibrate` for its model, from
`benchmarks/results/calibration/lr-<scale>-<model>.json`. Until that file holds a final choice for the scale's
current recipe, the harness refuses every method but full SFT (`lr_for_run`), so that no comparison is made at an
uncalibrated learning rate by accident.

The rule (`choose_lr`), written down before any calibration at these budgets was run:

1. Each candidate learning rate trains **full SFT** (the only method calibrated) on the **noisy** data (the main
   data) with the unreported **calibration seed 99**, the scale's recipe otherwise, and is evaluated as every run is.
2. The chosen lr has the **lowest clean-answer NLL** (teacher-forced, on the 80 held-out clean eval prompts). Lrs
   within `NLL_TIE` of the lowest are tied; among them the **highest exact match** wins, then the **smaller lr**.
   A run whose NLL is not finite (it diverged) ranks below every other; a run that stopped with an error is not
   finished (`--resume` trains it again).
3. The choice is **final** only when every candidate has finished and the chosen lr is not at an edge of the grid
   (a larger and a smaller candidate were tried). At an edge the command names the next lr to add, one grid step
   further (`--resume` keeps the finished ones); the scale stays uncalibrated meanwhile.

Why this rule: the question of the budget sweep (issue 27) is whether selection beats full SFT once full SFT is
trained well, so the lr is the one that favours full SFT, on the data the comparison is about. On the noisy data a
too-large lr lets full SFT learn the corrupted labels, which raises the NLL of the clean answers, so the rule
guards full SFT against noise the selecting methods are built to drop; calibrating on the clean data would pick the
lr that is best without noise and could hand the selecting methods an easy win. Clean-answer NLL is continuous and
low-variance; exact match on 80 prompts moves in steps of 1.25 points and varies by 2-7 points between seeds at the
24-step budget, so it only breaks ties. NLL_TIE = 0.05 is about one seed standard deviation of full SFT's
clean-answer NLL on the noisy data at 24 steps (SmolLM2: 0.049; gemma: 0.16, so for gemma the rule is the less
tolerant of the two): a smaller difference is not evidence. The smaller lr breaks the last tie as the more
conservative step. (The 24-step scale, `real-cpu`, keeps its lr of 1e-3, chosen in the first calibration by
another rule: full SFT on the clean data mid-range; README, "Calibration log".)
"""

import json
import math
from pathlib import Path

from .scales import SCALES


CALIBRATION_SEED = 99
CALIBRATION_DATA = "noisy"
CALIBRATION_METHOD = "full"
NLL_TIE = 0.05
RULE_VERSION = 1
RULE = (
    "full SFT on the noisy data, seed 99, one run per candidate lr; the lowest clean-answer NLL wins, lrs within "
    f"{NLL_TIE} of it are tied and go by the highest exact match, then the smaller lr; final only when every "
    "candidate finished and the chosen lr has a larger and a smaller candidate beside it"
)

# The scale's numbers that a calibration holds for: the data, the training budget and the adapter. Not the seeds,
# the rho1 reference's steps (full SFT has no reference), the diagnostics or the method lists.
RECIPE_KEYS = ("data_seed", "train_per_family", "eval_per_family", "reference_per_family", "sft_steps",
               "sft_batch_size", "lora_r", "lora_alpha", "lora_dropout", "max_length")  # fmt: skip

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / "benchmarks" / "results" / "calibration"


class Uncalibrated(SystemExit):
    """A compared run was asked of a scale whose learning rate has no final calibration."""


def calibration_path(directory: Path, scale_name: str, model: str, tasks: str = "short") -> Path:
    """The long-response task set (`--tasks long`) is calibrated on its own data, in its own file."""
    return Path(directory) / f"lr-{scale_name}-{model}{'-long' if tasks == 'long' else ''}.json"


def recipe_of(scale: dict) -> dict:
    return {key: scale[key] for key in RECIPE_KEYS}


def calibrate_command(scale_name: str, model: str, lrs, tasks: str = "short") -> str:
    return (f"python -m benchmarks.quality.calibrate --model {model} --scale {scale_name} --lrs "
            + " ".join(format_lr(lr) for lr in lrs) + (" --tasks long" if tasks == "long" else ""))  # fmt: skip


def format_lr(lr: float) -> str:
    return f"{lr:g}"


def _grid_step(lr: float, neighbour: float | None, upward: bool) -> float:
    """One grid step beyond an edge, at the grid's own spacing there (x3 when there is no neighbour), 1 digit."""
    factor = lr / neighbour if neighbour else 3.0
    factor = factor if factor > 1 else 1 / factor
    return float(f"{(lr * factor if upward else lr / factor):.0e}")


def choose_lr(candidates, runs: dict) -> dict:
    """The rule of the module docstring. candidates: the lrs of the grid; runs: lr -> {"status", "answer_nll",
    "exact_match"} (exact match overall, a fraction). Returns {"final", "lr", "reason", "extend_with", "ranking"}."""
    candidates = sorted(set(candidates))
    missing = [lr for lr in candidates if runs.get(lr, {}).get("status") != "ok"]
    done = [lr for lr in candidates if lr not in missing]

    def nll(lr):
        value = runs[lr].get("answer_nll")
        return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf

    ranking = sorted(done, key=lambda lr: (nll(lr), -runs[lr]["exact_match"], lr))
    result = {"final": False, "lr": None, "extend_with": None, "ranking": [format_lr(lr) for lr in ranking]}
    if missing:
        return {**result, "reason": f"not finished: lr {', '.join(format_lr(lr) for lr in missing)}"}
    best = nll(ranking[0]) if ranking else math.inf
    if not math.isfinite(best):
        return {**result, "reason": "no candidate finished with a finite clean-answer NLL"}
    tied = [lr for lr in done if nll(lr) <= best + NLL_TIE]
    chosen = min(tied, key=lambda lr: (-runs[lr]["exact_match"], lr))
    reason = (f"lowest clean-answer NLL {best:.4f} (lr {format_lr(ranking[0])})"
              + (f"; tied within {NLL_TIE}: lr {', '.join(format_lr(lr) for lr in sorted(tied))}, chosen by exact "
                 f"match {runs[chosen]['exact_match']:.4f}" if len(tied) > 1 else ""))  # fmt: skip
    result = {**result, "lr": chosen}
    index = candidates.index(chosen)
    if index in (0, len(candidates) - 1):
        upward = index == len(candidates) - 1  # a single candidate: upward, x3
        neighbour = None if len(candidates) == 1 else candidates[index - 1] if upward else candidates[1]
        extend = _grid_step(chosen, neighbour, upward)
        side = "largest" if upward else "smallest"
        return {**result, "extend_with": extend,
                "reason": f"{reason}; at the edge of the grid (the {side} candidate): add lr {format_lr(extend)}"}  # fmt: skip
    return {**result, "final": True, "reason": reason}


def read(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def lr_for_run(
    scale_name: str,
    scale: dict,
    model: str,
    methods,
    lr_set: bool,
    directory: Path = DEFAULT_DIR,
    calibrated_on: str | None = None,
):
    """(lr, record for the results JSON) of a harness run at a real-model scale; `scale` is after `--set`.

    A scale with its own `sft_lr` keeps it (or takes `--set sft_lr`). A budget scale (`sft_lr=None` in scales.py)
    reads the final choice of its calibration file, which must have been made for the same recipe; without one it
    allows only full SFT with an lr given by `--set sft_lr=...`, and refuses anything else, naming the calibration
    command. `calibrated_on` (default: `model`) reads another model's calibration instead, as the 24-step design gave
    gemma SmolLM2's recipe (`--lr-calibrated-on`); the record says so.
    """
    calibrated_on = calibrated_on or model
    if SCALES[scale_name].get("sft_lr") is not None:
        source = "--set sft_lr" if lr_set else "the scale (calibrated by hand; the README's calibration log)"
        return scale["sft_lr"], {"source": source}
    tasks = scale.get("tasks", "short")
    path = calibration_path(directory, scale_name, calibrated_on, tasks)
    command = calibrate_command(scale_name, calibrated_on, scale.get("lr_candidates") or (1e-3, 3e-4, 1e-4), tasks)
    calibration = read(path)
    problem = None
    if calibration is None:
        problem = f"there is no calibration file {path}"
    elif calibration.get("recipe") != recipe_of(scale):
        differs = sorted(k for k in RECIPE_KEYS if (calibration.get("recipe") or {}).get(k) != scale[k])
        problem = f"{path} was calibrated for another recipe (differs in {', '.join(differs)})"
    elif not (calibration.get("choice") or {}).get("final"):
        problem = f"{path} has no final choice yet ({(calibration.get('choice') or {}).get('reason', 'no runs')})"
    if problem is None:
        record = {"source": "calibration", "file": _relative(path), "calibrated_on": calibrated_on,
                  "choice": calibration["choice"], "rule": calibration.get("rule")}  # fmt: skip
        if lr_set:
            return scale["sft_lr"], {**record, "source": "--set sft_lr, in place of the calibrated lr"}
        return calibration["choice"]["lr"], record
    if lr_set and set(methods) == {"full"}:
        return scale["sft_lr"], {"source": f"--set sft_lr, full SFT only (the scale is not calibrated: {problem})"}
    _refuse(scale_name, calibrated_on, problem, command, set_lr=lr_set)


def _refuse(scale_name, model, problem, command, set_lr=False):
    what = ("--set sft_lr is allowed at an uncalibrated scale for --methods full only" if set_lr
            else "it runs compared methods only at a calibrated learning rate")  # fmt: skip
    raise Uncalibrated(
        f"--scale {scale_name} takes its learning rate from a calibration of full SFT for --model {model}, and "
        f"{problem}; {what}. Calibrate first: {command} (then extend the grid if it says so), or run full SFT alone "
        f"with --methods full --set sft_lr=<lr>."
    )


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
