"""Where each token kind sits in the real-model benchmark's noisy responses, by position decile (data only, no model).

A score that falls with position keeps early tokens; this table shows which kinds those are. Same decile rule as the
benchmark's KindTracker (offset * 10 // n over the response tokens of one example).

    python -m benchmarks.quality.exploration.kinds_by_position [smollm2|gemma3]
"""

import sys

from tools.real_models import real_model_path
from transformers import AutoTokenizer

from .. import real_data
from ..noise import KINDS
from ..scales import SCALES


def kinds_by_decile(model_name: str) -> list[dict]:
    scale = SCALES["real-cpu"]
    splits = real_data.build_splits(scale["data_seed"], scale["train_per_family"], scale["eval_per_family"],
                                    scale["reference_per_family"])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(real_model_path(model_name))
    counts = [dict.fromkeys(KINDS, 0) for _ in range(10)]
    for instance, response in zip(splits.train, splits.train_noisy, strict=True):
        row = real_data.tokenize_example(tokenizer, model_name, real_data.prompt_text(instance), response)
        kinds = [k for k in row["kinds"] if k >= 0]
        for offset, kind in enumerate(kinds):
            counts[min(9, offset * 10 // len(kinds))][KINDS[kind]] += 1
    return [{kind: n / sum(decile.values()) for kind, n in decile.items()} for decile in counts]


def main():
    model_name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    table = kinds_by_decile(model_name)
    print(f"share of each kind among the response tokens of each position decile ({model_name}, noisy data)")
    print("| kind | " + " | ".join(f"d{d + 1}" for d in range(10)) + " |")
    print("|---|" + "---|" * 10)
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(f"{row[kind]:.0%}" for row in table) + " |")


if __name__ == "__main__":
    main()
