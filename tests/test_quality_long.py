"""The long-response task set of the quality benchmark (issue 27, item 3): ground truth, noise, token kinds spread
through the response, scoring, and the harness's `--tasks long` at the real-tiny scale."""

import json
import random

import pytest
from benchmarks.quality import long_tasks, real_data, real_evaluate
from benchmarks.quality.noise import KINDS


@pytest.fixture(scope="module")
def splits():
    return real_data.build_splits(1234, 60, 10, 4, tasks="long")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_ground_truth_recomputes_every_step_from_the_prompt(splits):
    instances = splits.train + splits.eval
    assert {i.family for i in instances} == set(long_tasks.FAMILIES)
    for instance in instances:
        assert long_tasks.ground_truth(instance.family, instance.prompt) == instance.steps
        assert instance.answer == instance.steps[-1]
        assert len(instance.steps) == len(instance.operations)
        for before, after in zip(instance.steps, instance.steps[1:], strict=False):
            assert before != after  # every step changes the state: no step is a copy of the previous one
        if instance.family == "list_steps":
            assert long_tasks.LIST_STEPS[0] <= len(instance.steps) <= long_tasks.LIST_STEPS[1]
            assert all(long_tasks.LIST_BOUNDS[0] <= len(step) <= long_tasks.LIST_BOUNDS[1] for step in instance.steps)
            assert all(len(set(step)) == len(step) for step in instance.steps)  # replace/remove stay unambiguous
        else:
            assert long_tasks.NUMBER_STEPS[0] <= len(instance.steps) <= long_tasks.NUMBER_STEPS[1]
            assert all(0 <= int(value) <= long_tasks.MAX_VALUE for (value,) in instance.steps)


def test_ground_truth_of_a_hand_written_prompt():
    prompt = ("Start with the list: ant, cat, fox, emu. Apply these steps in order: 1) reverse it; 2) replace cat "
              f"with owl; 3) move the first item to the end; 4) remove fox; 5) append bee. {long_tasks.PROMPT_TAIL}")  # fmt: skip
    assert long_tasks.ground_truth("list_steps", prompt) == (
        ("emu", "fox", "cat", "ant"),
        ("emu", "fox", "owl", "ant"),
        ("fox", "owl", "ant", "emu"),
        ("owl", "ant", "emu"),
        ("owl", "ant", "emu", "bee"),
    )
    prompt = f"Start with 23. Apply these steps in order: 1) add 9; 2) double it; 3) subtract 14; 4) halve it. {long_tasks.PROMPT_TAIL}"
    assert long_tasks.ground_truth("number_steps", prompt) == (("32",), ("64",), ("50",), ("25",))


def test_noise_has_the_short_families_kinds_and_rates():
    splits = real_data.build_splits(1234, 200, 1, 1, tasks="long")
    counts = real_data.kind_counts(splits.train_noisy)
    assert abs(counts["corrupt_fraction_of_answer_items"] - 0.2) < 0.02  # per payload item
    assert abs(counts["responses_with_boilerplate"] - 0.5) < 0.07
    assert abs(counts["responses_with_random_string"] - 0.3) < 0.07
    for instance, clean, noisy in zip(splits.train, splits.train_clean, splits.train_noisy, strict=True):
        assert {kind for kind, _ in clean.segments} == {"answer", "format"}
        payload = [kind for kind, _ in noisy.segments if kind in ("answer", "corrupt")]
        assert len(payload) == sum(len(step) for step in instance.steps) + len(instance.answer)
        noisy_format = [
            text for kind, text in noisy.segments if kind == "format" and text != real_data.RANDOM_MARKER_TEXT
        ]
        assert noisy_format == [text for kind, text in clean.segments if kind == "format"]  # the same procedure


@pytest.mark.real_model
def test_every_response_token_has_a_kind_and_the_payload_reaches_the_end(splits, smollm2_tokenizer):
    rows = [
        real_data.tokenize_example(smollm2_tokenizer, "smollm2", real_data.prompt_text(i), r)
        for i, r in zip(splits.train, splits.train_noisy, strict=True)
    ]
    payload = {KINDS.index("answer"), KINDS.index("corrupt")}
    for instance, response, row in zip(splits.train, splits.train_noisy, rows, strict=True):
        kinds = row["kinds"]
        start = next(index for index, kind in enumerate(kinds) if kind >= 0)
        assert all(kind >= 0 for kind in kinds[start:])  # every response token, to the end of turn, has a kind
        assert all(label == -100 for label in row["labels"][:start]) and -100 not in row["labels"][start:]
        for kind_index, kind in enumerate(KINDS):
            if kind == "format":
                continue
            tokens = [t for t, k in zip(row["input_ids"], kinds, strict=True) if k == kind_index]
            expected = "".join(text for k, text in response.segments if k == kind)
            assert "".join(smollm2_tokenizer.decode(tokens).split()) == "".join(expected.split())
        response_kinds = kinds[start:]
        fifths = [set() for _ in range(5)]
        for offset, kind in enumerate(response_kinds):
            fifths[offset * 5 // len(response_kinds)].add(kind)
        # the payload is spread through the response, to its end (the first fifth may be the boilerplate and the
        # first step's header, the last one the random tail); a step is at most ~15 format tokens from the next
        assert all(fifth & payload for fifth in fifths[1:4]), instance.prompt
        if KINDS.index("random") not in kinds:
            assert fifths[4] & payload, instance.prompt
        late = [offset for offset, kind in enumerate(response_kinds) if kind in payload]
        assert sum(offset >= len(response_kinds) / 2 for offset in late) >= 0.35 * len(late)
        assert 80 <= len(response_kinds) <= 300
        assert len(row["input_ids"]) <= long_tasks.MAX_LENGTH


def _generation(instance, steps=None, answer=None):
    steps = steps or instance.steps
    lines = [f"{long_tasks.step_header(i, op)}{', '.join(s)}." for i, (op, s) in enumerate(zip(instance.operations, steps, strict=True), 1)]  # fmt: skip
    return "\n".join(lines) + f"\nAnswer: {', '.join(answer or instance.answer)}"


def test_scoring_right_wrong_and_partial_generations(splits):
    instance = next(i for i in splits.eval if i.family == "list_steps")
    clean = real_data.clean_response(instance).text
    score = real_evaluate.score_generation
    assert _generation(instance) == clean
    assert score(clean, instance) == {"exact_match": True, "strict_match": True, "final_match": True,
                                      "step_accuracy": 1.0}  # fmt: skip
    noisy = f"{real_data.BOILERPLATE_TEXT}{clean} Ref: K01 Q22"
    assert score(noisy, instance) == {"exact_match": True, "strict_match": False, "final_match": True,
                                      "step_accuracy": 1.0}  # fmt: skip
    n = len(instance.steps)
    wrong_step = list(instance.steps)
    wrong_step[1] = (long_tasks.corrupt_item(wrong_step[1][0], random.Random(0)), *wrong_step[1][1:])
    result = score(_generation(instance, steps=wrong_step), instance)
    assert result == {"exact_match": False, "strict_match": False, "final_match": True, "step_accuracy": (n - 1) / n}
    # the final answer right but a step missing: not an exact match
    missing = "\n".join(line for line in clean.split("\n") if not line.startswith("Step 2 ("))
    assert score(missing, instance)["step_accuracy"] == (n - 1) / n and not score(missing, instance)["exact_match"]
    # cut off after two steps: those two count, the final answer is missing
    cut = "\n".join(clean.split("\n")[:2])
    assert score(cut, instance) == {"exact_match": False, "strict_match": False, "final_match": False,
                                    "step_accuracy": 2 / n}  # fmt: skip
    wrong_answer = _generation(instance, answer=instance.answer[::-1])
    assert score(wrong_answer, instance)["step_accuracy"] == 1.0 and not score(wrong_answer, instance)["exact_match"]
    assert score("", instance)["step_accuracy"] == 0.0


def test_scoring_number_steps_and_summaries(splits):
    instance = next(i for i in splits.eval if i.family == "number_steps")
    clean = real_data.clean_response(instance).text
    assert clean.startswith(f"Step 1 ({instance.operations[0]}): {instance.steps[0][0]}.\n")
    assert clean.endswith(f"\nAnswer: {instance.answer[0]}")
    off_by_one = clean.replace(f"Step 1 ({instance.operations[0]}): {instance.steps[0][0]}.",
                               f"Step 1 ({instance.operations[0]}): {int(instance.steps[0][0]) + 1}.")  # fmt: skip
    assert real_evaluate.score_generation(off_by_one, instance)["step_accuracy"] == 1 - 1 / len(instance.steps)
    other = next(i for i in splits.eval if i.family == "list_steps")
    per_example = [real_evaluate.score_generation(clean, instance), real_evaluate.score_generation("", other)]
    summary = real_evaluate._summarize(per_example, [instance, other], "step_accuracy")
    assert summary == {"overall": 0.5, "number_steps": 1.0, "list_steps": 0.0}


def test_the_short_task_set_is_unchanged():
    """The long set's hooks must not move a single draw of the short set (its results JSONs are resumed)."""
    from benchmarks.quality import tasks

    assert real_data.build_splits(1234, 3, 2, 1).train == real_data.build_splits(1234, 3, 2, 1, tasks="short").train
    assert [i.family for i in real_data.build_splits(1234, 3, 2, 1).eval] == list(tasks.FAMILIES) * 2
    with pytest.raises(ValueError, match="tasks='medium'"):
        real_data.build_splits(1234, 3, 2, 1, tasks="medium")


@pytest.mark.real_model
@pytest.mark.benchmark
def test_pipeline_tiny_scale_long_tasks(smollm2_dir, tmp_path):
    """The harness with `--tasks long` at the real-tiny scale; few new tokens, so that it stays cheap (the scoring
    is tested above, the point here is the wiring: sizes, max_length, the step metrics and the kinds)."""
    from benchmarks.quality.run import main

    output = tmp_path / "quality-real-tiny-smollm2-long.json"
    main(["--model", "smollm2", "--quick", "--tasks", "long", "--workers", "1", "--output", str(output),
          "--cache-dir", str(tmp_path / "cache"), "--no-docs", "--methods", "full", "--datasets", "noisy",
          "--set", "max_new_tokens=8"])  # fmt: skip
    results = json.loads(output.read_text())
    assert results["status"] == "complete" and results["scale_name"] == "real-tiny-smollm2-long"
    assert results["scale"]["tasks"] == "long" and results["scale"]["max_length"] == long_tasks.MAX_LENGTH
    assert results["design"]["families"] == list(long_tasks.FAMILIES)
    assert results["data"]["train_examples"] == 2 * 2 * 4 and results["data"]["eval_prompts_in_train"] == 0
    assert results["data"]["longest_example_tokens"] <= long_tasks.MAX_LENGTH
    (run,) = [r for r in results["runs"] if r["group"] == "main"]
    assert run["status"] == "ok", run.get("error")
    result = run["result"]
    assert set(result["exact_match"]) == {"overall", *long_tasks.FAMILIES}
    assert 0 <= result["step_accuracy"]["overall"] <= 1 and "final_match" in result
    assert result["selection"]["unmatched_rows"] == 0
    assert set(result["selection"]["kept_fraction_by_kind"]) >= {"answer", "format"}
    cell = results["summary"]["main"]["full"]["noisy"]
    assert set(cell["exact_match_by_family"]) == set(long_tasks.FAMILIES) and cell["step_accuracy"]["n"] == 1


def test_a_budget_scale_reads_the_long_sets_own_calibration(tmp_path):
    """The long set's recipe differs (sizes, max_length): it is calibrated on its own data, in its own file, and the
    short set's calibration never gives it an lr."""
    from benchmarks.quality import calibration
    from benchmarks.quality.scales import SCALES

    scale = long_tasks.scale_for(SCALES["real-cpu-300"])
    short = calibration.calibration_path(tmp_path, "real-cpu-300", "smollm2")
    short.write_text(json.dumps({"recipe": calibration.recipe_of(SCALES["real-cpu-300"]), "rule": calibration.RULE,
                                 "choice": {"final": True, "lr": 1e-3}}))  # fmt: skip
    with pytest.raises(calibration.Uncalibrated, match="lr-real-cpu-300-smollm2-long.json.*--tasks long"):
        calibration.lr_for_run("real-cpu-300", scale, "smollm2", ["sstoken"], False, tmp_path)
    long = calibration.calibration_path(tmp_path, "real-cpu-300", "smollm2", "long")
    assert long.name == "lr-real-cpu-300-smollm2-long.json"
    long.write_text(json.dumps({"recipe": calibration.recipe_of(scale), "rule": calibration.RULE,
                                "choice": {"final": True, "lr": 3e-4}}))  # fmt: skip
    lr, record = calibration.lr_for_run("real-cpu-300", scale, "smollm2", ["sstoken"], False, tmp_path)
    assert lr == 3e-4 and record["file"].endswith("lr-real-cpu-300-smollm2-long.json")


def test_the_long_sets_six_epoch_cell_is_the_long_set_at_real_cpu_300_on_100_training_prompts():
    """`real-cpu-75` (issue 27): the longest budget's 6 epochs on 100 long training prompts, 75 steps of batch 8;
    everything else as the long set at real-cpu-300, the same 80 eval prompts included."""
    from benchmarks.quality.scales import SCALES

    cell, longest = long_tasks.scale_for(SCALES["real-cpu-75"]), long_tasks.scale_for(SCALES["real-cpu-300"])
    differs = {key for key in cell | longest if cell.get(key) != longest.get(key)}
    assert differs == {"sft_steps", "reference_steps", "train_per_family"}
    assert cell["train_per_family"] * len(long_tasks.FAMILIES) == 100 and cell["sft_steps"] == 75
    assert cell["sft_steps"] * cell["sft_batch_size"] / 100 == 6  # epochs, as real-cpu-300's over its 400
    assert cell["reference_steps"] == 50 and cell["sft_lr"] is None
    assert (cell["eval_per_family"] * 2, cell["max_length"], cell["max_new_tokens"]) == (80, 448, 288)
    small = real_data.build_splits(cell["data_seed"], cell["train_per_family"], cell["eval_per_family"],
                                   cell["reference_per_family"], tasks="long")  # fmt: skip
    large = real_data.build_splits(longest["data_seed"], longest["train_per_family"], longest["eval_per_family"],
                                   longest["reference_per_family"], tasks="long")  # fmt: skip
    assert [i.prompt for i in small.eval] == [i.prompt for i in large.eval]
    assert len(small.train) == 100 and not {i.prompt for i in small.train} & {i.prompt for i in small.eval}


@pytest.mark.parametrize("module", ["run", "calibrate"])
def test_the_six_epoch_cell_is_for_the_long_set_only(module, capsys):
    from benchmarks.quality import calibrate, run

    with pytest.raises(SystemExit) as refusal:
        (run if module == "run" else calibrate).parse_args(["--model", "smollm2", "--scale", "real-cpu-75"])
    assert refusal.value.code == 2 and "--scale real-cpu-75 is for --tasks long only" in capsys.readouterr().err


def _long_results_stub() -> dict:
    """A `--tasks long` results JSON as run.py writes it, cut to what the report reads."""

    def metric(values):
        return {"mean": sum(values) / len(values), "std": 0.01, "values": values, "n": len(values)}

    def cell(exact, steps, final):
        return {"exact_match": metric(exact), "strict_match": metric([0.0, 0.0]), "step_accuracy": metric(steps),
                "final_match": metric(final), "answer_nll": {"mean": 0.5, "std": 0.01},
                "kept_fraction_by_kind": {"answer": 1.0}, "kept_fraction_by_position_decile": [1.0] * 10}  # fmt: skip

    return {
        "model": "smollm2",
        "scale_name": "real-cpu-75-smollm2-long",
        "seeds": [0, 1],
        "status": "complete",
        "command": "python -m benchmarks.quality.run --model smollm2 --scale real-cpu-75 --tasks long",
        "machine": {"workers": 2, "threads_per_run": 1, "cpu_count": 2, "device": "cpu"},
        "base_model": {
            "eval_before_sft": {"exact_match": {"overall": 0.0}, "strict_match": {"overall": 0.0}, "answer_nll": 1.5}
        },
        "data": {"noisy_realised": None},
        "summary": {
            "main": {
                "full": {"noisy": cell([0.25, 0.35], [0.8, 0.9], [0.5, 0.6])},
                "sstoken": {"noisy": cell([0.1, 0.2], [0.6, 0.7], [0.3, 0.4])},
            }
        },
        "runs": [],
    }


def test_a_long_results_file_reports_step_accuracy_and_final_match():
    from benchmarks.quality.report import markdown_real

    table = markdown_real(_long_results_stub())
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = lines[0].split(" | ")
    assert header[:6] == ["| method", "n", "exact match", "step accuracy", "final match", "strict match"]
    full = dict(zip(header, lines[1].split(" | "), strict=True))
    assert (
        full["| method"] == "| full" and full["step accuracy"] == "85.0 ± 1.0" and full["final match"] == "55.0 ± 1.0"
    )
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines[:3])  # the separator row included
    assert "step accuracy (the fraction of steps stated right)" in table


def test_a_short_results_file_has_no_long_columns():
    from pathlib import Path

    from benchmarks.quality.report import markdown_real

    results = json.loads((Path(__file__).parents[1] / "benchmarks/results/quality-real-cpu-smollm2.json").read_text())
    assert "step accuracy" not in markdown_real(results) and "final match" not in markdown_real(results)


def test_the_long_file_has_its_docs_block_and_the_report_fills_it(tmp_path):
    """The generated blocks of docs/benchmarks.md are keyed by the results' scale_name; a block that is missing is
    silently skipped, so the sweep's cells have theirs (a placeholder until their first run)."""
    from pathlib import Path

    from benchmarks.quality import report

    docs_text = (Path(__file__).parents[1] / "docs/benchmarks.md").read_text()
    for name in ("real-cpu-300-smollm2", "real-cpu-100-smollm2", "real-cpu-300-gemma3", "real-cpu-75-smollm2-long"):
        assert f"<!-- quality:{name}:begin -->" in docs_text and f"<!-- quality:{name}:end -->" in docs_text
    docs = tmp_path / "benchmarks.md"
    docs.write_text(docs_text)
    results = _long_results_stub()
    assert report.update_docs_section(results, report.markdown_real(results), tmp_path / "x.png", docs)
    block = docs.read_text().split("<!-- quality:real-cpu-75-smollm2-long:begin -->")[1].split(":end -->")[0]
    assert "| method | n | exact match | step accuracy | final match |" in block and "No run yet" not in block
