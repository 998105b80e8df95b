"""Regenerates docs/assets/selection.svg, the picture of a selection on the concepts page, from a real run.

It runs `trl-sstoken demo` (a tiny model built locally, fine-tuned with ssToken on the bundled dataset, offline, on
the CPU, about two minutes on 2 cores) and copies the SVG the demo draws of its first three examples.

    python tools/make_selection_figure.py
"""

import os
import shutil
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl_sstoken import cli  # noqa: E402


TARGET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "assets", "selection.svg")


def main():
    with tempfile.TemporaryDirectory() as output_dir:
        status = cli.main(["demo", "--output_dir", output_dir, "--use_cpu", "true"])
        if status:
            sys.exit(status)
        shutil.copyfile(os.path.join(output_dir, "selection.svg"), TARGET)
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
