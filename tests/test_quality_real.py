"""The real-model mode of the quality benchmark (issue 13): data, labels, scoring, and the pipeline at a tiny scale."""

import json
import random

import pytest
from benchmarks.quality import real_data, real_evaluate, tasks
from benchmarks.quality.noise import KINDS


pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def instances():
    return tasks.generate(random.Random(0), 25)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_prompts_state_the_task_and_answers_match_ground_truth(instances):
    for instance in instances:
        prompt = real_data.prompt_text(instance)
        answer = real_data.answer_text(instance)
        truth = tasks.ground_truth(instance.family, instance.prompt)
        assert answer == ", ".join(truth[1:] if instance.family == "lookup" else truth)
        assert real_data.clean_response(instance).text == f"Answer: {answer}"
        if instance.family == "add":
            assert prompt.startswith("What is ") and prompt.endswith("?")


def test_every_response_token_carries_the_kind_of_its_text(instances, smollm2_tokenizer):
    """Decoding the tokens of each kind gives back exactly the text of that kind's segments."""
    rng = random.Random(1)
    seen = set()
    for instance in instances:
        response = real_data.noisy_response(instance, rng)
        row = real_data.tokenize_example(smollm2_tokenizer, "smollm2", real_data.prompt_text(instance), response)
        assert len(row["kinds"]) == len(row["input_ids"]) == len(row["labels"])
        for kind_index, kind in enumerate(KINDS):
            if kind == "format":
                continue
            tokens = [t for t, k in zip(row["input_ids"], row["kinds"], strict=False) if k == kind_index]
            expected = "".join(text for k, text in response.segments if k == kind)
            assert "".join(smollm2_tokenizer.decode(tokens).split()) == "".join(expected.split())
            if tokens:
                seen.add(kind)
        prompt_len = row["kinds"].index(next(k for k in row["kinds"] if k >= 0))
        assert all(label == -100 for label in row["labels"][:prompt_len])
        assert row["labels"][-1] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {"answer", "corrupt", "boilerplate", "random"} <= seen


def test_exact_and_strict_match(instances):
    instance = next(i for i in instances if i.family == "reverse")
    answer = real_data.answer_text(instance)
    assert real_evaluate.score_generation(f"Answer: {answer}", instance) == {"exact_match": True, "strict_match": True}
    noisy = f"Sure! Here is what you asked for. Answer: {answer}. Ref: K01 Q22"
    assert real_evaluate.score_generation(noisy, instance) == {"exact_match": True, "strict_match": False}
    assert not real_evaluate.score_generation(f"Answer: {answer}, cat", instance)["exact_match"]
    assert not real_evaluate.score_generation(answer, instance)["exact_match"]  # no "Answer:"


def test_greedy_generation_gives_the_head_a_contiguous_input_and_the_same_text(
    smollm2_dir, smollm2_tokenizer, instances, monkeypatch
):
    """A strided head input is 200x slower in bf16 on CPU (and ran gemma out of memory); the text must not change."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    prompts = [real_data.prompt_ids(smollm2_tokenizer, "smollm2", real_data.prompt_text(i)) for i in instances[:3]]
    head_inputs = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: head_inputs.append(args[0]))
    texts = real_evaluate.greedy_generate(model, smollm2_tokenizer, "smollm2", prompts, max_new_tokens=4)
    assert head_inputs and all(x.is_contiguous() for x in head_inputs)

    head_inputs.clear()
    monkeypatch.setattr(real_evaluate, "contiguous_head_input", lambda model: contextlib.nullcontext())
    unpatched = real_evaluate.greedy_generate(model, smollm2_tokenizer, "smollm2", prompts, max_new_tokens=4)
    assert not head_inputs[0].is_contiguous()  # without it, generate's prefill slice reaches the head strided
    assert texts == unpatched


def test_pipeline_tiny_scale_smollm2(smollm2_dir, tmp_path):
    """Takes `smollm2_dir` although the harness finds the model itself: the fixture is what honours
    TRL_SSTOKEN_SKIP_REAL_MODELS (before, this test fetched SmolLM2 regardless)."""
    from benchmarks.quality.run import main
    from test_quality_benchmark import assert_match_rates

    output = tmp_path / "quality-real-tiny.json"
    main(["--model", "smollm2", "--quick", "--workers", "1", "--output", str(output), "--cache-dir",
          str(tmp_path / "cache"), "--no-docs", "--methods", "sstoken[sink_free]", "--datasets", "noisy"])  # fmt: skip
    results = json.loads(output.read_text())
    assert results["status"] == "complete" and results["model"] == "smollm2"
    assert results["data"]["eval_prompts_in_train"] == 0
    assert "response_token_fraction_by_kind" in results["data"]["noisy_realised"]
    (run,) = [r for r in results["runs"] if r["group"] == "main"]
    assert run["status"] == "ok" and run["overrides"]["attention_score"] == "sink_free"
    result = run["result"]
    assert result["selection"]["unmatched_rows"] == 0
    assert_match_rates(result)
    assert result["answer_nll"] > 0
    assert len(result["selection"]["kept_fraction_by_position_decile"]) == 10
    assert 0 < result["attention"]["sink_share_of_context_mass"] < 1
    cell = results["summary"]["main"]["sstoken[sink_free]"]["noisy"]
    assert cell["answer_nll"]["n"] == 1 and len(cell["kept_fraction_by_position_decile"]) == 10
    assert (tmp_path / "quality-real-tiny.md").read_text().count("sstoken[sink_free]") >= 2


# ----- every real scale's data can be drawn -----


@pytest.mark.parametrize("tasks", ["short", "long"])
@pytest.mark.parametrize("scale_name", ["real-tiny", "real-cpu", "real-cpu-100", "real-cpu-300", "real-cpu-75",
                                        "real-gpu"])  # fmt: skip
def test_every_real_scales_splits_can_be_drawn(scale_name, tasks):
    """The instance draw of each real scale and task set (no model): `add` has only 900 distinct prompts (operands
    0-29), so a scale asking for more per family could never build its data."""
    from benchmarks.quality import long_tasks
    from benchmarks.quality.scales import SCALES, task_sets

    if tasks not in task_sets(scale_name):
        pytest.skip(f"{scale_name} is not for --tasks {tasks}")
    scale = long_tasks.scale_for(SCALES[scale_name]) if tasks == "long" else SCALES[scale_name]
    splits = real_data.build_splits(scale["data_seed"], scale["train_per_family"], scale["eval_per_family"],
                                    scale["reference_per_family"], tasks=tasks)  # fmt: skip
    families = len(long_tasks.FAMILIES if tasks == "long" else real_data.data.GENERATORS)
    assert len(splits.train) == families * scale["train_per_family"]
    assert len(splits.eval) == families * scale["eval_per_family"]
    assert not {i.prompt for i in splits.train} & {i.prompt for i in splits.eval}


@pytest.mark.parametrize("tasks, fingerprint", [("short", "7d2eb66990537f32"), ("long", "f9c055573a2ef000")])
def test_the_real_cpu_data_is_unchanged(tasks, fingerprint):
    """The committed real-cpu results (and real-cpu-100/300, the same sizes) were made on exactly this data: the
    eval and training prompts, the noisy responses and the reference subset (fingerprint taken before the real-gpu
    sizes were fixed)."""
    import hashlib

    from benchmarks.quality import long_tasks
    from benchmarks.quality.scales import SCALES

    scale = long_tasks.scale_for(SCALES["real-cpu"]) if tasks == "long" else SCALES["real-cpu"]
    splits = real_data.build_splits(scale["data_seed"], scale["train_per_family"], scale["eval_per_family"],
                                    scale["reference_per_family"], tasks=tasks)  # fmt: skip
    text = json.dumps([[i.prompt for i in splits.eval], [i.prompt for i in splits.train],
                       [r.segments for r in splits.train_noisy], [i.prompt for i in splits.reference]])  # fmt: skip
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == fingerprint
