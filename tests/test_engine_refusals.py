"""The history modes each distributed engine refuses, and the messages (the fast tier's share of
tests/distributed/, which runs every engine for real)."""

from types import SimpleNamespace

import pytest

from trl_sstoken.engines import Engine, check_history, check_resume


def args(history="base", cache=None):
    return SimpleNamespace(history=history, history_cache_dir=cache)


@pytest.mark.parametrize("name", ["none", "ddp", "fsdp2", "zero2"])
@pytest.mark.parametrize("history", ["base", "lagged", "ema"])
def test_engines_that_keep_every_history_correct_accept_it(name, history):
    check_history(Engine(name), args(history))
    check_history(Engine(name), args("base", cache="/tmp/cache"))


@pytest.mark.parametrize(
    "engine,settings,named,alternative",
    [
        (Engine("fsdp1"), args("lagged"), "under FSDP1", "Use FSDP2"),
        (Engine("fsdp1"), args("ema"), "under FSDP1", "Use FSDP2"),
        (Engine("zero3"), args("lagged"), "under DeepSpeed ZeRO-3", "Use DeepSpeed ZeRO-2 or FSDP2"),
        (Engine("zero3"), args("ema"), "under DeepSpeed ZeRO-3", "Use DeepSpeed ZeRO-2 or FSDP2"),
        (
            Engine("zero3"),
            args("base", cache="c"),
            "history_cache_dir under DeepSpeed ZeRO-3",
            "Unset history_cache_dir",
        ),
        (
            Engine("fsdp2", True),
            args("lagged"),
            "FSDP2 with fsdp_state_dict_type SHARDED_STATE_DICT",
            "FULL_STATE_DICT",
        ),
    ],
)
def test_a_history_an_engine_would_get_wrong_is_refused_naming_it_and_the_alternative(
    engine, settings, named, alternative
):
    with pytest.raises(ValueError, match="not supported") as refusal:
        check_history(engine, settings)
    assert named in str(refusal.value) and alternative in str(refusal.value)


def test_resuming_a_peft_adapter_from_an_fsdp1_sharded_checkpoint_is_refused():
    peft_model = SimpleNamespace(peft_config={"default": None})
    with pytest.raises(ValueError, match="FSDP1 with fsdp_state_dict_type SHARDED_STATE_DICT"):
        check_resume(Engine("fsdp1", sharded_state_dict=True), peft_model)
    check_resume(Engine("fsdp1", sharded_state_dict=False), peft_model)
    check_resume(Engine("fsdp2", sharded_state_dict=True), peft_model)
