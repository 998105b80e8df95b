"""The documentation site builds with warnings as errors, and its generated pages list what the code defines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_sstoken import cli
from trl_sstoken.config import sstoken_fields


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


@pytest.mark.smoke
def test_docs_build_strictly_with_every_page(site):
    for page in (
        "concepts",
        "quickstart",
        "configuration",
        "history",
        "qlora",
        "multi-gpu",
        "cli",
        "method",
        "benchmarks",
        "troubleshooting",
    ):
        assert (site / page / "index.html").exists(), page
    assert (site / "assets" / "selection.svg").read_text().startswith("<svg")


def test_configuration_page_lists_every_sstoken_field(site):
    page = (site / "configuration" / "index.html").read_text()
    assert "sstoken:config-reference" not in page  # the marker was replaced
    for field in sstoken_fields():
        assert f"<code>{field.name}</code>" in page, field.name


def test_cli_page_lists_the_options_each_command_adds(site):
    page = (site / "cli" / "index.html").read_text()
    assert "sstoken:cli-options" not in page
    for dataclass_type in (
        cli.arguments.LoadingArguments,
        cli.arguments.InspectArguments,
        cli.arguments.DemoArguments,
    ):
        for name in dataclass_type.__dataclass_fields__:
            assert f"<code>--{name}</code>" in page, name
    quickstart = (site / "quickstart" / "index.html").read_text()
    for name in cli.arguments.DEMO_DEFAULTS:
        assert f"<code>{name}</code>" in quickstart, name
