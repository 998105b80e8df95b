"""The rule for moving a default (docs/method.md, "Defaults by evidence"), applied to the real-model results.

    python -m benchmarks.quality.defaults_rule benchmarks/results/quality-real-cpu-smollm2.json \\
        benchmarks/results/quality-real-cpu-gemma3.json --ablations benchmarks/results/quality-real-cpu-smollm2-ablations.json \\
        [--docs]   # --docs: also the generated block `quality:defaults-rule` of docs/benchmarks.md

The rule's condition: an alternative beats the default by more than the seed spread in exact match (the larger of
the two sample standard deviations) and its clean-answer NLL is lower. It is necessary, not sufficient: with three
seeds and a few dozen comparisons some cells pass by chance, so the table shows every model and data set side by
side, and a default moves only for an alternative that passes and is not contradicted in another cell.

A cell is one model, budget (the results file's scale), task set and data set. The mirror condition (the default
beats the alternative by more than the spread, with the lower NLL) is a *loss* of the alternative. Issue 27 wrote one
rule down before its runs, for the position-balanced top-k (`selection_positions`): it becomes the default if it
meets the condition in two or more cells and loses in none (`balanced_verdict`), over both of its pairs
(sstoken vs sstoken[balanced], rel vs rel[balanced]).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from .report import replace_generated_block


# (the setting that would change, the default's method, the alternative's method), all rows of the main table.
MAIN_TABLE_COMPARISONS = [
    ("selection_gamma=0 (attention alone)", "sstoken", "attention"),
    ("selection_gamma=1 (rel alone)", "sstoken", "rel"),
    ("attention_score=sink_free", "sstoken", "sstoken[sink_free]"),
    ("attention_score=position_corrected", "sstoken", "sstoken[position_corrected]"),
    ("attention_score=sink_free, gamma 0", "attention", "attention[sink_free]"),
    ("attention_score=position_corrected, gamma 0", "attention", "attention[position_corrected]"),
    ("selection_positions=balanced", "sstoken", "sstoken[balanced]"),
    ("selection_positions=balanced, gamma 1", "rel", "rel[balanced]"),
]
BALANCED_SETTINGS = ("selection_positions=balanced", "selection_positions=balanced, gamma 1")
DEFAULT_METHOD = "sstoken"


def compare(default: dict, alternative: dict) -> dict:
    """One cell of the rule: two summary cells (`summary.main[method][data]` of a results JSON) compared."""
    gain = alternative["exact_match"]["mean"] - default["exact_match"]["mean"]
    spread = max(alternative["exact_match"]["std"], default["exact_match"]["std"])
    nll_lower = alternative["answer_nll"]["mean"] < default["answer_nll"]["mean"]
    nll_higher = alternative["answer_nll"]["mean"] > default["answer_nll"]["mean"]
    return {
        "gain": gain,
        "spread": spread,
        "default_nll": default["answer_nll"]["mean"],
        "alternative_nll": alternative["answer_nll"]["mean"],
        "meets_condition": gain > spread and nll_lower,
        "loses": -gain > spread and nll_higher,  # the mirror condition: the default wins
    }


def cell_name(results: dict) -> str:
    """The model, budget and task set of a results file: "smollm2" (the 24-step scale), "smollm2 real-cpu-300",
    "smollm2 real-cpu-300 long tasks" (from its `scale_name`, e.g. `real-cpu-300-smollm2-long`)."""
    model = results["model"]
    scale = (results.get("scale_name") or "").removesuffix("-long").removesuffix(f"-{model}")
    name = model if scale in ("", "real-cpu") else f"{model} {scale}"
    return name + (" long tasks" if (results.get("scale") or {}).get("tasks") == "long" else "")


def rule_rows(results: dict, ablations: dict | None = None) -> list[dict]:
    """Every comparison the results allow: the main table's pairs on each data set, and each ablation against the
    default `sstoken` run of the same data set (an ablation file holds no default run of its own)."""
    main = results["summary"]["main"]
    rows = []
    for setting, default_method, alternative_method in MAIN_TABLE_COMPARISONS:
        for data in ("noisy", "clean"):
            default, alternative = main.get(default_method, {}).get(data), main.get(alternative_method, {}).get(data)
            if default and alternative:
                rows.append({"model": cell_name(results), "data": data, "setting": setting,
                             "default": default_method, "alternative": alternative_method,
                             **compare(default, alternative)})  # fmt: skip
    for name, cells in ((ablations or {}).get("summary", {}).get("ablations") or {}).items():
        for data, alternative in cells.items():
            default = main.get(DEFAULT_METHOD, {}).get(data)
            if default and alternative.get("answer_nll"):
                rows.append({"model": cell_name(results), "data": data, "setting": f"ablation {name}",
                             "default": DEFAULT_METHOD, "alternative": f"{DEFAULT_METHOD} ({name})",
                             **compare(default, alternative)})  # fmt: skip
    return rows


def balanced_verdict(rows: list[dict]) -> str:
    """Issue 27's rule for `selection_positions`, in one line (see the module docstring)."""
    cells = [row for row in rows if row["setting"] in BALANCED_SETTINGS]
    if not cells:
        return "selection_positions: no cell compares the balanced top-k with the paper's yet."
    wins, losses = sum(row["meets_condition"] for row in cells), sum(row["loses"] for row in cells)
    moves = wins >= 2 and losses == 0
    return (
        f"selection_positions: the balanced top-k meets the condition in {wins} of {len(cells)} cells and loses in "
        f"{losses}: {'it becomes the default' if moves else 'it stays opt-in'} (rule: two or more wins, no loss)."
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | data | setting | exact match: alternative - default (points) | seed spread | NLL: alternative / "
        "default | condition met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['data']} | {row['setting']} | {100 * row['gain']:+.1f} | {100 * row['spread']:.1f} "
            f"| {row['alternative_nll']:.3f} / {row['default_nll']:.3f} | {'**yes**' if row['meets_condition'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="real-model results JSON files (main tables)")
    parser.add_argument("--ablations", type=Path, action="append", default=[],
                        help="an ablations results JSON; compared with the main file of the same model")  # fmt: skip
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    ablations_by_model = {}
    for path in args.ablations:
        ablation = json.loads(path.read_text())
        ablations_by_model[ablation["model"]] = ablation
    rows = []
    for path in args.results:
        results = json.loads(path.read_text())
        rows += rule_rows(results, ablations_by_model.get(results["model"]))
    table = markdown(rows) + "\n\n" + balanced_verdict(rows)
    print(table)
    if args.docs:
        shown = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--docs"]
        source = f"python -m benchmarks.quality.defaults_rule {shlex.join(shown)}"
        if not replace_generated_block("defaults-rule", table, source):
            raise SystemExit("docs/benchmarks.md has no quality:defaults-rule markers")


if __name__ == "__main__":
    main()
