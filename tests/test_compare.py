"""`trl-sstoken compare`: candidate parsing, statistics, metric checks, tables, and whole comparisons on a tiny model
(outputs, resume of a half-finished comparison, a bad metric refused before any training)."""

import json
import os
import sys

import pytest
from datasets import Dataset

from trl_sstoken import cli
from trl_sstoken.compare import evaluation, table
from trl_sstoken.compare.spec import Candidate, parse_candidates
from trl_sstoken.compare.stats import difference_verdict, mean_std


# ----- candidates -----


def test_candidates_parse_methods_and_typed_settings():
    candidates = parse_candidates(
        ["full", "sstoken:selection_ratio=0.8, selection_gamma=0.25", "sstoken:history=lagged,history_update_steps=5"]
    )
    assert [c.label for c in candidates][0] == "full" and candidates[0].overrides == {"selection_method": "full"}
    assert candidates[1].settings == {"selection_ratio": 0.8, "selection_gamma": 0.25}
    assert candidates[2].settings == {"history": "lagged", "history_update_steps": 5}
    assert isinstance(candidates[2].settings["history_update_steps"], int)
    assert len({c.slug for c in candidates}) == 3 and all("/" not in c.slug and ":" not in c.slug for c in candidates)
    assert parse_candidates(["sstoken:allow_rel_fallback=true"])[0].settings == {"allow_rel_fallback": True}


@pytest.mark.parametrize(
    "specs, match",
    [
        (["sstokn"], r"unknown selection method 'sstokn' \(did you mean 'sstoken'\?\)"),
        (["sstoken:selection_ration=0.8"], r"'selection_ration' is not a setting .*did you mean 'selection_ratio'"),
        (["sstoken:selection_ratio=high"], r"selection_ratio='high' is not a float"),
        (["sstoken:seed=3"], "seed and selection_method are set by compare"),
        (["sstoken:selection_ratio"], "is not field=value"),
        (["full", "full"], "lists 'full' twice"),
        ([], "at least one candidate"),
    ],
)
def test_bad_candidates_name_the_entry(specs, match):
    with pytest.raises(ValueError, match=match):
        parse_candidates(specs)


# ----- statistics and tables -----


def test_a_difference_is_judged_against_the_larger_seed_spread():
    base = mean_std([1.0, 1.2])  # std 0.141
    assert base["mean"] == pytest.approx(1.1) and base["n"] == 2
    assert difference_verdict(mean_std([1.0, 1.1]), base, lower_is_better=True) == "inside the seed spread"
    assert difference_verdict(mean_std([0.5, 0.6]), base, lower_is_better=True) == "better, beyond the seed spread"
    assert difference_verdict(mean_std([0.5, 0.6]), base, lower_is_better=False) == "worse, beyond the seed spread"
    assert "one seed" in difference_verdict(mean_std([0.5]), mean_std([1.0]), lower_is_better=True)


def _run(label, seed, nll, metric=None):
    result = {"response_nll": nll, "selected_fraction": 0.6, "train_seconds": 2.0}
    if metric is not None:
        result["metric"] = {"exact": metric}
    return {"label": label, "seed": seed, "status": "ok", "result": result}


def test_summary_and_tables_hold_every_candidate_with_mean_spread_and_verdict(tmp_path):
    candidates = [Candidate("full", "full"), Candidate("sstoken", "sstoken")]
    runs = [_run("full", 0, 1.0, 0.5), _run("full", 1, 1.2, 0.7), _run("sstoken", 0, 2.0, 0.1),
            _run("sstoken", 1, 2.1, 0.2)]  # fmt: skip
    summary = table.summarize(candidates, runs)
    assert summary["sstoken"]["response_nll"]["values"] == [2.0, 2.1]
    assert summary["sstoken"]["vs_first"]["response_nll"]["verdict"] == "worse, beyond the seed spread"
    assert summary["sstoken"]["vs_first"]["metric:exact"]["difference"] == pytest.approx(-0.45)
    markdown = table.markdown_table(summary, base_nll=3.0)
    assert "| base model (no training) | - | 3.000 |" in markdown
    assert "| sstoken | 2 | 2.050 ± 0.071 | 0.150 ± 0.071 |" in markdown
    assert "NLL +0.950: worse, beyond the seed spread" in table.terminal_table(summary, 3.0)
    assert table.plot(summary, 3.0, str(tmp_path / "plot.png"), "title") == str(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_without_matplotlib_the_plot_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    summary = table.summarize([Candidate("full", "full")], [_run("full", 0, 1.0)])
    assert table.plot(summary, None, str(tmp_path / "plot.png"), "title") is None
    assert not (tmp_path / "plot.png").exists()


# ----- the metric -----


def _good_metric(predictions, references):
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon", "is not module:function"),
        ("no_such_module_here:f", "the module 'no_such_module_here' cannot be imported"),
        ("json:no_such_function", "'json' has no function 'no_such_function'"),
    ],
)
def test_a_metric_that_cannot_be_loaded_is_named(spec, match):
    with pytest.raises(evaluation.MetricError, match=match):
        evaluation.load_metric(spec)


def test_a_metric_that_raises_or_returns_no_number_is_named():
    def raises(predictions, references):
        raise KeyError("score")

    with pytest.raises(evaluation.MetricError, match=r"--metric 'mod:raises' raised KeyError"):
        evaluation.check_metric(raises, "mod:raises", ["a", "b"])
    with pytest.raises(evaluation.MetricError, match="must return a finite number"):
        evaluation.check_metric(lambda p, r: "high", "mod:text", ["a"])
    with pytest.raises(evaluation.MetricError, match="must return a finite number"):
        evaluation.check_metric(lambda p, r: {"x": float("nan")}, "mod:nan", ["a"])
    assert evaluation.score_metric(_good_metric, "mod:_good_metric", ["a", "b"], ["a", "c"]) == {"_good_metric": 0.5}


def test_prompts_and_references_from_both_formats():
    rows = Dataset.from_list([{"prompt": "p1", "completion": " c1"}])
    assert evaluation.prompts_and_references(rows) == (["p1"], [" c1"])
    chat = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    )
    prompts, references = evaluation.prompts_and_references(chat)
    assert prompts == [[{"role": "user", "content": "hi"}]] and references == ["hello"]
    with pytest.raises(evaluation.MetricError, match="prompt/completion or messages columns"):
        evaluation.prompts_and_references(Dataset.from_list([{"text": "plain"}]))


# ----- whole comparisons on a tiny model -----


METRIC_MODULE = """
def exact(predictions, references):
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def broken(predictions, references):
    return predictions[0]["score"]
"""


def compare_flags(model_dir, data_file, output_dir, *extra):
    return ["compare", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_file),
            "--eval_dataset_name", str(data_file), "--eval_num_examples", "8", "--output_dir", str(output_dir),
            "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to",
            "none", "--max_length", "64", "--save_strategy", "no", "--use_cpu", "--bf16", "false",
            "--report_examples", "4", *extra]  # fmt: skip


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    (tmp_path / "user_metrics.py").write_text(METRIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_metrics"


def test_a_comparison_writes_table_plot_json_and_reports_and_resumes(
    tmp_path, tiny_model_dir, jsonl_file, metric_module, capsys
):
    out = tmp_path / "cmp"
    flags = compare_flags(tiny_model_dir, jsonl_file, out, "--methods", "full", "sstoken:selection_ratio=0.5",
                          "--seeds", "0", "1", "--metric", f"{metric_module}:exact", "--metric_max_new_tokens", "4")  # fmt: skip
    assert cli.main(flags) == 0
    record = json.loads((out / "comparison.json").read_text())
    assert record["status"] == "complete" and len(record["runs"]) == 4
    assert record["command"].startswith("trl-sstoken compare ") and "--methods" in record["command"]
    assert record["base_model_response_nll"] > record["summary"]["full"]["response_nll"]["mean"]
    assert record["summary"]["sstoken:selection_ratio=0.5"]["response_nll"]["n"] == 2
    assert set(record["summary"]["full"]) >= {"metric:exact", "response_nll", "seeds"}
    for run in record["runs"]:
        assert run["command"].startswith("trl-sstoken train ") and f"--seed={run['seed']}" in run["command"]
        assert "--methods" not in run["command"] and "--metric" not in run["command"]
    timing = record["timing"]
    assert timing["runs_trained_now"] == 4 and timing["wall_seconds"] >= timing["runs_wall_seconds"] > 0
    # one selection report per selecting candidate (its first seed), none for full SFT
    reports = sorted(p.relative_to(out).as_posix() for p in out.rglob("selection_report.html"))
    assert reports == ["runs/sstoken__selection_ratio=0.5-seed0/selection_report.html"]
    assert (out / "comparison.png").stat().st_size > 0
    assert "| full | 2 |" in (out / "comparison.md").read_text()
    printed = capsys.readouterr().out
    assert "[4/4] sstoken:selection_ratio=0.5 (seed 1): training" in printed and "response NLL" in printed

    # interrupted after three runs: the fourth result is missing; a rerun keeps the three and trains the fourth
    last = out / "runs" / "sstoken__selection_ratio=0.5-seed1" / "result.json"
    kept = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json") if p != last}
    last.unlink()
    assert cli.main(flags) == 0
    printed = capsys.readouterr().out
    assert (
        printed.count("finished earlier, kept") == 3
        and "[4/4] sstoken:selection_ratio=0.5 (seed 1): training" in printed
    )
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in kept.items())
    again = json.loads((out / "comparison.json").read_text())
    assert again["status"] == "complete" and again["timing"]["runs_trained_now"] == 1
    assert again["summary"]["full"]["response_nll"] == record["summary"]["full"]["response_nll"]
    # the same runs trained again give the same number: the seed and data order are the run's own
    for key in ("response_nll", "metric:exact"):
        assert (
            again["summary"]["sstoken:selection_ratio=0.5"][key]
            == record["summary"]["sstoken:selection_ratio=0.5"][key]
        )
    assert again["earlier_invocations"] == [record["command"]]

    # other settings in the same folder: refused, not mixed into the table
    assert cli.main([*flags, "--learning_rate", "5e-3"]) == 2
    assert "made by a comparison with other settings" in capsys.readouterr().err


class Killed(BaseException):
    """The process dying in the middle of a run (not an error the command handles)."""


def test_a_run_interrupted_mid_training_resumes_from_its_last_checkpoint(
    tmp_path, tiny_model_dir, jsonl_file, capsys, monkeypatch
):
    from trl_sstoken import SSTokenTrainer

    def flags(out, *extra):
        return compare_flags(tiny_model_dir, jsonl_file, out, "--methods", "sstoken", "--seeds", "0",
                             "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps",
                             "1", "--report_examples", "0", *extra)  # fmt: skip

    assert cli.main(flags(tmp_path / "whole")) == 0
    (whole,) = json.loads((tmp_path / "whole" / "comparison.json").read_text())["runs"]
    assert whole["result"]["resumed_from_checkpoint"] is None

    save, steps = SSTokenTrainer._save_checkpoint, []

    def killed_after_the_first_checkpoint(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(SSTokenTrainer, "_save_checkpoint", killed_after_the_first_checkpoint)
    out = tmp_path / "cmp"
    with pytest.raises(Killed):
        cli.main(flags(out))
    folder = out / "runs" / "sstoken-seed0"
    assert (folder / "checkpoint-2").is_dir() and not (folder / "result.json").exists()
    monkeypatch.setattr(SSTokenTrainer, "_save_checkpoint", save)
    training_step = SSTokenTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(SSTokenTrainer, "training_step", counted)
    capsys.readouterr()
    assert cli.main(flags(out)) == 0
    assert "[1/1] sstoken (seed 0): resuming from its last complete checkpoint" in capsys.readouterr().out
    assert steps == [2, 3]  # steps 3 and 4 only: the first two came from checkpoint-2
    (resumed,) = json.loads((out / "comparison.json").read_text())["runs"]
    assert resumed["result"]["resumed_from_checkpoint"] == "checkpoint-2"
    # the resume is exact (optimizer, schedule, data position, random states): the run ends as the uninterrupted one
    assert resumed["result"]["response_nll"] == whole["result"]["response_nll"]
    assert resumed["result"]["selected_fraction"] == pytest.approx(whole["result"]["selected_fraction"])
    assert resumed["result"]["train_loss_mean"] == pytest.approx(whole["result"]["train_loss_mean"], rel=1e-5)
    (row,) = [line for line in (out / "comparison.md").read_text().splitlines() if line.startswith("| sstoken |")]
    assert " (resumed) |" in row  # its train seconds are those after the resume

    # checkpoints of an unfinished run with other settings, or with no record of their comparison: refused
    (folder / "result.json").unlink()
    assert cli.main(flags(out, "--learning_rate", "5e-3")) == 2
    assert "holds checkpoints of an unfinished run with other settings" in capsys.readouterr().err
    (folder / "started.json").unlink()
    assert cli.main(flags(out)) == 2
    assert "with no record of the comparison that made them" in capsys.readouterr().err


def test_a_bad_metric_is_refused_before_any_training(tmp_path, tiny_model_dir, jsonl_file, metric_module, capsys):
    out = tmp_path / "cmp"
    flags = compare_flags(tiny_model_dir, jsonl_file, out, "--methods", "full", "--metric", f"{metric_module}:broken")
    assert cli.main(flags) == 2
    error = capsys.readouterr().err
    assert f"--metric '{metric_module}:broken' raised TypeError" in error
    assert not (out / "runs").exists()
    assert cli.main(compare_flags(tiny_model_dir, jsonl_file, out, "--metric", f"{metric_module}:missing")) == 2
    assert f"'{metric_module}' has no function 'missing'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--methods", "full", "rho1"], "--methods 'rho1': selection_method='rho1' needs exactly one reference"),
        (["--methods", "ful"], "unknown selection method 'ful'"),
        (["--seeds", "0", "0"], "--seeds must list distinct"),
        (["--train_sample", "1.5"], "--train_sample=1.5 is out of range"),
        (["--eval_dataset_name", "./no/such.jsonl"], "no such file or folder"),
    ],
)
def test_bad_compare_inputs_are_refused_with_the_flag(tmp_path, tiny_model_dir, jsonl_file, capsys, extra, match):
    assert cli.main([*compare_flags(tiny_model_dir, jsonl_file, tmp_path / "cmp"), *extra]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "runs").exists()


def test_compare_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--methods", "--seeds", "--eval_dataset_name", "--metric", "--train_sample"))


def test_a_record_write_removes_the_temporary_files_killed_writers_left(tmp_path):
    from conftest import dead_writers_temporary_name

    from trl_sstoken.saving.temporary_files import temporary_name

    dead, live = dead_writers_temporary_name(".record.json"), temporary_name(".record.json")
    for name in (dead, live):
        (tmp_path / name).write_text("{")
    table.write_json(str(tmp_path / "record.json"), {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["record.json", live])
    assert json.loads((tmp_path / "record.json").read_text()) == {"a": 1}
