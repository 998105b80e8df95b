"""Mean and spread over seeds, shared by `trl-sstoken compare` and the quality benchmark (`benchmarks/quality`).

The spread is the sample standard deviation (n - 1 denominator); with one seed it is 0 and no difference can be said
to be outside it, which `difference_verdict` says in words rather than pretending.
"""

import statistics


def mean_std(values: list[float]) -> dict:
    """{"mean", "std", "n", "values"} of a list of per-seed numbers."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def difference_verdict(candidate: dict, baseline: dict, lower_is_better: bool) -> str:
    """Whether `candidate` differs from `baseline` (two `mean_std` cells) by more than the larger seed spread."""
    if min(candidate["n"], baseline["n"]) < 2:
        return "one seed: no spread to compare against"
    difference = candidate["mean"] - baseline["mean"]
    spread = max(candidate["std"], baseline["std"])
    if abs(difference) <= spread:
        return "inside the seed spread"
    better = difference < 0 if lower_is_better else difference > 0
    return "better, beyond the seed spread" if better else "worse, beyond the seed spread"
