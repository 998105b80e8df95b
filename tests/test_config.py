import dataclasses

import pytest
from trl import SFTConfig

from trl_sstoken import SSTokenConfig, SSTokenTrainer
from trl_sstoken.config import HISTORY_MODES, LOSS_NORMALIZATIONS, SELECTION_METHODS


SSTOKEN_FIELDS = [
    "selection_method",
    "selection_ratio",
    "selection_gamma",
    "attention_layer",
    "attention_warmup_ratio",
    "attention_chunk_size",
    "selection_loss_normalization",
    "history",
    "history_update_steps",
    "history_ema_alpha",
]


def make(tmp_path, **overrides):
    return SSTokenConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **overrides)


@pytest.mark.smoke
def test_defaults(tmp_path):
    config = make(tmp_path)
    assert isinstance(config, SFTConfig)
    assert (config.selection_method, config.selection_ratio, config.selection_gamma) == ("sstoken", 0.6, 0.5)
    assert (config.history, config.attention_layer, config.attention_warmup_ratio) == ("base", -1, 0.2)
    assert config.selection_loss_normalization == "selected"


def test_every_field_is_documented():
    fields = {field.name: field for field in dataclasses.fields(SSTokenConfig)}
    for name in SSTOKEN_FIELDS:
        assert len(fields[name].metadata.get("help", "")) > 20, name
        assert f"{name} (" in SSTokenConfig.__doc__, name


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("selection_method", "rho", "'sstoken'"),
        ("selection_method", "SSTOKEN", "'rel'"),
        ("history", "reference", "'lagged'"),
        ("selection_loss_normalization", "mean", "'sequence'"),
        ("selection_ratio", 0.0, r"\(0, 1\]"),
        ("selection_ratio", 1.5, r"\(0, 1\]"),
        ("selection_ratio", -0.2, r"\(0, 1\]"),
        ("selection_ratio", float("nan"), r"\(0, 1\]"),
        ("selection_ratio", "0.6", "number"),
        ("selection_gamma", -0.1, r"\[0, 1\]"),
        ("selection_gamma", 1.01, r"\[0, 1\]"),
        ("attention_warmup_ratio", 1.2, r"\[0, 1\]"),
        ("history_ema_alpha", 1.0, r"\[0, 1\)"),
        ("history_ema_alpha", -0.5, r"\[0, 1\)"),
        ("history_update_steps", 0, ">= 1"),
        ("history_update_steps", 2.5, "integer"),
        ("history_update_steps", True, "integer"),
        ("attention_chunk_size", 0, ">= 1"),
        ("attention_layer", 1.0, "integer"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, field, value, allowed):
    with pytest.raises(ValueError, match=field) as error:
        make(tmp_path, **{field: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)
    assert pytest.importorskip("re").search(allowed, str(error.value))


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("history", HISTORY_MODES)
@pytest.mark.parametrize("normalization", LOSS_NORMALIZATIONS)
def test_every_allowed_combination_is_accepted(tmp_path, method, history, normalization):
    if method == "profit" and normalization == "selected":
        pytest.skip("refused on purpose: see test_profit_needs_a_window_independent_normalization")
    extra = {"reference_adapter": str(tmp_path)} if method == "rho1" else {}
    config = make(
        tmp_path, selection_method=method, history=history, selection_loss_normalization=normalization, **extra
    )
    assert config.selection_method == method


def test_rho1_needs_exactly_one_reference(tmp_path):
    with pytest.raises(ValueError, match="reference_model.*reference_adapter"):
        make(tmp_path, selection_method="rho1")
    with pytest.raises(ValueError, match="exactly one reference"):
        make(tmp_path, selection_method="rho1", reference_model="a", reference_adapter="b")


def test_profit_needs_a_window_independent_normalization(tmp_path):
    with pytest.raises(ValueError, match="selection_loss_normalization='all'"):
        make(tmp_path, selection_method="profit")
    assert make(tmp_path, selection_method="profit", selection_loss_normalization="all").profit_threshold == 0.1
    with pytest.raises(ValueError, match="profit_threshold"):
        make(tmp_path, selection_method="profit", selection_loss_normalization="all", profit_threshold=1.0)


def test_effective_gamma(tmp_path):
    assert make(tmp_path, selection_method="rel", selection_gamma=0.3).effective_gamma == 1.0
    assert make(tmp_path, selection_method="attention", selection_gamma=0.3).effective_gamma == 0.0
    assert make(tmp_path, selection_gamma=0.3).effective_gamma == 0.3


@pytest.mark.parametrize("method", ["sstoken", "full", "dft"])
def test_trl_loss_types_other_than_nll_are_refused(tmp_path, method):
    with pytest.raises(ValueError, match="loss_type='dft' is not supported.*selection_method='dft'"):
        make(tmp_path, loss_type="dft", selection_method=method)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_length", -5, ">= 1"),  # was accepted: every sequence silently cut by 5 tokens from its end
        ("max_length", 0, ">= 1"),
        ("max_length", 64.0, "integer"),
        ("gradient_accumulation_steps", 0, ">= 1"),  # was a ZeroDivisionError when training started
        ("gradient_accumulation_steps", 1.5, "integer"),
        ("per_device_train_batch_size", 0, ">= 1"),
        ("per_device_eval_batch_size", -1, ">= 1"),
        ("seed", 1.5, "integer"),  # was a raw numpy TypeError naming no field
        ("seed", -1, r"\[0, 4294967295\]"),  # was numpy's "Seed must be between 0 and 2**32 - 1"
        ("seed", 2**32, r"\[0, 4294967295\]"),
        ("data_seed", 0.5, "integer"),
    ],
)
def test_training_fields_tried_only_after_loading_are_checked_at_construction(tmp_path, field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{field}(=| must)") as error:
        make(tmp_path, **{field: value})
    assert repr(value) in str(error.value)
    assert pytest.importorskip("re").search(allowed, str(error.value))


def test_the_edges_of_the_training_field_ranges_are_accepted(tmp_path):
    config = make(tmp_path, max_length=None, seed=0, data_seed=2**32 - 1, gradient_accumulation_steps=1)
    assert (config.max_length, config.seed, config.data_seed) == (None, 0, 2**32 - 1)
    assert make(tmp_path, max_length=1, per_device_train_batch_size=1).max_length == 1


@pytest.mark.smoke
def test_plain_sft_config_is_converted(tmp_path, tokenizer, dataset):
    from trl_sstoken.tiny import build_tiny_model

    sft_args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_steps=1)
    trainer = SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=pytest.importorskip("peft").LoraConfig(r=2, target_modules="all-linear"),
    )
    assert isinstance(trainer.args, SSTokenConfig)
    assert trainer.args.max_steps == 1 and trainer.args.selection_method == "sstoken"


def test_compute_loss_func_is_refused(tmp_path, tokenizer, dataset):
    from trl_sstoken.tiny import build_tiny_model

    with pytest.raises(ValueError, match="compute_loss_func"):
        SSTokenTrainer(
            model=build_tiny_model(tokenizer),
            args=make(tmp_path, selection_method="random"),
            train_dataset=dataset,
            processing_class=tokenizer,
            compute_loss_func=lambda *a, **k: 0,
        )


def test_label_smoothing_is_refused(tmp_path, tokenizer, dataset):
    from trl_sstoken.tiny import build_tiny_model

    for method in ("sstoken", "full"):
        with pytest.raises(ValueError, match="label_smoothing_factor"):
            SSTokenTrainer(
                model=build_tiny_model(tokenizer),
                args=make(tmp_path, selection_method=method, label_smoothing_factor=0.1),
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=pytest.importorskip("peft").LoraConfig(r=2, target_modules="all-linear"),
            )


def test_every_field_says_its_help_group_and_resume_rule():
    """Issue 24: each fact about a field in one place, its metadata. A field added without `help`, `group` or
    `resume` fails here (the checkpoint settings and the docs groups are derived from them)."""
    from trl_sstoken import config as config_module

    headings = [value for name, value in vars(config_module).items() if name.startswith("GROUP_")]
    for field in config_module.sstoken_fields():
        metadata = field.metadata
        assert isinstance(metadata.get("help"), str) and metadata["help"].strip(), f"{field.name}: no help"
        assert metadata.get("group") in headings, (
            f"{field.name}: group {metadata.get('group')!r} is none of {headings}"
        )
        assert metadata.get("resume") in config_module.RESUME_RULES, (
            f"{field.name}: resume {metadata.get('resume')!r} is none of {config_module.RESUME_RULES}"
        )
    inherited = {field.name for field in dataclasses.fields(SFTConfig)}
    assert set(config_module.SFT_RESUME_MUST_MATCH) <= inherited  # each a real SFTConfig field, with its reason
    assert all(reason.strip() for reason in config_module.SFT_RESUME_MUST_MATCH.values())


def test_a_trl_parser_still_parses_the_config_with_its_metadata():
    """`group` and `resume` are not argparse keywords: `HfArgumentParser` (TrlParser, a `trl sft`-style script)
    passes the metadata it iterates to `add_argument`, so they are readable by key but not iterated."""
    from trl import TrlParser

    from trl_sstoken.config import sstoken_fields

    field = next(field for field in sstoken_fields() if field.name == "attention_score")
    assert field.metadata["resume"] == "must_match" and "group" in field.metadata
    assert set(field.metadata) == {"help", "choices"}
    (args,) = TrlParser((SSTokenConfig,)).parse_args_into_dataclasses(
        ["--output_dir", "out", "--attention_score", "sink_free", "--use_cpu", "true", "--bf16", "false"]
    )
    assert args.attention_score == "sink_free"


def test_the_docs_groups_are_read_off_the_metadata():
    from trl_sstoken import config as config_module

    assert config_module.FIELD_GROUPS == {
        heading: tuple(field.name for field in fields) for heading, fields in config_module.field_groups().items()
    }
    for heading, names in config_module.FIELD_GROUPS.items():
        fields = {field.name: field for field in config_module.sstoken_fields()}
        assert {fields[name].metadata["group"] for name in names} == {heading}


def test_the_docstring_documents_every_field_under_its_group():
    """The `Parameters:` docstring (TRL's layout) and the field declarations follow `FIELD_GROUPS`, in order."""
    from trl_sstoken.config import FIELD_GROUPS, sstoken_fields

    doc = SSTokenConfig.__doc__
    position = doc.index("Parameters:")
    grouped = [name for names in FIELD_GROUPS.values() for name in names]
    assert grouped == [field.name for field in sstoken_fields()]  # declared in group order, each field once
    for heading, names in FIELD_GROUPS.items():
        position = doc.index(f"> {heading}\n", position)
        for name in names:
            position = doc.index(f"\n        {name} (`", position)
