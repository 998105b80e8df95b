"""The screenshot of docs/selection-report.md: `trl-sstoken demo` on the real SmolLM2-135M-Instruct, its selection
report drawn by headless Chromium (Debian's `chromium` package), whole.

    python -m tools.report_screenshot         # rewrites docs/assets/selection-report-smollm2.png (about a minute)

`tests/test_real_model_demo.py::test_a_real_browser_draws_the_real_model_report` runs the same three steps
(`run_smollm2_demo`, `screenshot`, `check_screenshot`) and fails if the picture does not show the report: blank, or
without the background colours of its kept and dropped tokens.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "docs" / "assets" / "selection-report-smollm2.png"
WINDOW = (1200, 2000)  # the whole report of DEMO_ARGS: settings, summary and the examples
# A short, reproducible fine-tuning of the real model on the bundled data (seconds per step on a CPU)
DEMO_ARGS = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--max_length",
    "64",
    "--logging_steps",
    "1",
    "--history_update_steps",
    "1",
    "--num_report_examples",
    "5",
    "--num_eval_examples",
    "4",
]
# Chromium as the tests run it: no GPU, no sandbox (root in a container), and none of the background connections a
# closed network refuses
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def run_smollm2_demo(output_dir, model_dir=None) -> Path:
    """`trl-sstoken demo --model_name_or_path <SmolLM2 folder>` with DEMO_ARGS; returns the report's path."""
    from tools.real_models import real_model_path
    from trl_sstoken import cli

    model_dir = model_dir or real_model_path("smollm2")
    status = cli.main(["demo", "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), *DEMO_ARGS])
    if status != 0:
        raise RuntimeError(f"trl-sstoken demo on {model_dir} exited with {status}")
    return Path(output_dir) / "selection_report.html"


def screenshot(page: Path, png: Path, window=WINDOW, chromium: str | None = None) -> Path:
    """Headless Chromium's picture of `page` (a local HTML file), the top `window` pixels. (Scrolled to a fragment
    such as `#examples`, Chromium 156 headless draws a blank picture, so the window is made tall instead.)"""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("No Chromium found: install Debian's `chromium` package (apt-get install chromium).")
    png = Path(png)
    png.unlink(missing_ok=True)
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={window[0]},{window[1]}",
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    return png


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def report_colours(page_html: str) -> dict[str, set[tuple[int, int, int]]]:
    """The background colours the report gives its kept and its dropped tokens, as drawn on the white page (dropped
    tokens are drawn at opacity 0.75)."""
    colours = {"kept": set(), "dropped": set()}
    for role, colour in re.findall(r'class="tok (kept|dropped)"[^>]*style="background:(#[0-9a-f]{6})', page_html):
        rgb = _hex(colour)
        if role == "dropped":
            rgb = tuple(round(0.75 * c + 0.25 * 255) for c in rgb)
        colours[role].add(rgb)
    return colours


def check_screenshot(png: Path, page_html: str, window=WINDOW, min_pixels: int = 200) -> dict:
    """Fails (AssertionError, saying what is missing) unless the picture has the window's size, is not blank, and shows
    the report's kept and dropped token backgrounds (`min_pixels` pixels each, within 3 levels per channel) and the
    green underline of kept tokens. Returns the pixel counts."""
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == tuple(window), f"screenshot is {image.size}, expected {tuple(window)}"
        counts = Counter(image.convert("RGB").get_flattened_data())
    total = sum(counts.values())
    white = sum(n for rgb, n in counts.items() if min(rgb) >= 250)
    assert total - white > 0.05 * total, f"screenshot is blank: {white / total:.1%} white"
    assert len(counts) > 50, f"screenshot has only {len(counts)} colours"

    def near(targets):
        return sum(
            n
            for rgb, n in counts.items()
            if any(max(abs(a - b) for a, b in zip(rgb, t, strict=True)) <= 3 for t in targets)
        )

    expected = report_colours(page_html)
    found = {role: near(colours) for role, colours in expected.items()}
    found["kept underline"] = near({_hex("#1b7f3b")})
    for role, pixels in found.items():
        assert pixels >= min_pixels, (
            f"screenshot shows {pixels} pixels of the {role} tokens' colour, expected >= {min_pixels}"
        )
    return found


def main() -> int:
    from trl_sstoken.cli import quiet_third_party_warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_third_party_warnings()
    with tempfile.TemporaryDirectory() as scratch:
        page = run_smollm2_demo(Path(scratch) / "demo")
        screenshot(page, ASSET)
        print(check_screenshot(ASSET, page.read_text(encoding="utf-8")))
    print(f"wrote {ASSET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
