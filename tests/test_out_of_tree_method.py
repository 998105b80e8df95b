"""A selection method registered from outside the package (here, this test module) is a method like any other: the
config accepts it, the trainer trains with it, a checkpoint resumes it, and the report and the model card show it."""

import pytest
import torch
from conftest import record_selections

from trl_sstoken import SSTokenConfig
from trl_sstoken.cli.train import make_parser
from trl_sstoken.report.collect import collect_examples, report_settings, write_report
from trl_sstoken.selection.methods import METHODS, SelectionMethod, register
from trl_sstoken.selection.scoring import num_to_keep, top_k_per_batch


class Hardest(SelectionMethod):
    """The response tokens the current model finds least likely, over the whole micro-batch."""

    name = "test_hardest"
    description = "the least likely response tokens under the current model (a test's method)"

    def kept_count(self, regions):
        return num_to_keep(regions.sequence_response.reshape(1, -1), self.ratio).sum()

    def select(self, signals, regions, plan):
        nll = -signals.current_logps.float()
        return top_k_per_batch(nll, regions.response, self.ratio), nll.masked_fill(~regions.response, 0.0)

    def describe(self):
        return f"the {self.ratio:g} least likely response tokens of each micro-batch (the test's method)"


@pytest.fixture
def hardest():
    register(Hardest)
    yield Hardest
    METHODS.pop(Hardest.name)


def test_an_out_of_tree_method_trains_resumes_and_is_reported(hardest, make_trainer, tmp_path):
    settings = dict(selection_method="test_hardest", selection_ratio=0.5, max_steps=4, save_strategy="steps")
    settings.update(save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    uninterrupted = make_trainer(output_dir=str(tmp_path / "a"), **settings)
    assert isinstance(uninterrupted.method, Hardest)
    expected = record_selections(uninterrupted)
    uninterrupted.train()
    assert [step for step, _ in expected] == [0, 0, 1, 1, 2, 2, 3, 3]
    for _, keep in expected:  # half of each micro-batch's response tokens, rounded up
        assert 0 < int(keep.sum())

    resumed = make_trainer(output_dir=str(tmp_path / "b"), **settings)
    got = record_selections(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    after = [(step, keep) for step, keep in expected if step >= 2]
    assert [step for step, _ in got] == [step for step, _ in after]
    for (_, keep), (_, expected_keep) in zip(got, after, strict=True):
        assert torch.equal(keep, expected_keep)
    for (name, param), (_, expected_param) in zip(
        resumed.model.named_parameters(), uninterrupted.model.named_parameters(), strict=True
    ):
        assert torch.equal(param, expected_param), name

    examples = collect_examples(resumed, 4, batch_size=2, progress=False)
    assert any(token.score is not None for example in examples for token in example.tokens)
    settings_shown = report_settings(resumed)
    assert settings_shown["selection_method"] == "test_hardest" and settings_shown["history"] == "(not used)"
    write_report(str(tmp_path / "report.html"), examples, settings_shown)
    assert "test_hardest" in (tmp_path / "report.html").read_text()

    resumed.create_model_card()
    card = (tmp_path / "b" / "README.md").read_text()
    assert "`selection_method='test_hardest'`" in card
    assert "the 0.5 least likely response tokens of each micro-batch" in card and "minmax(REL)" not in card


def test_the_config_and_the_command_line_read_the_live_registry(hardest, tmp_path):
    config = SSTokenConfig(output_dir=str(tmp_path), selection_method="test_hardest", use_cpu=True, report_to="none")
    assert config.selection_method == "test_hardest"
    parsed = make_parser().parse_args_into_dataclasses(
        ["--selection_method", "test_hardest", "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    )
    assert any(getattr(part, "selection_method", None) == "test_hardest" for part in parsed)


def test_an_unregistered_method_is_refused_with_the_live_choices(hardest, tmp_path):
    with pytest.raises(ValueError, match="'test_hardest'") as error:
        SSTokenConfig(output_dir=str(tmp_path), selection_method="nope", use_cpu=True, report_to="none")
    assert "selection_method='nope'" in str(error.value)


def test_registration_checks_the_class():
    no_name = type("NoName", (SelectionMethod,), {"description": "x", "select": Hardest.select})
    with pytest.raises(ValueError, match="own class attribute `name`"):
        register(no_name)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Clash", (Hardest,), {"name": "sstoken"}))
    with pytest.raises(ValueError, match="must define select"):
        register(type("NoSelect", (SelectionMethod,), {"name": "test_noselect", "description": "x"}))
    with pytest.raises(ValueError, match="description"):
        register(type("NoDescription", (SelectionMethod,), {"name": "test_nodesc", "select": Hardest.select}))
    with pytest.raises(ValueError, match="needs_history must be True or False"):
        register(type("BadFlag", (Hardest,), {"name": "test_badflag", "needs_history": "yes"}))
    with pytest.raises(TypeError, match="SelectionMethod subclass"):
        register(Hardest.select)
    assert not {"test_noselect", "test_nodesc", "test_badflag"} & set(METHODS)
