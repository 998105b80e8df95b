"""The quality benchmark (benchmarks/quality): its ground truth, its noise, its scoring, and the whole pipeline at the
tiny scale (seconds)."""

import json
import random

import pytest
from benchmarks.quality import data, evaluate, methods, noise, tasks
from benchmarks.quality.run import _run_job, main


@pytest.fixture(scope="module")
def instances():
    return tasks.generate(random.Random(7), 300)


def test_generator_ground_truth(instances):
    assert {i.family for i in instances} == set(tasks.FAMILIES)
    assert len({i.prompt for i in instances}) == len(instances)
    for instance in instances:
        # the answer recomputed from the prompt text alone agrees with the generator's
        assert tasks.ground_truth(instance.family, instance.prompt) == instance.answer
        assert instance.raw.startswith(instance.raw_prefix + " ")
        assert "<|im_start|>" not in instance.raw and "answer" not in instance.raw.split()
    add = next(i for i in instances if i.family == "add")
    a, b = int(add.prompt.split()[1]), int(add.prompt.split()[3])
    assert add.answer == (str(a + b),)
    reverse = next(i for i in instances if i.family == "reverse")
    assert list(reverse.answer) == reverse.prompt.split(": ")[1].split()[::-1]


def test_noise_rates_and_labels(instances):
    rng = random.Random(3)
    many = [instance for _ in range(4) for instance in instances]  # 4800 responses
    responses = [noise.noisy_response(instance, rng) for instance in many]
    realised = data.kind_counts(responses)
    assert realised["corrupt_fraction_of_answer_words"] == pytest.approx(noise.CORRUPT_RATE, abs=0.02)
    assert realised["responses_with_boilerplate"] == pytest.approx(noise.BOILERPLATE_RATE, abs=0.03)
    assert realised["responses_with_random_string"] == pytest.approx(noise.RANDOM_RATE, abs=0.03)
    for instance, response in zip(many, responses, strict=True):
        assert len(response.words) == len(response.kinds)
        answer_positions = [j for j, kind in enumerate(response.kinds) if kind in ("answer", "corrupt")]
        assert len(answer_positions) == len(instance.answer)
        for j, truth in zip(answer_positions, instance.answer, strict=True):
            word = response.words[j]
            if response.kinds[j] == "answer":
                assert word == truth
            else:  # a corrupted word is wrong, and of the same type as the true one
                assert word != truth and (word in tasks.NUMBERS) == (truth in tasks.NUMBERS)
                assert (word in tasks.KEYS) == (truth in tasks.KEYS)
        boilerplate = [w for w, k in zip(response.words, response.kinds, strict=True) if k == "boilerplate"]
        assert boilerplate in ([], list(noise.BOILERPLATE))
        codes = [w for w, k in zip(response.words, response.kinds, strict=True) if k == "random"]
        assert not codes or noise.RANDOM_LENGTH[0] <= len(codes) <= noise.RANDOM_LENGTH[1]
        assert all(code in noise.CODES for code in codes)
    clean = data.kind_counts([noise.clean_response(i) for i in instances])
    assert clean["response_words_by_kind"]["corrupt"] == 0 and clean["responses_with_boilerplate"] == 0


def test_tokens_line_up_with_word_kinds(instances):
    tokenizer = data.build_tokenizer()
    rng = random.Random(0)
    for instance in instances[:40]:
        row = data.tokenize_example(tokenizer, instance.prompt, noise.noisy_response(instance, rng))
        response_ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        assert len(row["kinds"]) == len(row["input_ids"])
        words = tokenizer.convert_ids_to_tokens(response_ids)
        assert words[-1] == tokenizer.eos_token
        assert sum(k >= 0 for k in row["kinds"]) == len(response_ids)


def assert_match_rates(result):
    """Match rates are fractions of the eval prompts: the overall rate is a mean of the families' (so between their
    lowest and highest), and a strict match is also an exact match, per family."""
    for name in ("exact_match", "strict_match"):
        families = [value for family, value in result[name].items() if family != "overall"]
        assert families and all(0 <= value <= 1 for value in families), result[name]
        assert min(families) <= result[name]["overall"] <= max(families), result[name]
    for family, value in result["strict_match"].items():
        assert value <= result["exact_match"][family], (family, result)


def test_exact_match_scoring():
    instance = tasks.Instance(
        "reverse", "reverse the list : ant cat fox", ("fox", "cat", "ant"), "ant cat fox backwards is"
    )
    score = lambda text: evaluate.score_generation(text.split(), instance)  # noqa: E731
    assert score("answer : fox cat ant .") == {"exact_match": True, "strict_match": True}
    assert score("sure ! here is what you asked for . answer : fox cat ant . ref : k01 k02") == {
        "exact_match": True,
        "strict_match": False,
    }
    assert score("answer : fox cat ant") == {"exact_match": True, "strict_match": False}  # ran out of tokens
    assert not score("answer : fox ant cat .")["exact_match"]
    assert not score("answer : fox cat ant ant .")["exact_match"]
    assert not score("answer : fox cat .")["exact_match"]
    assert not score("fox cat ant .")["exact_match"]  # no "answer :"
    assert not score("")["exact_match"]
    assert evaluate.score_raw_generation("fox cat ant . the".split(), instance)
    assert not evaluate.score_raw_generation("fox cat .".split(), instance)
    summary = evaluate.summarize([{"exact_match": True}, {"exact_match": False}], [instance, instance], "exact_match")
    assert summary == {"overall": 0.5, "reverse": 0.5}


def test_pipeline_tiny_scale(tmp_path):
    output = tmp_path / "quality-tiny.json"
    argv = ["--quick", "--workers", "1", "--output", str(output), "--cache-dir", str(tmp_path / "cache"), "--no-docs",
            "--methods", "full", "sstoken", "random", "rho1", "profit", "dft", "--ablations", "gamma=1.0"]  # fmt: skip
    main(argv)
    results = json.loads(output.read_text())

    assert results["status"] == "complete"
    assert results["command"].startswith("python -m benchmarks.quality.run --quick")
    for key in ("torch", "transformers", "trl", "peft", "trl_sstoken", "git_commit"):
        assert results["versions"][key]
    assert results["seeds"] == [0] and results["scale"]["sft_steps"] > 0
    assert results["design"]["noise_rates"]["corrupt_per_answer_word"] == noise.CORRUPT_RATE
    assert results["data"]["eval_prompts_in_train"] == 0
    assert_match_rates(results["base_model"]["chat_eval_before_sft"])
    assert set(results["base_model"]["raw_form_exact_match"]) == {"overall", *tasks.FAMILIES}
    assert results["base_model"]["recipe_hash"] and not results["base_model"]["cached"]

    # every requested method either ran or is recorded as skipped, never silently dropped
    for name in ("full", "sstoken", "random", "rho1", "profit", "dft"):
        status = results["methods"][name]["status"]
        assert status in ("ok", "skipped (not available)")
        if status == "ok":
            assert set(results["summary"]["main"][name]) == {"noisy", "clean"}
        else:
            assert results["methods"][name]["reason"] and name not in results["summary"]["main"]
    for name in ("full", "sstoken", "random"):
        assert results["methods"][name]["status"] == "ok"

    runs = [r for r in results["runs"] if r["group"] == "main"]
    assert all(r["status"] == "ok" for r in results["runs"])
    for run in runs:
        result = run["result"]
        assert set(result["exact_match"]) == {"overall", *tasks.FAMILIES}
        assert_match_rates(result)
        assert result["selection"]["unmatched_rows"] == 0
        assert run["overrides"]["selection_method"] == methods.METHODS[run["name"]]["selection_method"]
        assert run["overrides"]["selection_ratio"] == methods.SHARED["selection_ratio"]
    full = results["summary"]["main"]["full"]["noisy"]
    assert all(value == 1.0 for value in full["kept_fraction_by_kind"].values())
    assert set(full["kept_fraction_by_kind"]) == set(noise.KINDS)
    sstoken_run = next(r for r in runs if r["name"] == "sstoken" and r["data"] == "noisy")
    assert sstoken_run["result"]["selected_fraction_mean"] == pytest.approx(0.6, abs=0.1)
    cell = results["summary"]["main"]["sstoken"]["noisy"]["exact_match"]
    assert set(cell) == {"mean", "std", "n", "values"} and cell["n"] == 1
    assert results["summary"]["ablations"]["gamma=1.0"]["noisy"]["exact_match"]["n"] == 1
    assert results["ablation_grid"] == {"gamma=1.0": {"selection_gamma": 1.0}}
    assert output.with_suffix(".md").exists() and output.with_suffix(".png").stat().st_size > 1000

    # a run is deterministic given its seed
    job = {key: sstoken_run[key] for key in ("group", "name", "data", "seed", "overrides", "index")}
    again = _run_job(job)["result"]
    assert again["exact_match"] == sstoken_run["result"]["exact_match"]
    assert again["train_loss_mean"] == sstoken_run["result"]["train_loss_mean"]
    assert again["selection"] == sstoken_run["result"]["selection"]


def test_resume_keeps_finished_runs_and_retrains_the_first_as_a_check(tmp_path):
    """A stopped invocation's finished runs are kept, not trained again; only the missing ones run."""
    output = tmp_path / "quality-tiny.json"
    common = ["--quick", "--workers", "1", "--output", str(output), "--cache-dir", str(tmp_path / "cache"),
              "--no-docs", "--datasets", "noisy", "--ablations", "none"]  # fmt: skip
    main([*common, "--methods", "full"])
    first = json.loads(output.read_text())
    (kept_before,) = first["runs"]

    main([*common, "--methods", "full", "random", "--resume"])
    results = json.loads(output.read_text())

    assert results["status"] == "complete"
    assert results["resumed_from"]["runs_kept"] == 1
    assert results["resumed_from"]["started_at"] == first["started_at"]
    by_group = {}
    for run in results["runs"]:
        by_group.setdefault(run["group"], []).append(run)
    full = next(r for r in by_group["main"] if r["name"] == "full")
    assert full["resumed"] and full["result"] == kept_before["result"]
    assert [r["name"] for r in by_group["main"] if not r.get("resumed")] == ["random"]
    (check,) = by_group["resume_check"]
    assert check["name"] == "full" and check["status"] == "ok"
    assert results["resume_check"]["verdict"] == "identical"  # a run is deterministic given its seed
    assert set(results["summary"]["main"]) == {"full", "random"}
    assert results["summary"]["main"]["full"]["noisy"]["exact_match"]["n"] == 1  # the check is not a second seed
    assert results["resumed_from"]["earlier"] is None  # the first file was not itself a resumed one

    main([*common, "--methods", "full", "random", "--resume"])  # a third session: nothing left but the check
    third = json.loads(output.read_text())
    assert third["resumed_from"]["runs_kept"] == 2
    assert third["resumed_from"]["earlier"] == results["resumed_from"]  # the chain of sessions is kept
    assert sorted(r["name"] for r in third["runs"] if r["group"] == "main") == ["full", "random"]


def test_resume_refuses_a_results_file_of_another_scale(tmp_path):
    output = tmp_path / "quality-tiny.json"
    output.write_text(json.dumps({"scale": {"sft_steps": 1}, "design": {}, "seeds": [0], "runs": []}))
    argv = ["--quick", "--workers", "1", "--output", str(output), "--cache-dir", str(tmp_path / "cache"),
            "--no-docs", "--datasets", "noisy", "--ablations", "none", "--methods", "full", "--resume"]  # fmt: skip
    with pytest.raises(SystemExit, match="another 'scale'"):
        main(argv)


def test_resume_accepts_a_file_whose_method_table_lacks_methods_added_since(tmp_path):
    """Issue 27 added methods to the table: an earlier file without them resumes; a method whose overrides changed
    is still refused."""
    from benchmarks.quality.run import resume_from

    now = {"scale": {"sft_steps": 2}, "seeds": [0], "design": {"metric": "exact", "methods": methods.REAL_METHODS}}
    earlier_table = {name: overrides for name, overrides in methods.REAL_METHODS.items() if "[balanced]" not in name}
    output = tmp_path / "quality.json"
    output.write_text(json.dumps({**now, "design": {**now["design"], "methods": earlier_table}, "runs": []}))
    assert resume_from(output, dict(now), []) == ([], [])
    changed = {**earlier_table, "rel": {"selection_method": "rel", "selection_ratio": 0.5}}
    output.write_text(json.dumps({**now, "design": {**now["design"], "methods": changed}, "runs": []}))
    with pytest.raises(SystemExit, match="another 'design'"):
        resume_from(output, dict(now), [])


def test_tables_order_methods_by_family_with_full_sft_first():
    """Not alphabetically (issue 27): full SFT, then baselines, loss-based, attention, ssToken, other; each base method
    followed by its variants in the method table's order; an unknown name last."""
    from benchmarks.quality.report import method_order

    names = ["sstoken[balanced]", "dft", "attention", "zzz", "rel[balanced]", "sstoken", "random[position_matched]",
             "rho1", "full", "sstoken[sink_free]", "attention[position_corrected]", "rel", "random", "profit",
             "attention[sink_free]"]  # fmt: skip
    assert method_order(names) == [
        "full", "random", "random[position_matched]", "rel", "rel[balanced]", "rho1", "attention",
        "attention[sink_free]", "attention[position_corrected]", "sstoken", "sstoken[sink_free]", "sstoken[balanced]",
        "profit", "dft", "zzz",
    ]  # fmt: skip


def test_the_committed_real_model_results_render_by_family():
    from pathlib import Path

    from benchmarks.quality.report import markdown_real, method_order

    results = json.loads((Path(__file__).parents[1] / "benchmarks/results/quality-real-cpu-smollm2.json").read_text())
    table = markdown_real(results)
    noisy = table.split("**noisy training data**")[1].split("**clean training data**")[0]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in noisy.splitlines() if line.startswith("| ")][1:]
    assert (
        rows == method_order(results["summary"]["main"]) and rows[0] == "full" and len(rows) == 15
    )  # 12 methods + the stage-0 control and balanced variants (issue 27)


def test_resume_keeps_the_earlier_files_runs_outside_this_invocations_grid():
    """A sweep fills one results file in stages (run_budget_cpu.sh: the controls, then the variants, then the clean
    data), each with its own --methods / --datasets and --resume: a finished run of an earlier stage stays in the file
    and its tables, untouched, though this invocation does not ask for it."""
    import tempfile
    from pathlib import Path

    from benchmarks.quality.run import _job_key, resume_from

    def job(name, data="noisy", seed=0):
        return {"group": "main", "name": name, "data": data, "seed": seed, "overrides": {"m": name}}

    now = {"scale": {"sft_steps": 2}, "seeds": [0], "design": {"metric": "exact"}}
    earlier = [{**job("full"), "status": "ok", "result": {"x": 1}},
               {**job("random"), "status": "ok", "result": {"x": 2}},
               {**job("sstoken", "clean"), "status": "failed", "error": "boom"},
               {**job("full"), "group": "resume_check", "status": "ok", "of": "x"}]  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "quality.json"
        output.write_text(json.dumps({**now, "runs": earlier}))
        kept, todo = resume_from(output, dict(now), [job("full"), job("rel")])
    assert [(r["group"], r["name"], r["data"]) for r in kept] == [
        ("main", "full", "noisy"), ("main", "random", "noisy"), ("main", "sstoken", "clean"),
        ("resume_check", "full", "noisy")]  # fmt: skip
    assert all(r["resumed"] for r in kept) and kept[1]["result"] == {"x": 2} and kept[2]["status"] == "failed"
    assert [r.get("outside_grid", False) for r in kept] == [False, True, True, True]
    assert [j["name"] for j in todo] == ["full", "rel"] and todo[0]["group"] == "resume_check"
    assert _job_key(todo[1]) == _job_key(job("rel"))
