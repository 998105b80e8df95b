"""benchmarks/quality/run_budget_cpu.sh, the issue-27 sweep: its invocations in the design's order, every one
parsed by the harness (and refused there at an uncalibrated scale, which proves its arguments reach it), stages
chosen by argument or STAGES, and a stop at the first failing invocation. `python` is stood in for by a script
that records its arguments, so nothing trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.quality import calibrate, calibration, run


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality" / "run_budget_cpu.sh"
STUB = """#!{python}
import json, os, sys
log = os.environ["STUB_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
calls = sum(1 for _ in open(log))
sys.exit(1 if calls == int(os.environ.get("STUB_FAIL_AT", "0")) else 0)
"""


def invocations(tmp_path, *args, stages=None, fail_at=0):
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "STUB_FAIL_AT": str(fail_at)}
    env.pop("STAGES", None)
    if stages is not None:
        env["STAGES"] = stages
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def _value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def _methods(argv):
    if "--methods" not in argv:
        return None
    rest = argv[argv.index("--methods") + 1 :]
    return rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


CONTROLS = ["full", "random", "sstoken", "random[position_matched]"]
EXPECTED = [  # (module, model, scale, tasks, datasets, methods)
    ("run", "smollm2", "real-cpu", None, "noisy", ["random[position_matched]", "sstoken[balanced]", "rel[balanced]"]),
    ("calibrate", "smollm2", "real-cpu-300", None, None, None),
    ("run", "smollm2", "real-cpu-300", None, "noisy", CONTROLS),
    ("calibrate", "smollm2", "real-cpu-75", "long", None, None),
    ("run", "smollm2", "real-cpu-75", "long", "noisy", ["full", "random", "sstoken", "sstoken[balanced]"]),
    ("run", "smollm2", "real-cpu-300", None, "noisy", ["sstoken[balanced]", "rel", "rel[balanced]", "attention", "rho1"]),
    ("run", "smollm2", "real-cpu-300", None, "clean", CONTROLS),
    ("calibrate", "smollm2", "real-cpu-100", None, None, None),
    ("run", "smollm2", "real-cpu-100", None, "noisy", CONTROLS),
    ("calibrate", "gemma3", "real-cpu-300", None, None, None),
    ("run", "gemma3", "real-cpu-300", None, "noisy", CONTROLS),
]  # fmt: skip


def test_the_sweep_runs_the_designs_invocations_in_order_and_each_reaches_the_harness(tmp_path):
    done, calls = invocations(tmp_path)
    assert done.returncode == 0, done.stderr
    seen = [(argv[1].rsplit(".", 1)[1], _value(argv, "--model"), _value(argv, "--scale"), _value(argv, "--tasks"),
             _value(argv, "--datasets"), _methods(argv)) for argv in calls]  # fmt: skip
    assert seen == EXPECTED
    for argv in calls:
        assert argv[0] == "-m" and "--resume" in argv
        gemma = _value(argv, "--model") == "gemma3"
        assert (_value(argv, "--workers"), _value(argv, "--threads-per-run")) == (("1", "2") if gemma else ("2", "1"))
        if argv[1] == "benchmarks.quality.calibrate":
            args = calibrate.parse_args(argv[2:])
            assert args.lrs == [1e-3, 3e-4, 1e-4] and args.resume
            continue
        args = run.parse_args(argv[2:])
        assert args.seeds == [0, 1, 2] and args.ablations == ["none"] and args.resume
        if args.scale == "real-cpu":  # stage 0: the committed 24-step file, noisy and clean data
            assert args.datasets == ["noisy", "clean"] and "--output" not in argv
            continue
        # at an uncalibrated scale the harness refuses, before loading anything: the arguments reached it
        extra = ["--calibration-dir", str(tmp_path / "none"), "--output", str(tmp_path / "out.json"), "--no-docs"]
        with pytest.raises(calibration.Uncalibrated, match=f"--scale {args.scale} .*--model {args.model}"):
            run.main([*argv[2:], *extra])
        assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("how", ["argument", "env"])
def test_stages_are_chosen_by_argument_or_STAGES(tmp_path, how):
    done, calls = invocations(tmp_path, *(["2", "3"] if how == "argument" else []),
                              stages="2 3" if how == "env" else None)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [(_value(a, "--scale"), a[1].rsplit(".", 1)[1]) for a in calls] == [
        ("real-cpu-300", "run"), ("real-cpu-75", "calibrate"), ("real-cpu-75", "run")]  # fmt: skip


def test_the_sweep_stops_at_the_first_failing_invocation(tmp_path):
    done, calls = invocations(tmp_path, "3", "4", fail_at=1)  # stage 3's calibration fails
    assert done.returncode != 0 and len(calls) == 1 and _value(calls[0], "--scale") == "real-cpu-75"
    done, calls = invocations(tmp_path, "8")
    assert done.returncode == 2 and calls == [] and "unknown stage '8'" in done.stderr


def test_stage_0_resumes_the_committed_24_step_file_and_keeps_its_runs(tmp_path, monkeypatch):
    """Stage 0 adds the controls and the balanced variants to `quality-real-cpu-smollm2.json`: the committed file is
    accepted by --resume (same scale and design), its 76 runs (72 in the tables, 4 earlier resume checks) stay in it
    as they were, and the 18 new runs are the ones asked for (the base model and the training are stood in for)."""
    import shutil

    from benchmarks.quality import report

    _, calls = invocations(tmp_path, "0")
    (argv,) = calls
    output = tmp_path / "quality-real-cpu-smollm2.json"
    shutil.copyfile(REPO / "benchmarks/results/quality-real-cpu-smollm2.json", output)
    committed = json.loads(output.read_text())["runs"]
    seen = {}

    def base_model(name, scale, splits, device, results):
        results["base_model"] = {}
        return None, None, {"path": "/models/smollm2"}

    def run_jobs(jobs, workers, init_args, on_done, earlier=()):
        seen["jobs"] = [(job["name"], job["data"], job["seed"]) for job in jobs if job["group"] != "resume_check"]
        seen["checks"] = [job["name"] for job in jobs if job["group"] == "resume_check"]

    monkeypatch.setattr(run, "_real_base_model", base_model)
    monkeypatch.setattr(run, "_run_real_jobs", run_jobs)
    monkeypatch.setattr(report, "write_reports", lambda *a, **k: [])
    results = run.main([*argv[2:], "--output", str(output), "--no-docs"])
    # stage 0 has run (session 7): its runs are in the file's grid, every other run stays as it was, outside it
    methods = ["random[position_matched]", "sstoken[balanced]", "rel[balanced]"]
    wanted = {(m, d, s) for m in methods for d in ("noisy", "clean") for s in (0, 1, 2)}
    done = {(r["name"], r["data"], r["seed"]) for r in committed if r["group"] == "main" and r["status"] == "ok"}
    kept = results["resumed_from"]
    assert kept["runs_kept"] == len(wanted & done) and kept["runs_kept_outside_grid"] + kept["runs_kept"] == len(
        committed
    )
    assert len(json.loads(output.read_text())["runs"]) == len(committed)
    assert sorted(seen["jobs"]) == sorted(wanted - done)
    assert len(seen["checks"]) == (1 if wanted & done else 0) and set(seen["checks"]) <= set(methods)
