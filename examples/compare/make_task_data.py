"""Writes a slice of the quality benchmark's real-model data as JSONL files for `trl-sstoken compare`:

- `train.jsonl`: noisy SFT data (wrong answer items, boilerplate openers, random code tails), conversational
  prompt-completion rows;
- `eval.jsonl`: held-out prompts with clean responses (the evaluation set you trust);
- `reference.jsonl`: a small clean set for rho1's reference (the benchmark's 12 per task family).

    python examples/compare/make_task_data.py --train_per_family 25 --eval_per_family 10 --output_dir cmp-data
"""

import argparse
import json
import os

from benchmarks.quality import real_data


def rows(instances, responses):
    return [
        {
            "prompt": [{"role": "user", "content": real_data.prompt_text(instance)}],
            "completion": [{"role": "assistant", "content": response.text}],
        }
        for instance, response in zip(instances, responses, strict=True)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_per_family", type=int, default=25)
    parser.add_argument("--eval_per_family", type=int, default=10)
    parser.add_argument("--reference_per_family", type=int, default=12)
    parser.add_argument("--output_dir", default="cmp-data")
    args = parser.parse_args(argv)
    splits = real_data.build_splits(1234, args.train_per_family, args.eval_per_family, args.reference_per_family)
    os.makedirs(args.output_dir, exist_ok=True)
    files = {
        "train.jsonl": rows(splits.train, splits.train_noisy),
        "eval.jsonl": rows(splits.eval, [real_data.clean_response(i) for i in splits.eval]),
        "reference.jsonl": rows(splits.reference, splits.reference_responses()),
    }
    for name, content in files.items():
        with open(os.path.join(args.output_dir, name), "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in content)
        print(f"{os.path.join(args.output_dir, name)}: {len(content)} rows")


if __name__ == "__main__":
    main()
