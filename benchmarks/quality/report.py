"""Tables (markdown) and a plot (PNG) from a results JSON, and the generated section of docs/benchmarks.md.

    python -m benchmarks.quality.report benchmarks/results/quality-cpu.json [--no-docs]

Everything printed comes from the JSON; nothing is typed in by hand.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

from .noise import KINDS
from .tasks import FAMILIES


REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "benchmarks.md"

# The order of the tables and the plot (issue 27): full SFT first, the reference every method is read against (a
# line on the plot), then the methods by family. A method belongs to the family of its base name (the part before
# "[": `sstoken[balanced]` is ssToken's); within a family, the base names in this order, each followed by its variants
# in the order of the method table (`methods.REAL_METHODS`). A name in no family goes last, alphabetically.
REFERENCE_METHOD = "full"
METHOD_FAMILIES = (
    ("reference", ("full",)),
    ("baselines", ("random",)),
    ("loss-based", ("rel", "rho1")),
    ("attention", ("attention",)),
    ("ssToken", ("sstoken",)),
    ("other", ("profit", "dft")),
)


# The long task set's metrics beside exact match (run.py's summary cells hold them for a `--tasks long` file only).
LONG_METRICS = {"step_accuracy": "step accuracy (the fraction of steps stated right)",
                "final_match": "final match (the final answer alone)"}  # fmt: skip


def method_family(name: str) -> str:
    base = name.split("[", 1)[0]
    return next((family for family, bases in METHOD_FAMILIES if base in bases), METHOD_FAMILIES[-1][0])


def method_order(names) -> list[str]:
    """`names` by family (METHOD_FAMILIES), not alphabetically."""
    from .methods import REAL_METHODS

    bases = [base for _, family in METHOD_FAMILIES for base in family]
    table = list(REAL_METHODS)

    def key(name):
        base, _, variant = name.partition("[")
        if base not in bases:
            return (len(bases), 0, 0, name)
        return (bases.index(base), bool(variant), table.index(name) if name in table else len(table), name)

    return sorted(names, key=key)


def _pm(cell: dict | None, scale: float = 100.0) -> str:
    if not cell:
        return "-"
    return f"{cell['mean'] * scale:.1f} ± {cell['std'] * scale:.1f}"


def _pm_seeds(cell: dict | None) -> str:
    """mean ± std, then every seed's value: the spread of three seeds is part of the result."""
    if not cell:
        return "-"
    return f"{_pm(cell)} ({', '.join(f'{100 * v:.1f}' for v in cell['values'])})"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _nll(cell: dict | None) -> str:
    return "-" if not cell else f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def markdown_real(results: dict) -> str:
    """Real-model mode: main table per data set (exact, strict, clean-answer NLL, what was trained on), kept fraction
    by position decile, the attention statistic before SFT, ablations. Every number comes from the JSON."""
    summary, lines = results["summary"], []
    status, base = results["status"], results["base_model"]
    lines.append(f"Model **{results['model']}**, scale `{results['scale_name']}`, seeds {results['seeds']}, status "
                 f"**{status}**. Command: `{results['command']}` ({results.get('wall_seconds', 0) / 60:.1f} min wall, "
                 f"{results['machine']['workers']} worker(s) x {results['machine']['threads_per_run']} thread(s) on "
                 f"{results['machine']['cpu_count']} CPU(s), device {results['machine']['device']}).")  # fmt: skip
    if not status.startswith("complete"):
        lines += ["", "**PARTIAL RESULTS**: the run did not finish; only the cells below were measured."]
    before = base["eval_before_sft"]
    lines += ["", f"Before SFT: exact match {100 * before['exact_match']['overall']:.1f}%, strict "
              f"{100 * before['strict_match']['overall']:.1f}%, clean-answer NLL {before['answer_nll']:.3f}."]  # fmt: skip
    realised = results["data"]["noisy_realised"]
    if realised and "response_token_fraction_by_kind" in realised:
        fractions = realised["response_token_fraction_by_kind"]
        lines += [
            "",
            "Noisy training data, response tokens by kind: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fractions.items())
            + f"; {100 * realised['corrupt_fraction_of_answer_items']:.1f}% of answer items corrupted.",
        ]
    ordered = method_order(summary["main"])
    for dataset in ("noisy", "clean"):
        rows = [(name, summary["main"][name][dataset]) for name in ordered if dataset in summary["main"][name]]
        if not rows:
            continue
        # the long task set's own metrics (long_tasks.py), in its results only: step accuracy and the final answer
        extra = [metric for metric in LONG_METRICS if any(metric in cell for _, cell in rows)]
        described = "".join(f", {LONG_METRICS[metric]}" for metric in extra)
        lines += ["", f"**{dataset} training data** (exact / strict match{described} in %, mean ± std over seeds, "
                  "per-seed values; answer NLL of the clean eval answers, lower is better; kept fraction of each token "
                  "kind)", "",
                  "| method | n | exact match | " + "".join(f"{metric.replace('_', ' ')} | " for metric in extra)
                  + "strict match | answer NLL | " + " | ".join(f"kept {k}" for k in KINDS)
                  + " |", "|---|---|---|" + "---|" * len(extra) + "---|---|" + "---|" * len(KINDS)]  # fmt: skip
        for name, cell in rows:
            kept = cell["kept_fraction_by_kind"]
            lines.append(f"| {name} | {cell['exact_match']['n']} | {_pm_seeds(cell['exact_match'])} | "
                         + "".join(f"{_pm(cell.get(metric))} | " for metric in extra)
                         + f"{_pm(cell['strict_match'])} | {_nll(cell.get('answer_nll'))} | "
                         + " | ".join(_pct(kept.get(k)) for k in KINDS) + " |")  # fmt: skip
    noisy = [(name, summary["main"][name]["noisy"]) for name in ordered if "noisy" in summary["main"][name]]
    if noisy:
        lines += [
            "",
            "**Kept fraction by position in the response** (noisy data; decile 1 = first tenth)",
            "",
            "| method | " + " | ".join(f"d{d + 1}" for d in range(10)) + " |",
            "|---|" + "---|" * 10,
        ]
        for name, cell in noisy:
            deciles = cell.get("kept_fraction_by_position_decile") or [None] * 10
            lines.append(f"| {name} | " + " | ".join(_pct(v) for v in deciles) + " |")
            if cell.get("position_profile_target"):  # the control: what it copied, next to what it kept
                lines.append(f"| {name}: target (sstoken's, mean over seeds) | "
                             + " | ".join(_pct(v) for v in cell["position_profile_target"]) + " |")  # fmt: skip
    attention = base.get("attention_before_sft", {})
    if attention:
        lines += [
            "",
            "**The attention statistic before SFT** (noisy training rows; mean score per token kind; sink "
            "share = fraction of the context mass on the sink, the first token)",
            "",
            "| layer | sink share | score | " + " | ".join(KINDS) + " |",
            "|---|---|---|" + "---|" * len(KINDS),
        ]
        for layer, diag in attention.items():
            for score in ("context_mass", "sink_free", "position_corrected"):
                by_kind = diag[f"{score}_by_kind"]
                lines.append(
                    f"| {layer} | {100 * diag['sink_share_of_context_mass']:.0f}% | {score} | "
                    + " | ".join(f"{by_kind[k]:.3f}" if k in by_kind else "-" for k in KINDS)
                    + " |"
                )
    ablations = summary.get("ablations", {})
    if ablations:
        lines += [
            "",
            "**Ablations of sstoken** (noisy data)",
            "",
            "| setting | n | exact match | strict match | answer NLL | kept answer | kept corrupt | kept random |",
            "|---|---|---|---|---|---|---|---|",
        ]
        reference = summary["main"].get("sstoken", {}).get("noisy")
        for name, cells in [("sstoken (ratio 0.6, gamma 0.5, base, warm-up 0.2, last layer)", {"noisy": reference}),
                            *ablations.items()]:  # fmt: skip
            cell = cells.get("noisy")
            if not cell:
                continue
            kept = cell["kept_fraction_by_kind"]
            lines.append(f"| {name} | {cell['exact_match']['n']} | {_pm_seeds(cell['exact_match'])} | "
                         f"{_pm(cell['strict_match'])} | {_nll(cell.get('answer_nll'))} | {_pct(kept.get('answer'))} | "
                         f"{_pct(kept.get('corrupt'))} | {_pct(kept.get('random'))} |")  # fmt: skip
    failed = [r for r in results.get("runs", []) if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['name']} {r['data']} seed {r['seed']}: {r['error']}"
                                                  for r in failed)]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_real(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = results["summary"]["main"]
    names = [name for name in method_order(main) if name != REFERENCE_METHOD]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, metric, label in (
        (axes[0], "exact_match", "exact match (%)"),
        (axes[1], "answer_nll", "clean answer NLL"),
    ):
        scale = 100 if metric == "exact_match" else 1
        for offset, dataset, color in ((-0.2, "noisy", "tab:blue"), (0.2, "clean", "tab:orange")):
            xs = [i + offset for i, n in enumerate(names) if dataset in main[n]]
            cells = [main[n][dataset][metric] for n in names if dataset in main[n]]
            if not cells and dataset not in main.get(REFERENCE_METHOD, {}):
                continue  # a data set this file did not run: no empty legend entry
            ax.bar(xs, [c["mean"] * scale for c in cells], 0.4, yerr=[c["std"] * scale for c in cells], label=dataset,
                   color=color)  # fmt: skip
            reference = main.get(REFERENCE_METHOD, {}).get(dataset)
            if reference:  # full SFT: the line every bar is read against
                ax.axhline(reference[metric]["mean"] * scale, color=color, linestyle="--", linewidth=1,
                           label=f"full SFT, {dataset}")  # fmt: skip
        _mark_families(ax, names)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    status = "" if results["status"].startswith("complete") else " (PARTIAL)"
    fig.suptitle(f"trl_sstoken quality benchmark, {results['model']}, scale {results['scale_name']}{status}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mark_families(ax, names: list[str]):
    """Thin lines between the method families of the x axis, with each family's name above its group."""
    families = [method_family(name) for name in names]
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or families[i] != families[start]:
            if i < len(names):
                ax.axvline(i - 0.5, color="grey", linewidth=0.5)
            ax.text((start + i - 1) / 2, 1.01, families[start], transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=7, color="grey")  # fmt: skip
            start = i


def markdown(results: dict) -> str:
    if results.get("model", "lab") != "lab":
        return markdown_real(results)
    summary, lines = results["summary"], []
    status = results["status"]
    lines.append(f"Scale `{results['scale_name']}`, seeds {results['seeds']}, status **{status}**. "
                 f"Command: `{results['command']}` "
                 f"({results.get('wall_seconds', 0) / 60:.1f} min wall, {results['machine']['workers']} worker(s) x "
                 f"{results['machine']['threads_per_run']} thread(s) on {results['machine']['cpu_count']} CPU(s), "
                 f"device {results['machine']['device']}).")  # fmt: skip
    if not status.startswith("complete"):
        lines.append("")
        lines.append("**PARTIAL RESULTS**: the run did not finish; only the cells below were measured.")
    base = results.get("base_model", {})
    if base:
        lines.append("")
        lines.append(
            f"Base model before SFT: exact match {100 * base['chat_eval_before_sft']['exact_match']['overall']:.1f}% "
            f"on the chat eval prompts, {100 * base['raw_form_exact_match']['overall']:.1f}% on the same instances "
            "in the raw pretraining form (per family: "
            + ", ".join(f"{f} {100 * base['raw_form_exact_match'].get(f, 0):.0f}%" for f in FAMILIES)
            + ")."
        )
    refs = results.get("rho1_reference")
    if refs:
        scores = [r["exact_match"]["overall"] for r in refs.values() if r.get("exact_match")]
        if scores:
            lines.append(f"rho1 reference alone (base + LoRA on the clean subset): exact match "
                         f"{', '.join(f'{100 * s:.1f}%' for s in scores)} (per seed).")  # fmt: skip

    lines += ["", "**Exact match (%) on held-out clean prompts, mean ± std over seeds (each seed's value in brackets)**",
              ""]  # fmt: skip
    lines.append("| method | noisy SFT data | clean SFT data | noisy: strict match | noisy: kept answer / corrupt / "
                 "boilerplate / random tokens |")  # fmt: skip
    lines.append("|---|---|---|---|---|")
    for name in method_order(results.get("methods", {})):
        info = results["methods"][name]
        if info["status"] != "ok":
            lines.append(f"| {name} | {info['status']} | {info['status']} | - | - |")
            continue
        cell = summary["main"].get(name, {})
        noisy, clean = cell.get("noisy"), cell.get("clean")
        kept = noisy["kept_fraction_by_kind"] if noisy else {}
        kept_text = " / ".join(_pct(kept.get(k)) for k in ("answer", "corrupt", "boilerplate", "random"))
        lines.append(f"| {name} | {_pm_seeds(noisy and noisy['exact_match'])} | "
                     f"{_pm_seeds(clean and clean['exact_match'])} | "
                     f"{_pm(noisy and noisy['strict_match'])} | {kept_text if noisy else '-'} |")  # fmt: skip

    lines += ["", "**Exact match (%) per task family, noisy SFT data**", ""]
    lines.append("| method | " + " | ".join(FAMILIES) + " |")
    lines.append("|---|" + "---|" * len(FAMILIES))
    for name in method_order(results.get("methods", {})):
        cell = summary["main"].get(name, {})
        if "noisy" in cell:
            by_family = cell["noisy"]["exact_match_by_family"]
            lines.append(f"| {name} | " + " | ".join(_pm(by_family[f]) for f in FAMILIES) + " |")

    if summary.get("ablations"):
        reference = summary["main"].get("sstoken", {}).get("noisy")
        lines += ["", "**Ablations of sstoken on the noisy data (exact match %, mean ± std)**; the first row is the "
                  "main `sstoken` run (ratio 0.6, gamma 0.5, history base, warm-up 0.2, last layer)", ""]  # fmt: skip
        lines.append("| setting | exact match | difference to main sstoken | kept answer / corrupt / boilerplate / "
                     "random tokens |")  # fmt: skip
        lines.append("|---|---|---|---|")
        if reference:
            kept = reference["kept_fraction_by_kind"]
            lines.append(
                f"| main sstoken | {_pm_seeds(reference['exact_match'])} | 0 | "
                + " / ".join(_pct(kept.get(k)) for k in ("answer", "corrupt", "boilerplate", "random"))
                + " |"
            )
        for name, cell in summary["ablations"].items():
            noisy = cell["noisy"]
            diff = (
                f"{100 * (noisy['exact_match']['mean'] - reference['exact_match']['mean']):+.1f}" if reference else "-"
            )
            kept = noisy["kept_fraction_by_kind"]
            lines.append(
                f"| {name} | {_pm_seeds(noisy['exact_match'])} | {diff} | "
                + " / ".join(_pct(kept.get(k)) for k in ("answer", "corrupt", "boilerplate", "random"))
                + " |"
            )

    failed = [r for r in results.get("runs", []) if r["status"] != "ok"]
    if failed:
        lines += ["", f"**{len(failed)} run(s) failed** (recorded in the JSON with their errors):"]
        lines += [f"- {r['group']}/{r['name']} {r['data']} seed {r['seed']}: {r['error']}" for r in failed]
    v = results["versions"]
    lines += ["", f"Versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, "
              f"trl_sstoken {v['trl_sstoken']} (commit {str(v['git_commit'])[:10]}"
              f"{', uncommitted changes' if v['git_dirty'] else ''})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    names = [n for n in method_order(results.get("methods", {})) if n in summary["main"] and n != REFERENCE_METHOD]
    ablations = list(summary.get("ablations", {}))
    panels = 3 if ablations else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))

    ax = axes[0]
    width = 0.38
    for offset, dataset, color in ((-width / 2, "noisy", "tab:red"), (width / 2, "clean", "tab:blue")):
        xs, means, stds = [], [], []
        for i, name in enumerate(names):
            cell = summary["main"][name].get(dataset)
            if cell:
                xs.append(i + offset)
                means.append(100 * cell["exact_match"]["mean"])
                stds.append(100 * cell["exact_match"]["std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=color, alpha=0.8, label=f"{dataset} SFT data")
        reference = summary["main"].get(REFERENCE_METHOD, {}).get(dataset)
        if reference:  # full SFT: the line every bar is read against
            ax.axhline(100 * reference["exact_match"]["mean"], color=color, linestyle="--", linewidth=1,
                       label=f"full SFT, {dataset}")  # fmt: skip
    _mark_families(ax, names)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylabel("exact match on held-out prompts (%)")
    ax.set_title("Methods (mean ± std over seeds)", pad=14)  # above the family names
    ax.legend()

    ax = axes[1]
    kinds = ["answer", "corrupt", "format", "boilerplate", "random"]
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        values = [
            100 * summary["main"][n].get("noisy", {}).get("kept_fraction_by_kind", {}).get(kind, 0) for n in names
        ]
        ax.bar([i - 0.4 + (j + 0.5) * width for i in range(len(names))], values, width, label=kind)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylabel("response tokens of the kind trained on (%)")
    ax.set_title("What each method trained on (noisy data)")
    ax.legend(fontsize=8)

    if ablations:
        ax = axes[2]
        labels, means, stds = [], [], []
        main = summary["main"].get("sstoken", {}).get("noisy")
        if main:
            labels.append("main sstoken")
            means.append(100 * main["exact_match"]["mean"])
            stds.append(100 * main["exact_match"]["std"])
        for name in ablations:
            cell = summary["ablations"][name]["noisy"]
            labels.append(name)
            means.append(100 * cell["exact_match"]["mean"])
            stds.append(100 * cell["exact_match"]["std"])
        ax.barh(range(len(labels)), means, xerr=stds, capsize=3, color="tab:green", alpha=0.8)
        full = summary["main"].get("full", {}).get("noisy")
        if full:
            ax.axvline(100 * full["exact_match"]["mean"], color="black", linestyle="--", label="full SFT (noisy)")
            ax.legend(fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("exact match (%)")
        ax.set_title("Ablations of sstoken (noisy data)")

    status = "" if results["status"].startswith("complete") else " [PARTIAL]"
    fig.suptitle(f"trl_sstoken quality benchmark, scale {results['scale_name']}{status}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_generated_block(name: str, body: str, source: str, docs: Path = DOCS) -> bool:
    """Replaces the block between `<!-- quality:{name}:begin -->` and its end marker in docs/benchmarks.md; the
    hand-written text around it stays. False when the file or the markers are missing."""
    if not docs.exists():
        return False
    begin, end = f"<!-- quality:{name}:begin -->", f"<!-- quality:{name}:end -->"
    text = docs.read_text()
    if begin not in text or end not in text:
        return False
    block = f"{begin}\n<!-- generated by {source}; do not edit by hand -->\n\n{body}\n\n{end}"
    docs.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))
    return True


def update_docs_section(results: dict, table: str, png: Path, docs: Path = DOCS) -> bool:
    """Replaces the generated block of this scale in docs/benchmarks.md, with its plot."""
    body = f"{table}\n![quality benchmark, scale {results['scale_name']}](assets/{png.name})"
    source = f"python -m benchmarks.quality.report from benchmarks/results/{png.with_suffix('.json').name}"
    if not replace_generated_block(results["scale_name"], body, source, docs):
        return False
    # the docs site only serves files under docs/, so the plot is copied there
    if png.exists():
        (docs.parent / "assets").mkdir(exist_ok=True)
        shutil.copyfile(png, docs.parent / "assets" / png.name)
    return True


def write_reports(results_path: Path, update_docs: bool = True) -> list[Path]:
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    table = markdown(results)
    md_path, png_path = results_path.with_suffix(".md"), results_path.with_suffix(".png")
    md_path.write_text(f"# Quality benchmark results ({results['scale_name']})\n\n{table}")
    written = [md_path]
    try:
        (plot if results.get("model", "lab") == "lab" else plot_real)(results, png_path)
        written.append(png_path)
    except ImportError as error:
        print(f"no plot: {error} (pip install matplotlib, or the 'bench' extra)")
    if update_docs and update_docs_section(results, table, png_path):
        written.append(DOCS)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.report")
    parser.add_argument("results", type=Path)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    for path in write_reports(args.results, update_docs=not args.no_docs):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
