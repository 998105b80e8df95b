"""The rule for moving a default, as `benchmarks.quality.defaults_rule` applies it to a results JSON."""

from benchmarks.quality import defaults_rule


def _cell(exact_match_values, nll):
    mean = sum(exact_match_values) / len(exact_match_values)
    std = (sum((v - mean) ** 2 for v in exact_match_values) / (len(exact_match_values) - 1)) ** 0.5
    return {"exact_match": {"mean": mean, "std": std, "values": exact_match_values}, "answer_nll": {"mean": nll}}


def test_condition_needs_a_gain_above_the_larger_spread_and_a_lower_nll():
    default = _cell([0.20, 0.22, 0.24], nll=1.0)  # std 0.02
    clear_win = _cell([0.40, 0.45, 0.50], nll=0.8)  # std 0.05, gain 0.23
    assert defaults_rule.compare(default, clear_win)["meets_condition"]
    worse_nll = _cell([0.40, 0.45, 0.50], nll=1.2)
    assert not defaults_rule.compare(default, worse_nll)["meets_condition"]
    inside_spread = _cell([0.05, 0.30, 0.55], nll=0.8)  # gain 0.08, std 0.25
    row = defaults_rule.compare(default, inside_spread)
    assert not row["meets_condition"]
    assert abs(row["spread"] - 0.25) < 1e-9 and abs(row["gain"] - 0.08) < 1e-9


def test_rows_cover_both_data_sets_and_ablations_against_the_default_run():
    main = {
        "sstoken": {"noisy": _cell([0.20, 0.22, 0.24], 1.0), "clean": _cell([0.30, 0.32, 0.34], 0.5)},
        "attention": {"noisy": _cell([0.40, 0.45, 0.50], 0.8)},  # no clean run: that cell is left out, not invented
    }
    results = {"model": "tiny", "summary": {"main": main}}
    ablations = {"model": "tiny", "summary": {"ablations": {"ratio=0.8": {"noisy": _cell([0.10, 0.12, 0.14], 1.5)}}}}
    rows = defaults_rule.rule_rows(results, ablations)
    assert [(row["setting"], row["data"], row["meets_condition"]) for row in rows] == [
        ("selection_gamma=0 (attention alone)", "noisy", True),
        ("ablation ratio=0.8", "noisy", False),
    ]
    table = defaults_rule.markdown(rows)
    assert "| tiny | noisy | selection_gamma=0 (attention alone) | +23.0 | 5.0 | 0.800 / 1.000 | **yes** |" in table
