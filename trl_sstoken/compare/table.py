"""The outputs of a comparison: per-candidate summaries over seeds, the terminal and markdown tables, the plot and
the JSON record (`comparison.json`, every number and the exact commands)."""

import json
import os

from ..saving.temporary_files import remove_stale, temporary_name
from .stats import difference_verdict, mean_std


NLL = "response_nll"


def summarize(candidates, runs: list[dict]) -> dict:
    """{label: {metric: mean_std, ...}} over the finished runs of each candidate, in candidate order."""
    summary = {}
    for candidate in candidates:
        finished = sorted((r for r in runs if r["label"] == candidate.label and r.get("status") == "ok"),
                          key=lambda r: r["seed"])  # fmt: skip
        if not finished:
            continue
        cell = {"seeds": [r["seed"] for r in finished], NLL: mean_std([r["result"][NLL] for r in finished])}
        for name in finished[0]["result"].get("metric", {}):
            cell[f"metric:{name}"] = mean_std([r["result"]["metric"][name] for r in finished])
        fractions = [r["result"]["selected_fraction"] for r in finished if r["result"].get("selected_fraction")]
        cell["selected_fraction"] = sum(fractions) / len(fractions) if fractions else None
        cell["train_seconds"] = mean_std([r["result"]["train_seconds"] for r in finished])
        # a resumed run's train_seconds are those of the steps after its resume: the cell says so
        cell["resumed_runs"] = sum(1 for r in finished if r["result"].get("resumed_from_checkpoint"))
        summary[candidate.label] = cell
    baseline = next(iter(summary.values()), None)
    for cell in summary.values():
        if cell is baseline:
            continue
        cell["vs_first"] = {
            key: {
                "difference": cell[key]["mean"] - baseline[key]["mean"],
                "verdict": difference_verdict(cell[key], baseline[key], lower_is_better=key == NLL),
            }
            for key in cell
            if (key == NLL or key.startswith("metric:")) and key in baseline
        }
    return summary


def _pm(cell: dict, digits: int = 3) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}" if cell["n"] > 1 else f"{cell['mean']:.{digits}f}"


def table_rows(summary: dict, base_nll: float | None) -> tuple[list[str], list[list[str]]]:
    metric_keys = sorted({k for cell in summary.values() for k in cell if k.startswith("metric:")})
    header = ["candidate", "seeds", "response NLL (lower is better)"]
    header += [f"{key[7:]} (higher is better)" for key in metric_keys]
    header += ["tokens trained on", "train s / run", "vs the first candidate (difference: verdict)"]
    rows = []
    if base_nll is not None:
        rows.append(["base model (no training)", "-", f"{base_nll:.3f}", *["-"] * len(metric_keys), "-", "-", "-"])
    first = next(iter(summary), None)
    for label, cell in summary.items():
        verdicts = []
        for key, comparison in cell.get("vs_first", {}).items():
            name = "NLL" if key == NLL else key[7:]
            verdicts.append(f"{name} {comparison['difference']:+.3f}: {comparison['verdict']}")
        fraction = cell["selected_fraction"]
        rows.append([
            label,
            str(len(cell["seeds"])),
            _pm(cell[NLL]),
            *[_pm(cell[key]) if key in cell else "-" for key in metric_keys],
            f"{100 * fraction:.0f}%" if fraction is not None else "-",
            f"{cell['train_seconds']['mean']:.0f}" + (" (resumed)" if cell.get("resumed_runs") else ""),
            "; ".join(verdicts) if verdicts else ("(baseline: the first candidate)" if label == first else "-"),
        ])  # fmt: skip
    return header, rows


def markdown_table(summary: dict, base_nll: float | None) -> str:
    header, rows = table_rows(summary, base_nll)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def terminal_table(summary: dict, base_nll: float | None) -> str:
    header, rows = table_rows(summary, base_nll)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def plot(summary: dict, base_nll: float | None, path: str, title: str) -> str | None:
    """A bar chart per measure (mean ± spread over seeds); None, with nothing written, when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [NLL] + sorted({k for cell in summary.values() for k in cell if k.startswith("metric:")})
    labels = list(summary)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(5, 1.2 * len(labels) + 2) * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        cells = [summary[label].get(key) for label in labels]
        xs = [i for i, cell in enumerate(cells) if cell]
        ax.bar(xs, [c["mean"] for c in cells if c], yerr=[c["std"] for c in cells if c], capsize=4,
               color="tab:blue", alpha=0.85)  # fmt: skip
        if key == NLL and base_nll is not None:
            ax.axhline(base_nll, color="grey", linestyle="--", label="base model (no training)")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("response NLL (lower is better)" if key == NLL else f"{key[7:]} (higher is better)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: str, record: dict) -> None:
    """Writes the record to a temporary file and renames it into place: an interrupted write leaves the old one. The
    temporary name says who writes it (`saving/temporary_files.py`); those that killed writers left are removed."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, temporary_name(f".{name}"))
    try:
        with open(temporary, "w") as file:
            json.dump(record, file, indent=1, default=str)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    remove_stale(folder, f".{name}")
