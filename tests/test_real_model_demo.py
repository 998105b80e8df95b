"""`trl-sstoken demo --model_name_or_path` on the real SmolLM2-135M-Instruct, and the screenshot of its selection
report in a real browser (the picture of docs/selection-report.md comes from the same code: tools/report_screenshot.py)."""

import json
from types import SimpleNamespace

import pytest
from conftest import chromium_or_skip
from test_cli import page_selection
from tools.report_screenshot import DEMO_ARGS, check_screenshot, run_smollm2_demo, screenshot

from trl_sstoken import cli


@pytest.fixture(scope="module")
def smollm2_demo(tmp_path_factory, smollm2_dir):
    """The SmolLM2 demo of tools/report_screenshot.py (4 steps, max_length 64), run once: (output folder, stdout)."""
    out = tmp_path_factory.mktemp("smollm2-demo") / "demo"
    run_smollm2_demo(out, smollm2_dir)
    return out


@pytest.mark.real_model
def test_demo_fine_tunes_a_real_model_in_its_chat_template(smollm2_demo, smollm2_dir):
    out = smollm2_demo
    # the LoRA adapter of the real model, trained on the bundled data in SmolLM2's chat template
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_dir)
    page = (out / "selection_report.html").read_text()
    assert str(smollm2_dir) in page
    shown = page_selection(page)
    assert len(shown) == int(DEMO_ARGS[DEMO_ARGS.index("--num_report_examples") + 1])
    assert any(len(kept) < len(response) for response, kept in shown)  # something was dropped
    assert "im_start" in page and "assistant" in page  # ChatML: the prompt is the rendered conversation
    card = (out / "README.md").read_text()
    assert f"fine-tuned version of `{smollm2_dir}` (a local folder)" in card and "None" not in card


@pytest.mark.real_model
def test_demo_says_how_the_data_was_rendered(tmp_path, tiny_model_dir, smollm2_dir, capsys):
    """With a chat template: conversations; without one (a tokenizer saved without it): prompt-completion text."""
    from trl_sstoken.loading import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    args = SimpleNamespace(trust_remote_code=False, model_init_kwargs=None)
    _, _, rows, data_format = cli.demo._real_demo_model(str(smollm2_dir), [{"prompt": "p", "completion": " c"}], args)
    assert data_format == "as conversations in its chat template" and tokenizer.chat_template
    assert rows == [
        {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}
    ]
    plain = tmp_path / "no-template"
    plain.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.is_file():  # the model and its tokenizer (other tests leave folders beside them)
            (plain / item.name).write_bytes(item.read_bytes())
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    status = cli.main(
        [
            "demo",
            "--model_name_or_path",
            str(plain),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "1",
            "--num_report_examples",
            "2",
            "--num_eval_examples",
            "4",
            "--max_length",
            "32",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "as prompt-completion text: its tokenizer has no chat template" in printed
    assert f"{plain} learns 96 bundled examples (as prompt-completion text" in printed


@pytest.mark.real_model
def test_a_real_browser_draws_the_real_model_report(smollm2_demo, tmp_path):
    """The screenshot, checked for content: not blank, the report's kept and dropped token colours, the underline."""
    chromium = chromium_or_skip()
    page = smollm2_demo / "selection_report.html"
    png = screenshot(page, tmp_path / "report.png", chromium=chromium)
    found = check_screenshot(png, page.read_text(encoding="utf-8"))
    assert found["kept"] >= 200 and found["dropped"] >= 200
    # the check fails on a picture without the report: a blank page of the same size
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    with pytest.raises(AssertionError, match="blank"):
        check_screenshot(
            screenshot(blank, tmp_path / "blank.png", chromium=chromium), page.read_text(encoding="utf-8")
        )
