"""The selection methods (methods.py): the registry every part reads, and what each method declares."""

import pytest
import torch

from trl_sstoken.config import SELECTION_METHODS, SSTokenConfig
from trl_sstoken.selection import methods as methods_module
from trl_sstoken.selection.methods import METHODS, Signals
from trl_sstoken.selection.regions import regions_from_batch


def test_the_registry_is_what_config_and_cli_offer():
    shipped = tuple(name for name, method in METHODS.items() if method.__module__ == methods_module.__name__)
    assert SELECTION_METHODS == shipped and {"sstoken", "rel", "attention", "random", "full"} <= set(shipped)
    assert tuple(METHODS)[: len(SELECTION_METHODS)] == SELECTION_METHODS  # the shipped ones first; more may register
    assert [name for name in SELECTION_METHODS if METHODS[name].needs_history] == ["sstoken", "rel"]
    help_text = SSTokenConfig.__dataclass_fields__["selection_method"].metadata["help"]
    for name, method in METHODS.items():
        assert method.name == name and f"'{name}'" in help_text and method.description in help_text


def padded_batch(generator, rows=3, length=12):
    """A padded batch with a prompt, a response and right padding per row (lengths drawn from `generator`)."""
    labels = torch.full((rows, length), -100)
    mask = torch.zeros((rows, length), dtype=torch.long)
    for row in range(rows):
        used = int(torch.randint(4, length + 1, (), generator=generator))
        prompt = int(torch.randint(1, used - 1, (), generator=generator))
        mask[row, :used] = 1
        labels[row, prompt:used] = 7
    return {"labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.kept_count_known])
@pytest.mark.parametrize("seed", range(4))
def test_kept_count_known_before_the_forward_is_what_select_keeps(tmp_path, name, seed):
    generator = torch.Generator().manual_seed(seed)
    extra = {"reference_adapter": str(tmp_path)} if METHODS[name].needs_reference else {}
    args = SSTokenConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", selection_method=name, **extra)
    method = METHODS[name](args)
    regions = regions_from_batch(padded_batch(generator))
    shape = regions.response.shape
    signals = Signals(
        current_logps=-torch.rand(shape, generator=generator),
        rel=torch.randn(shape, generator=generator),
        attention=torch.rand(shape, generator=generator),
        excess_loss=torch.randn(shape, generator=generator),
        generator=torch.Generator().manual_seed(seed),
    )
    plan = method.plan(regions, in_warmup=False, attention_available=True)
    keep, score = method.select(signals, regions, plan)
    assert keep.shape == shape and not (keep & ~regions.response).any()
    assert int(keep.sum()) == int(method.kept_count(regions))
    assert (score is None) == (name not in ("sstoken", "rel", "attention"))
    weights = method.token_weights(signals.current_logps, keep)
    assert not weights[~keep].any()


def test_regions_cache_their_derived_fields():
    regions = regions_from_batch(padded_batch(torch.Generator().manual_seed(0)))
    assert regions.num_response is regions.num_response and regions.has_context is regions.has_context
    assert regions.sequence_response is regions.sequence_response


def test_a_step_computes_rel_once_and_reads_each_batch_regions_once(make_trainer, monkeypatch):
    import trl_sstoken.trainer as trainer_module

    trainer = make_trainer(selection_method="sstoken", attention_warmup_ratio=0.0, max_steps=2)

    def counted(module, name):
        calls, original = [], getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
        return calls

    rel_calls = counted(trainer_module, "retrospective_excess_loss")
    region_calls = counted(trainer_module, "regions_from_batch")
    combine_calls = counted(methods_module, "combine_scores")
    trainer.train()
    assert len(rel_calls) == len(region_calls) == len(combine_calls) == 2  # two micro-batches
