"""model_card.py: the card names the base model and the dataset, links only hub ids, and never says "None"."""

from trl_sstoken.saving.model_card import is_hub_id


def card_of(trainer, **kwargs):
    trainer.create_model_card(**kwargs)
    with open(f"{trainer.args.output_dir}/README.md", encoding="utf-8") as file:
        return file.read()


def test_a_hub_base_model_and_dataset_are_linked(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.model.config._name_or_path = "Qwen/Qwen2.5-0.5B"
    card = card_of(trainer, dataset_name="trl-lib/Capybara")
    assert "# Model Card for out\n" in card  # the output folder's name when no model_name is given
    assert (
        "fine-tuned version of [Qwen/Qwen2.5-0.5B](https://huggingface.co/Qwen/Qwen2.5-0.5B) on the "
        "[trl-lib/Capybara](https://huggingface.co/datasets/trl-lib/Capybara) dataset." in card
    )
    assert "base_model: Qwen/Qwen2.5-0.5B" in card and "datasets: trl-lib/Capybara" in card
    assert "None" not in card


def test_a_local_base_model_and_dataset_get_no_hub_link(make_trainer, tiny_model_dir, jsonl_file):
    trainer = make_trainer()
    trainer.model.config._name_or_path = str(tiny_model_dir)
    card = card_of(trainer, model_name="my-run", dataset_name=str(jsonl_file))
    assert "# Model Card for my-run\n" in card
    assert f"fine-tuned version of `{tiny_model_dir}` (a local folder) on the local dataset `{jsonl_file}`." in card
    assert f"huggingface.co/{tiny_model_dir}" not in card and "huggingface.co/datasets/" not in card
    assert "base_model:" not in card and "None" not in card
    assert f'model="{trainer.args.output_dir}"' in card


def test_a_model_built_in_memory_without_arguments(make_trainer):
    trainer = make_trainer()
    trainer.model.config._name_or_path = ""
    card = card_of(trainer)
    assert "fine-tuned version of a model built in memory (it has no hub id or path)." in card
    assert "None" not in card and "huggingface.co/None" not in card


def test_what_counts_as_a_hub_id(tmp_path):
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("gpt2")
    assert not any(is_hub_id(name) for name in (None, "", str(tmp_path), "./model", "a/b/c", "data/train.jsonl"))


def _section(tmp_path, method, **fields):
    from trl_sstoken import SSTokenConfig
    from trl_sstoken.saving.model_card import model_card_section

    config = SSTokenConfig(
        output_dir=str(tmp_path), selection_method=method, report_to="none", use_cpu=True, bf16=False, **fields
    )
    return model_card_section(config).split("| Setting |")[0]  # the prose, without the settings table


def test_the_card_states_what_each_method_ranked_by(tmp_path):
    """The card's sentence comes from the method: sstoken's formula only for sstoken, with the run's numbers."""
    cases = {
        ("sstoken", ()): ["top 0.6 of every response's tokens", "`0.5 * minmax(REL) + 0.5 * attention`", "'base'"],
        ("sstoken", (("selection_gamma", 0.7), ("attention_score", "position_corrected"))): [
            "`0.7 * minmax(REL) + 0.3 * attention`",
            "attention_score='position_corrected'",
        ],
        ("rel", (("history", "ema"),)): ["ranked by REL alone", "history='ema'"],
        ("attention", ()): ["ranked by attention to the prompt", "alone"],
        ("random", (("selection_ratio", 0.3),)): ["uniform random 0.3 of every response's tokens"],
        ("full", ()): ["every response token (plain SFT"],
        ("rho1", (("reference_model", "gpt2"),)): ["excess loss", "reference model `gpt2`", "micro-batch"],
        ("profit", (("profit_threshold", 0.4), ("selection_loss_normalization", "all"))): [
            "current probability is at least 0.4"
        ],
        ("dft", ()): ["every response token", "weighted by its detached probability"],
    }
    for (method, fields), expected in cases.items():
        text = _section(tmp_path, method, **dict(fields))
        assert f"selection_method='{method}'" in text
        for phrase in expected:
            assert phrase in text, (method, phrase, text)
        assert ("minmax(REL)" in text) == (method == "sstoken"), (method, text)
        assert ("REL" in text) == (method in ("sstoken", "rel")), (method, text)
