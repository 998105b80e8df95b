"""The learning-rate calibration of the real-model budget scales (issue 27): the rule picks what it says, a killed
calibration keeps what it finished, --resume trains only the rest, and an uncalibrated scale refuses compared methods.

The training runs are stood in for (`run._init_worker` / `run._run_job`), so these take seconds; the harness's own
smoke tests train for real."""

import json
import math

import pytest
from benchmarks.quality import calibrate, calibration, run
from benchmarks.quality.scales import SCALES


def lrs_runs(table: dict) -> dict:
    return {lr: {"status": "ok", "answer_nll": nll, "exact_match": em} for lr, (nll, em) in table.items()}


# ----- the rule -----


def test_the_lowest_clean_answer_nll_wins_when_it_is_inside_the_grid():
    choice = calibration.choose_lr(
        [1e-3, 3e-4, 1e-4], lrs_runs({1e-3: (0.9, 0.6), 3e-4: (0.5, 0.3), 1e-4: (0.7, 0.2)})
    )
    assert choice["final"] and choice["lr"] == 3e-4 and choice["extend_with"] is None
    assert choice["ranking"] == ["0.0003", "0.0001", "0.001"]


def test_nll_ties_go_by_exact_match_then_by_the_smaller_lr():
    tie = calibration.NLL_TIE
    runs = lrs_runs({3e-3: (1.0, 0.9), 1e-3: (0.50, 0.40), 3e-4: (0.50 + tie / 2, 0.45), 1e-4: (0.9, 0.1)})
    assert calibration.choose_lr(list(runs), runs)["lr"] == 3e-4  # tied on NLL, better exact match
    runs[3e-4]["exact_match"] = 0.40
    assert calibration.choose_lr(list(runs), runs)["lr"] == 3e-4  # tied on both: the smaller lr
    runs[3e-4]["answer_nll"] = 0.50 + 2 * tie  # no longer tied: NLL decides, whatever the exact match
    runs[3e-4]["exact_match"] = 0.99
    assert calibration.choose_lr(list(runs), runs)["lr"] == 1e-3


def test_a_choice_at_the_edge_of_the_grid_is_not_final_and_names_the_next_lr():
    up = calibration.choose_lr([1e-3, 3e-4, 1e-4], lrs_runs({1e-3: (0.4, 0.5), 3e-4: (0.6, 0.4), 1e-4: (0.9, 0.2)}))
    assert not up["final"] and up["lr"] == 1e-3 and up["extend_with"] == pytest.approx(3e-3)
    down = calibration.choose_lr([1e-3, 3e-4, 1e-4], lrs_runs({1e-3: (0.9, 0.5), 3e-4: (0.6, 0.4), 1e-4: (0.4, 0.2)}))
    assert not down["final"] and down["lr"] == 1e-4 and down["extend_with"] == pytest.approx(3e-5)
    single = calibration.choose_lr([1e-3], lrs_runs({1e-3: (0.4, 0.5)}))
    assert not single["final"] and single["extend_with"] == pytest.approx(3e-3)


def test_unfinished_candidates_leave_no_choice_and_a_diverged_run_ranks_last():
    runs = lrs_runs({1e-3: (math.nan, 0.0), 3e-4: (0.6, 0.4)})
    assert not calibration.choose_lr([1e-3, 3e-4, 1e-4], runs)["final"]
    runs[1e-4] = {"status": "failed"}
    assert "not finished: lr 0.0001" in calibration.choose_lr([1e-3, 3e-4, 1e-4], runs)["reason"]
    runs.update(lrs_runs({1e-4: (0.9, 0.1)}))
    choice = calibration.choose_lr([1e-3, 3e-4, 1e-4], runs)
    assert choice["final"] and choice["lr"] == 3e-4 and choice["ranking"][-1] == "0.001"


# ----- the command -----


class FakeTraining:
    """Stands in for one harness run: the scripted clean-answer NLL and exact match of each lr."""

    def __init__(self, table: dict, stop_at: float | None = None):
        self.table, self.stop_at, self.trained = table, stop_at, []

    def init(self, scale, base_path, device, threads):
        assert scale["sft_lr"] is None and scale["model"] == "smollm2"

    def job(self, job):
        lr = job["scale_overrides"]["sft_lr"]
        assert (job["name"], job["data"], job["seed"]) == ("full", "noisy", 99) and job["lr"] == lr
        if lr == self.stop_at:
            raise KeyboardInterrupt  # the calibration is killed while this lr trains
        self.trained.append(lr)
        nll, em = self.table[lr]
        metric = {"overall": em}
        result = {"answer_nll": nll, "exact_match": metric, "strict_match": metric, "train_loss_first_log": 2.0,
                  "train_loss_last_log": 0.5, "cpu_seconds": 1.0, "wall_seconds": 1.0}  # fmt: skip
        return {**job, "status": "ok", "result": result}


@pytest.fixture
def fake(monkeypatch):
    def install(table, stop_at=None):
        training = FakeTraining(table, stop_at)
        monkeypatch.setattr(run, "_init_worker", training.init)
        monkeypatch.setattr(run, "_run_job", training.job)
        monkeypatch.setattr(calibrate, "model_path", lambda name: f"/models/{name}")
        return training

    return install


TABLE = {1e-3: (0.9, 0.6), 3e-4: (0.5, 0.3), 1e-4: (0.7, 0.2)}
ARGS = ["--model", "smollm2", "--scale", "real-cpu-300", "--lrs", "1e-3", "3e-4", "1e-4"]


def test_calibrate_writes_every_run_and_the_rules_choice(fake, tmp_path):
    training = fake(TABLE)
    report = calibrate.main([*ARGS, "--output-dir", str(tmp_path)])
    path = tmp_path / "lr-real-cpu-300-smollm2.json"
    stored = json.loads(path.read_text())
    assert stored["choice"] == report["choice"] and stored["choice"]["final"] and stored["choice"]["lr"] == 3e-4
    assert sorted(training.trained) == sorted(TABLE)
    assert [r["lr"] for r in stored["runs"]] == [1e-3, 3e-4, 1e-4]
    assert stored["recipe"] == calibration.recipe_of(SCALES["real-cpu-300"]) and stored["recipe"]["sft_steps"] == 300
    assert (stored["seed"], stored["data"], stored["method"]) == (99, "noisy", "full")
    assert stored["command"] == "python -m benchmarks.quality.calibrate " + " ".join([*ARGS, "--output-dir",
                                                                                      str(tmp_path)])  # fmt: skip
    lines = path.with_suffix(".log").read_text().splitlines()
    assert len(lines) == 3 and all("answer NLL" in line and "real-cpu-300 smollm2" in line for line in lines)


def test_a_killed_calibration_keeps_its_finished_lrs_and_resume_trains_only_the_rest(fake, tmp_path):
    first = fake(TABLE, stop_at=1e-4)
    with pytest.raises(KeyboardInterrupt):
        calibrate.main([*ARGS, "--output-dir", str(tmp_path)])
    path = tmp_path / "lr-real-cpu-300-smollm2.json"
    partial = json.loads(path.read_text())
    assert first.trained == [1e-3, 3e-4] and [r["lr"] for r in partial["runs"]] == [1e-3, 3e-4]
    assert not partial["choice"]["final"] and "not finished: lr 0.0001" in partial["choice"]["reason"]

    with pytest.raises(SystemExit, match="--resume"):  # an existing calibration is never overwritten silently
        calibrate.main([*ARGS, "--output-dir", str(tmp_path)])
    second = fake(TABLE)
    report = calibrate.main([*ARGS, "--output-dir", str(tmp_path), "--resume"])
    assert second.trained == [1e-4]
    assert report["choice"]["final"] and report["choice"]["lr"] == 3e-4
    assert len(path.with_suffix(".log").read_text().splitlines()) == 3

    third = fake({**TABLE, 3e-5: (0.4, 0.1)})  # a new lr extends the grid; the finished ones stay
    report = calibrate.main(["--model", "smollm2", "--scale", "real-cpu-300", "--lrs", "3e-5", "--output-dir",
                             str(tmp_path), "--resume"])  # fmt: skip
    assert third.trained == [3e-5] and report["candidates"] == [1e-3, 3e-4, 1e-4, 3e-5]
    assert report["choice"]["lr"] == 3e-5 and not report["choice"]["final"]  # now at the lower edge


def test_resume_refuses_a_calibration_of_another_recipe(fake, tmp_path):
    fake(TABLE)
    calibrate.main([*ARGS, "--output-dir", str(tmp_path)])
    path = tmp_path / "lr-real-cpu-300-smollm2.json"
    stored = json.loads(path.read_text())
    stored["recipe"]["sft_steps"] = 299
    path.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="another 'recipe'"):
        calibrate.main([*ARGS, "--output-dir", str(tmp_path), "--resume"])


def test_the_calibration_lr_reaches_the_training_run(monkeypatch):
    """The candidate lr travels in the job (`scale_overrides`) into the run's scale, i.e. into SSTokenConfig."""
    from benchmarks.quality import sft

    seen = {}
    monkeypatch.setattr(sft, "train_and_evaluate", lambda *a, **k: seen.setdefault("scale", a[4]) and {})
    for key, value in dict(base_path="/m", tokenizer=None, datasets={"noisy": []}, splits=type("S", (), {"eval": []}),
                           scale={**SCALES["real-cpu-300"], "model": "smollm2"}, device="cpu", threads=1).items():  # fmt: skip
        monkeypatch.setitem(run._WORKER, key, value)
    job = {"group": "calibration", "name": "full", "data": "noisy", "seed": 99, "overrides": {},
           "scale_overrides": {"sft_lr": 3e-4}}  # fmt: skip
    assert run._run_job(job)["status"] == "ok"
    assert seen["scale"]["sft_lr"] == 3e-4 and seen["scale"]["sft_steps"] == 300


# ----- what the scales read -----


def test_budget_scales_are_real_cpu_with_another_budget():
    for steps in (100, 300):
        scale = SCALES[f"real-cpu-{steps}"]
        differs = {key for key in scale | SCALES["real-cpu"] if scale.get(key) != SCALES["real-cpu"].get(key)}
        assert differs == {"sft_steps", "sft_lr", "lr_candidates", "reference_steps", "ablations"}
        assert scale["sft_steps"] == steps and scale["sft_lr"] is None and scale["ablations"] == []
        assert scale["reference_steps"] == round(steps * 2 / 3)
        epochs = steps * scale["sft_batch_size"] / (4 * scale["train_per_family"])
        assert epochs == {100: 2, 300: 6}[steps]


@pytest.mark.parametrize(
    "extra",
    [["--methods", "sstoken"], [], ["--methods", "full"], ["--methods", "full", "random", "--set", "sft_lr=1e-3"]],
)
def test_an_uncalibrated_budget_scale_refuses_compared_methods(tmp_path, extra):
    """Refused before any model is loaded, with the command that calibrates it."""
    argv = ["--model", "smollm2", "--scale", "real-cpu-300", "--calibration-dir", str(tmp_path), "--no-docs",
            "--output", str(tmp_path / "out.json"), *extra]  # fmt: skip
    with pytest.raises(calibration.Uncalibrated) as refusal:
        run.main(argv)
    message = str(refusal.value)
    assert "python -m benchmarks.quality.calibrate --model smollm2 --scale real-cpu-300 --lrs 0.001 0.0003" in message
    assert "no calibration file" in message and not (tmp_path / "out.json").exists()


def write_calibration(directory, scale_name, model, lr, final=True, **recipe_changes):
    recipe = {**calibration.recipe_of(SCALES[scale_name]), **recipe_changes}
    choice = {"final": final, "lr": lr, "reason": "test", "extend_with": None, "ranking": []}
    path = calibration.calibration_path(directory, scale_name, model)
    path.write_text(json.dumps({"recipe": recipe, "choice": choice, "rule": calibration.RULE}))
    return path


def test_a_final_calibration_gives_the_budget_scale_its_lr(tmp_path):
    write_calibration(tmp_path, "real-cpu-100", "gemma3", 3e-4)
    scale = dict(SCALES["real-cpu-100"])
    lr, record = calibration.lr_for_run("real-cpu-100", scale, "gemma3", ["sstoken", "full"], False, tmp_path)
    assert lr == 3e-4 and record["source"] == "calibration" and record["file"].endswith("lr-real-cpu-100-gemma3.json")
    with pytest.raises(calibration.Uncalibrated, match="no calibration file"):  # per model
        calibration.lr_for_run("real-cpu-100", scale, "smollm2", ["sstoken"], False, tmp_path)


def test_a_calibration_not_final_or_of_another_recipe_is_refused(tmp_path):
    scale = dict(SCALES["real-cpu-100"])
    write_calibration(tmp_path, "real-cpu-100", "smollm2", 1e-3, final=False)
    with pytest.raises(calibration.Uncalibrated, match="no final choice"):
        calibration.lr_for_run("real-cpu-100", scale, "smollm2", ["sstoken"], False, tmp_path)
    write_calibration(tmp_path, "real-cpu-100", "smollm2", 1e-3)
    changed = {**scale, "sft_steps": 120}  # e.g. --set sft_steps=120
    with pytest.raises(calibration.Uncalibrated, match="another recipe .differs in sft_steps"):
        calibration.lr_for_run("real-cpu-100", changed, "smollm2", ["sstoken"], False, tmp_path)


def test_full_sft_alone_may_run_at_an_uncalibrated_scale_with_an_lr_given_by_hand(tmp_path):
    scale = {**SCALES["real-cpu-300"], "sft_lr": 1e-4}  # after --set sft_lr=1e-4
    lr, record = calibration.lr_for_run("real-cpu-300", scale, "smollm2", ["full"], True, tmp_path)
    assert lr == 1e-4 and "full SFT only" in record["source"]
    lr, record = calibration.lr_for_run("real-cpu", dict(SCALES["real-cpu"]), "smollm2", ["sstoken"], False, tmp_path)
    assert lr == 1e-3 and "by hand" in record["source"]  # the 24-step scale keeps its own lr


def test_a_model_may_take_another_models_calibration_and_the_record_says_so(tmp_path):
    write_calibration(tmp_path, "real-cpu-300", "smollm2", 3e-4)
    scale = dict(SCALES["real-cpu-300"])
    with pytest.raises(calibration.Uncalibrated, match="--model gemma3"):
        calibration.lr_for_run("real-cpu-300", scale, "gemma3", ["sstoken"], False, tmp_path)
    lr, record = calibration.lr_for_run("real-cpu-300", scale, "gemma3", ["sstoken"], False, tmp_path, "smollm2")
    assert lr == 3e-4 and record["calibrated_on"] == "smollm2"
    assert record["file"].endswith("lr-real-cpu-300-smollm2.json")


def test_the_long_sets_six_epoch_cell_calibrates_into_its_own_file_and_refuses_until_then(fake, tmp_path):
    """`real-cpu-75 --tasks long` (the long set's longest budget): `calibrate` reaches it without --set, writes
    lr-real-cpu-75-<model>-long.json, and the harness refuses compared methods there until that holds a choice."""
    from benchmarks.quality import long_tasks

    argv = ["--model", "smollm2", "--scale", "real-cpu-75", "--tasks", "long", "--calibration-dir", str(tmp_path),
            "--no-docs", "--output", str(tmp_path / "out.json"), "--methods", "full", "random"]  # fmt: skip
    with pytest.raises(calibration.Uncalibrated) as refusal:
        run.main(argv)
    assert ("python -m benchmarks.quality.calibrate --model smollm2 --scale real-cpu-75 --lrs 0.001 0.0003 0.0001 "
            "--tasks long") in str(refusal.value)  # fmt: skip
    fake(TABLE)  # two workers: the stand-in runs in the worker processes, so the file is what is checked
    report = calibrate.main(["--model", "smollm2", "--scale", "real-cpu-75", "--tasks", "long", "--lrs", "1e-3",
                             "3e-4", "1e-4", "--workers", "2", "--output-dir", str(tmp_path)])  # fmt: skip
    assert report["choice"]["final"] and sorted(r["lr"] for r in report["runs"]) == sorted(TABLE)
    (path,) = tmp_path.glob("lr-*.json")
    assert path.name == "lr-real-cpu-75-smollm2-long.json"
    recipe = json.loads(path.read_text())["recipe"]
    assert recipe == calibration.recipe_of(long_tasks.scale_for(SCALES["real-cpu-75"]))
    assert (recipe["sft_steps"], recipe["train_per_family"], recipe["max_length"]) == (75, 50, 448)
    scale = long_tasks.scale_for(SCALES["real-cpu-75"])
    lr, record = calibration.lr_for_run("real-cpu-75", scale, "smollm2", ["sstoken"], False, tmp_path)
    assert lr == 3e-4 and record["file"].endswith("lr-real-cpu-75-smollm2-long.json")
