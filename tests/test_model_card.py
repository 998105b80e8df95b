"""model_card.py: the card names the base model and the dataset, links only hub ids, and never says "None"."""

import html as htmllib
import re

import pytest
from conftest import config

from trl_sstoken.config import sstoken_fields
from trl_sstoken.saving.model_card import is_hub_id, model_card_section


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


# ----- escaping: nothing from a name or a setting becomes markup, a link or a broken table -----

HOSTILE_NAMES = [
    "<script>alert(1)</script>",
    "x](javascript:alert(1))",
    "javascript:alert(1)",
    "<img src=x onerror=alert(1)>",
    "a|b`c``d",
    "Qwen/Qwen2.5-0.5B\n\n<script>alert(2)</script>",
    "owner/name) [click](javascript:alert(3)",
]


def rendered(markdown_text):
    """The HTML of `markdown_text` by two renderers: python-markdown (tables) and markdown-it (CommonMark + GFM
    tables), both with raw HTML allowed, as a hub page renders a card before sanitising it."""
    import markdown
    from markdown_it import MarkdownIt

    return [
        markdown.markdown(markdown_text, extensions=["tables"]),
        MarkdownIt("commonmark").enable("table").render(markdown_text),
    ]


def front_matter_and_body(card):
    import yaml

    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def assert_inert(html):
    lowered = html.lower()
    assert "<script" not in lowered and "<img" not in lowered
    assert "javascript:" not in "".join(re.findall(r'href="([^"]*)"', lowered))


def test_what_counts_as_a_hub_id_is_strict(tmp_path):
    for name in ("Qwen/Qwen2.5-0.5B", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "trl-lib/Capybara", "a_b/c.d"):
        assert is_hub_id(name), name
    for name in [
        *HOSTILE_NAMES,
        "a b",
        "org/na me",
        "a--b",
        "a..b/c",
        "a/b.git",
        "-a/b",
        "a/b-",
        "ö/x",
        "a/" + "b" * 97,
    ]:
        assert not is_hub_id(name), name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_base_model_or_dataset_name_is_shown_as_text(make_trainer, name):
    trainer = make_trainer()
    trainer.model.config._name_or_path = name
    card = card_of(trainer, model_name=name, dataset_name=name)
    front, body = front_matter_and_body(card)
    assert "base_model" not in front and "datasets" not in front  # no hub metadata for a name that is no hub id
    assert "<script" not in card.lower() and "<img" not in card.lower()  # not even in the markdown source
    for html in rendered(body):
        assert_inert(html)
        assert "huggingface.co/" + name.split("\n")[0] not in html
        title = re.search(r"<h1>(.*?)</h1>", html).group(1)
        assert htmllib.unescape(title) == "Model Card for " + name.replace("\n", "\\n")
        sentence = re.search(r"This model is a fine-tuned version of (.*?)\.\n", html, re.S).group(1)
        shown = htmllib.unescape(re.sub(r"<[^>]+>", "", sentence))
        assert shown.count(name.replace("\n", "\\n")) == 2  # the model and the dataset, each as written


def test_backticks_and_pipes_in_a_setting_keep_the_table(tmp_path):
    value = str(tmp_path / "a|b`c``d|<script>x</script>")
    args = config(tmp_path, history_cache_dir=value, history="base")
    section = model_card_section(args)
    assert "<script" not in section
    fields = [field.name for field in sstoken_fields()]
    for html in rendered(section):
        rows = re.findall(r"<tr>(.*?)</tr>", html, re.S)[1:]  # after the header
        cells = [
            [htmllib.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", r, re.S)] for r in rows
        ]
        assert [row[0] for row in cells] == fields and all(len(row) == 2 for row in cells)
        assert dict(cells)["history_cache_dir"] == repr(value)
        assert_inert(html)


def test_a_hostile_reference_name_in_the_methods_sentence_is_text(tmp_path):
    name = "ref`x|<script>alert(1)</script>"
    prose = _section(tmp_path, "rho1", reference_model=name)
    assert "<script" not in prose
    for html in rendered(prose):
        assert_inert(html)
        assert f"the reference model {name}" in htmllib.unescape(re.sub(r"<[^>]+>", "", html))
