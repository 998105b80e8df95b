"""The position-matched random control of the real-model benchmark (benchmarks/quality/position_matched.py, issue 27).

The draw: the same k per sequence as `random`; quotas within one token of their targets, summing to k, never above a
bucket; with a flat profile every token is kept with random's probability k / n; over many draws the kept fraction by
decile follows the profile; deterministic given the generator. The method through the trainer, and its config. The
harness: a control starts only after the sstoken run whose profile it copies, with that run's profile recorded, and
is refused (before anything loads) or recorded as failed, never run on a default, when that run is missing.
"""

import json

import numpy as np
import pytest
import torch
from benchmarks.quality import methods, position_matched, run
from benchmarks.quality.position_matched import (
    NUM_DECILES,
    PositionMatchedConfig,
    matched_targets,
    select_position_matched,
    systematic_quotas,
)
from conftest import build_tiny_model, config, lora_config, record_selections
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trl_sstoken import SSTokenConfig, SSTokenTrainer
from trl_sstoken.selection.methods import METHODS
from trl_sstoken.selection.scoring import bucket_sizes, num_to_keep, position_buckets, select_random


SETTINGS = settings(max_examples=150, deadline=None)
CONTROL = "random[position_matched]"  # the benchmark's name; its selection_method is position_matched_random
# A profile like sstoken's measured one on SmolLM2 (front-loaded)
FRONT_LOADED = [0.95, 0.85, 0.75, 0.65, 0.6, 0.55, 0.5, 0.45, 0.35, 0.3]


@st.composite
def masks_and_profiles(draw, max_length=40):
    """Any response mask (gaps: multi-turn segments; short and empty rows), any ratio, any profile with zeros."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, max_length)))
    mask = torch.from_numpy(draw(arrays(np.bool_, shape)).copy())
    profile = draw(st.lists(st.sampled_from([0.0, 0.05, 0.3, 0.6, 1.0, 2.5]), min_size=10, max_size=10))
    if not any(profile):
        profile[draw(st.integers(0, 9))] = 1.0
    return mask, draw(st.floats(0.05, 1.0)), torch.tensor(profile, dtype=torch.float64), draw(st.integers(0, 2**31))


@SETTINGS
@given(data=masks_and_profiles())
def test_same_k_per_sequence_as_random_inside_the_mask(data):
    mask, ratio, profile, seed = data
    keep = select_position_matched(mask, ratio, profile, torch.Generator().manual_seed(seed))
    assert torch.equal(keep.sum(-1), num_to_keep(mask, ratio))
    assert torch.equal(keep.sum(-1), select_random(mask, ratio, torch.Generator().manual_seed(seed)).sum(-1))
    assert not (keep & ~mask).any()
    again = select_position_matched(mask, ratio, profile, torch.Generator().manual_seed(seed))
    assert torch.equal(keep, again)  # deterministic given the step's generator


@SETTINGS
@given(data=masks_and_profiles())
def test_quotas_are_within_one_token_of_their_targets_and_never_above_a_bucket(data):
    mask, ratio, profile, seed = data
    sizes = bucket_sizes(position_buckets(mask, NUM_DECILES), NUM_DECILES)
    k = num_to_keep(mask, ratio)
    targets = matched_targets(sizes, k, profile)
    assert torch.allclose(targets.sum(-1), k.double())
    assert (targets <= sizes + 1e-9).all() and (targets >= 0).all()
    quotas = systematic_quotas(targets, sizes, torch.Generator().manual_seed(seed))
    assert torch.equal(quotas.sum(-1), k)
    assert (quotas <= sizes).all()
    assert ((quotas >= torch.floor(targets - 1e-9)) & (quotas <= torch.ceil(targets + 1e-9))).all()
    # below their caps, the targets are in proportion to profile * size
    free = (targets < sizes - 1e-9) & (profile > 0) & (sizes > 0)
    for row in range(sizes.size(0)):
        ratios = (targets[row] / (profile * sizes[row]))[free[row]]
        if ratios.numel() > 1:
            assert torch.allclose(ratios, ratios[0].expand_as(ratios))


def kept_frequency(select, mask, draws):
    return sum(select(torch.Generator().manual_seed(seed)).double() for seed in range(draws)) / draws


def test_with_a_flat_profile_every_token_is_kept_with_randoms_probability():
    """Rows of 5, 13 and 37 tokens (fewer tokens than buckets, and uneven buckets), a gap between two segments."""
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 3:8] = True
    mask[1, 2:9] = mask[1, 20:26] = True
    mask[2, 1:38] = True
    flat = torch.ones(NUM_DECILES, dtype=torch.float64)
    matched = kept_frequency(lambda g: select_position_matched(mask, 0.6, flat, g), mask, 4000)
    uniform = kept_frequency(lambda g: select_random(mask, 0.6, g), mask, 4000)
    expected = (num_to_keep(mask, 0.6).double() / mask.sum(-1)).unsqueeze(-1).expand_as(matched)[mask]
    assert torch.allclose(matched[mask], expected, atol=0.04)  # 4000 draws: std <= 0.008
    assert torch.allclose(uniform[mask], expected, atol=0.04)
    assert (matched[~mask] == 0).all()


def test_over_many_draws_the_kept_fraction_by_decile_tracks_the_profile():
    """Long rows (no bucket full): kept fraction of decile d = c * profile[d], with the c that keeps k. Short rows:
    the exact expectation t[d] / size[d] of `matched_targets`, which the systematic draw keeps unbiased (a largest
    remainder would keep the 0.6-probability token of a 5-token row always or never)."""
    profile = torch.tensor(FRONT_LOADED, dtype=torch.float64)
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, 5:] = False  # a 5-token row: one token in each of 5 buckets
    freq = kept_frequency(lambda g: select_position_matched(mask, 0.6, profile, g), mask, 3000)
    buckets = position_buckets(mask, NUM_DECILES)
    long_row = torch.stack([freq[0][buckets[0] == d].mean() for d in range(NUM_DECILES)])
    c = 60 / (profile * 10).sum()
    assert torch.allclose(long_row, c * profile, atol=0.02)
    sizes = bucket_sizes(buckets, NUM_DECILES)
    targets = matched_targets(sizes, num_to_keep(mask, 0.6), profile)
    short = torch.stack([freq[1][buckets[1] == d].mean() for d in range(NUM_DECILES) if sizes[1, d]])
    assert torch.allclose(short, (targets[1] / sizes[1])[sizes[1] > 0], atol=0.04)
    assert short.max() < 0.999 and short.min() > 0.001  # each token sometimes kept, sometimes not


def test_a_zero_decile_is_used_only_when_the_others_are_full():
    profile = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    mask = torch.ones(1, 20, dtype=torch.bool)
    keep = select_position_matched(mask, 0.3, profile, torch.Generator().manual_seed(0))
    assert keep[0, :2].all() and int(keep.sum()) == 6  # the first decile is full, the other 4 tokens by size


@pytest.fixture
def registered():
    with position_matched.registered():
        yield
    assert "position_matched_random" not in METHODS


def test_importing_the_benchmark_leaves_the_packages_method_list_alone():
    """The control is registered only around a run: the package's help text is written at import and lists the
    shipped methods, so a control left in the registry would be a method the help does not name."""
    assert "position_matched_random" not in METHODS
    assert methods.availability(CONTROL, methods.REAL_METHODS) == (True, "")


def test_the_config_checks_the_profile_and_the_method_needs_it(tmp_path, registered):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"position_profile must be a list of 10"):
        PositionMatchedConfig(selection_method="position_matched_random", position_profile=[0.5] * 9, **base)
    with pytest.raises(ValueError, match=r"position_profile\[3\] must be a finite number >= 0.*no token"):
        PositionMatchedConfig(
            selection_method="position_matched_random", position_profile=[0.5] * 3 + [None] + [0.5] * 6, **base
        )
    with pytest.raises(ValueError, match="only read by selection_method='position_matched_random'"):
        PositionMatchedConfig(selection_method="random", position_profile=FRONT_LOADED, **base)
    with pytest.raises(ValueError, match="selection_positions='balanced'"):
        PositionMatchedConfig(
            selection_method="position_matched_random", position_profile=FRONT_LOADED, selection_positions="balanced",
            **base,
        )  # fmt: skip
    plain = SSTokenConfig(selection_method="position_matched_random", **base)  # the registry knows the name
    with pytest.raises(ValueError, match="needs the profile it copies"):
        METHODS["position_matched_random"](plain)


def test_the_trainer_trains_with_it_and_keeps_randoms_count(tmp_path, tokenizer, dataset, registered):
    def trainer(method, **extra):
        args = config(tmp_path / method, selection_method=method, selection_ratio=0.6, max_steps=2, **extra)
        return SSTokenTrainer(model=build_tiny_model(tokenizer), args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora_config())  # fmt: skip

    args = config(tmp_path / "pm", config_class=PositionMatchedConfig, selection_method="position_matched_random",
                  selection_ratio=0.6, max_steps=2, position_profile=FRONT_LOADED)  # fmt: skip
    matched = SSTokenTrainer(model=build_tiny_model(tokenizer), args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora_config())  # fmt: skip
    kept = record_selections(matched)
    matched.train()
    uniform = trainer("random")
    kept_random = record_selections(uniform)
    uniform.train()
    assert [int(k.sum()) for _, k in kept] == [int(k.sum()) for _, k in kept_random]
    assert "kept by response-position decile" in matched.method.describe()


# ----- the harness -----


def job(name, data="noisy", seed=0, **extra):
    return {"group": "main", "name": name, "data": data, "seed": seed,
            "overrides": methods.overrides_for(name, table=methods.REAL_METHODS, extra=extra or None)}  # fmt: skip


def finished(name, profile=FRONT_LOADED, status="ok", **where):
    run_ = {**job(name, **where), "status": status}
    if status == "ok":
        run_["result"] = {"selection": {"kept_fraction_by_position_decile": list(profile)}}
    else:
        run_["error"] = "RuntimeError: out of memory"
    return run_


def test_the_control_waits_for_its_sstoken_run_and_records_the_profile_it_copied():
    control, table = job(CONTROL), methods.REAL_METHODS
    assert position_matched.resolve(control, [], [job("sstoken")], table) == ("wait", None)
    assert position_matched.resolve(control, [], [job("sstoken", seed=1)], table)[0] == "fail"  # another seed
    state, ready = position_matched.resolve(control, [finished("sstoken"), finished("sstoken", seed=1)], [], table)
    assert state == "ready" and ready["position_profile"] == FRONT_LOADED
    assert ready["position_profile_from"] == {"name": "sstoken", "data": "noisy", "seed": 0, "resumed": False}
    assert ready["overrides"] == control["overrides"]  # the profile travels beside the overrides (the resume key)
    # a run with another shared setting (e.g. a longer budget's learning rate) is not its source
    other_lr = finished("sstoken", learning_rate=1e-4)
    assert position_matched.resolve(control, [other_lr], [], table)[0] == "fail"
    assert position_matched.resolve(job(CONTROL, learning_rate=1e-4), [other_lr], [], table)[0] == "ready"
    assert position_matched.resolve(job("random"), [], [], table) == ("ready", job("random"))


def test_the_control_fails_with_the_reason_when_its_source_failed_or_has_an_empty_decile():
    table = methods.REAL_METHODS
    state, reason = position_matched.resolve(job(CONTROL), [finished("sstoken", status="failed")], [], table)
    assert state == "fail" and "whose run failed: RuntimeError: out of memory" in reason
    state, reason = position_matched.resolve(job(CONTROL), [finished("sstoken", [0.5] * 9 + [None])], [], table)
    assert state == "fail" and "kept_fraction_by_position_decile of sstoken on the noisy data, seed 0[9]" in reason


def test_run_jobs_holds_the_control_until_its_source_finished(monkeypatch):
    """One worker, the control first in order: sstoken runs first, then the control with sstoken's profile; a control
    whose source failed is recorded as failed, not run."""
    ran = []

    def fake_run(job_):
        ran.append(job_)
        if job_["name"] == "sstoken" and job_["seed"] == 1:
            return {**job_, "status": "failed", "error": "ValueError: boom"}
        profile = [0.1 * (job_["seed"] + 1)] * NUM_DECILES
        return {**job_, "status": "ok", "result": {"selection": {"kept_fraction_by_position_decile": profile}}}

    monkeypatch.setattr(run, "_run_job", fake_run)
    monkeypatch.setattr(run, "_init_worker", lambda *args: None)
    jobs = [job(CONTROL), job("sstoken"), job(CONTROL, seed=1), job("sstoken", seed=1), job(CONTROL, seed=2)]
    for index, item in enumerate(jobs):
        item["index"] = index
    earlier = [{**finished("sstoken", [0.7] * NUM_DECILES, seed=2), "resumed": True}]
    done = run.run_jobs(jobs, 1, (), lambda *args: None, earlier, methods.REAL_METHODS)
    assert [(r["name"], r["seed"]) for r in ran] == [("sstoken", 0), (CONTROL, 0), ("sstoken", 1), (CONTROL, 2)]
    control = next(r for r in done if r["name"] == CONTROL and r["seed"] == 0)
    assert control["status"] == "ok" and control["position_profile"] == [0.1] * NUM_DECILES
    failed = next(r for r in done if r["name"] == CONTROL and r["seed"] == 1)
    assert failed["status"] == "failed" and "whose run failed: ValueError: boom" in failed["error"]
    resumed = next(r for r in done if r["name"] == CONTROL and r["seed"] == 2)
    assert resumed["position_profile"] == [0.7] * NUM_DECILES and resumed["position_profile_from"]["resumed"]
    assert len(done) == len(jobs)


def test_missing_sources_names_every_cell_without_its_sstoken_run():
    earlier = [finished("sstoken", seed=0)]
    missing = position_matched.missing_sources([CONTROL, "full"], ["noisy", "clean"], [0, 1], {}, earlier)
    assert missing == [f"{CONTROL} on noisy seed 1 (needs sstoken on noisy seed 1)",
                       f"{CONTROL} on clean seed 0 (needs sstoken on clean seed 0)",
                       f"{CONTROL} on clean seed 1 (needs sstoken on clean seed 1)"]  # fmt: skip
    assert position_matched.missing_sources([CONTROL, "sstoken"], ["noisy", "clean"], [0, 1], {}, []) == []
    assert position_matched.missing_sources([CONTROL, "sstoken"], ["noisy"], [0], {"noisy": [CONTROL]}, []) != []


def test_the_harness_refuses_the_control_without_its_sstoken_runs_before_loading_anything(
    smollm2_dir, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the refusal must come before the model is loaded")

    monkeypatch.setattr(run, "_real_base_model", no_loading)
    output = tmp_path / "quality.json"
    argv = ["--model", "smollm2", "--quick", "--workers", "1", "--output", str(output), "--no-docs",
            "--cache-dir", str(tmp_path / "cache"), "--datasets", "noisy", "--methods", "full", CONTROL]  # fmt: skip
    refusal = r"random\[position_matched\] on noisy seed 0 \(needs sstoken on noisy seed 0\)"
    with pytest.raises(SystemExit, match=refusal):
        run.main(argv)
    # with --resume, a finished sstoken run of the results file is a source
    output.write_text(json.dumps({"runs": [finished("sstoken")]}))
    monkeypatch.setattr(run, "_real_base_model", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # got past the refusal, to the model
        run.main([*argv, "--resume"])


def test_the_harness_runs_the_control_after_its_sstoken_run_and_records_the_profile(tmp_path):
    """The whole pipeline at the lab's tiny scale (seconds), two workers: the control is listed first but waits for
    sstoken's run, then copies its measured profile, keeping the same number of tokens per step."""
    output = tmp_path / "quality-tiny.json"
    run.main(["--quick", "--workers", "2", "--output", str(output), "--cache-dir", str(tmp_path / "cache"), "--no-docs",
              "--datasets", "noisy", "--ablations", "none", "--methods", CONTROL, "sstoken"])  # fmt: skip
    results = json.loads(output.read_text())
    assert results["status"] == "complete"
    runs = {r["name"]: r for r in results["runs"]}
    source, control = runs["sstoken"], runs[CONTROL]
    assert control["status"] == "ok" and control["overrides"]["selection_method"] == "position_matched_random"
    assert control["position_profile"] == source["result"]["selection"]["kept_fraction_by_position_decile"]
    assert control["position_profile_from"] == {"name": "sstoken", "data": "noisy", "seed": 0, "resumed": False}
    assert control["result"]["selected_fraction_mean"] == pytest.approx(source["result"]["selected_fraction_mean"])
    cell = results["summary"]["main"][CONTROL]["noisy"]
    assert cell["position_profile_target"] == pytest.approx(control["position_profile"])
    table = output.with_suffix(".md").read_text()
    assert table.index("| sstoken |") > table.index(f"| {CONTROL} |")  # by family: baselines before ssToken
