"""Token lengths of the long-response task set (`--tasks long`), to size max_length and max_new_tokens (data only).

Prints min / median / max of the response tokens (clean and noisy training responses, clean eval responses, the end-
of-turn token included), of whole training examples (prompt with the chat template + response), of eval prompts,
and where the answer-kind tokens sit by position decile of the noisy responses.

    python -m benchmarks.quality.exploration.long_lengths [smollm2|gemma3] [real-cpu|real-gpu|...]
"""

import statistics
import sys

from tools.real_models import real_model_path
from transformers import AutoTokenizer

from .. import long_tasks, real_data
from ..noise import KINDS
from ..scales import SCALES


def lengths(model_name: str, scale_name: str) -> dict:
    scale = SCALES[scale_name]
    factor = long_tasks.PER_FAMILY_FACTOR
    splits = real_data.build_splits(scale["data_seed"], factor * scale["train_per_family"],
                                    factor * scale["eval_per_family"], factor * scale["reference_per_family"],
                                    tasks="long")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(real_model_path(model_name))

    def rows(instances, responses):
        return [real_data.tokenize_example(tokenizer, model_name, real_data.prompt_text(i), r)
                for i, r in zip(instances, responses, strict=True)]  # fmt: skip

    noisy = rows(splits.train, splits.train_noisy)
    table = {
        "clean responses": [sum(k >= 0 for k in r["kinds"]) for r in rows(splits.train, splits.train_clean)],
        "noisy responses": [sum(k >= 0 for k in r["kinds"]) for r in noisy],
        "eval clean responses": [
            sum(k >= 0 for k in r["kinds"])
            for r in rows(splits.eval, [real_data.clean_response(i) for i in splits.eval])
        ],  # fmt: skip
        "noisy training examples (whole)": [len(r["input_ids"]) for r in noisy],
        "eval prompts (with template)": [
            len(real_data.prompt_ids(tokenizer, model_name, real_data.prompt_text(i))) for i in splits.eval
        ],  # fmt: skip
    }
    for family in long_tasks.FAMILIES:
        table[f"clean responses, {family}"] = [
            sum(k >= 0 for k in r["kinds"])
            for r, i in zip(rows(splits.train, splits.train_clean), splits.train, strict=True)
            if i.family == family
        ]
    answer = KINDS.index("answer")
    deciles = [[0, 0] for _ in range(10)]
    for row in noisy:
        kinds = [k for k in row["kinds"] if k >= 0]
        for offset, kind in enumerate(kinds):
            decile = deciles[min(9, offset * 10 // len(kinds))]
            decile[0] += kind == answer
            decile[1] += 1
    return {"lengths": table, "answer_share_by_decile": [a / n for a, n in deciles]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    model_name = argv[0] if argv else "smollm2"
    result = lengths(model_name, argv[1] if len(argv) > 1 else "real-cpu")
    for name, values in result["lengths"].items():
        print(f"{name:40s} n {len(values):4d}  min {min(values):4d}  median {statistics.median(values):6.1f}  "
              f"max {max(values):4d}")  # fmt: skip
    print("answer-kind share by decile (noisy):", " ".join(f"{v:.2f}" for v in result["answer_share_by_decile"]))


if __name__ == "__main__":
    main()
