"""Cost of the attention statistic alone, before and after an optimisation, at a real layer's shape.

Times `context_attention_mass` of a given git revision against the working tree's, interleaved, on one layer of
Llama-3.2-1B's shape (32 query heads, 8 key/value heads, head dim 64) with a prompt of 3/4 of the sequence and a
response of 1/4 (only response rows are needed).

    python benchmarks/perf/attention_statistic.py --before d50c7a7 --seq-len 2048
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from trl_sstoken.attention.capture import context_attention_mass as after  # noqa: E402


def load_revision(revision):
    # the module's path at that revision: trl_sstoken/attention.py before the layout of subpackages
    for module_path in ("trl_sstoken/attention/capture.py", "trl_sstoken/attention.py"):
        shown = subprocess.run(["git", "show", f"{revision}:{module_path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = os.path.join(tempfile.mkdtemp(), "attention_before.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("attention_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.context_attention_mass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="git revision of the 'before' implementation")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = load_revision(args.before)
    generator = torch.Generator().manual_seed(0)
    T = args.seq_len
    query = torch.randn(1, 32, T, 64, generator=generator)
    key = torch.randn(1, 8, T, 64, generator=generator)
    prompt = (T * 3) // 4
    context = torch.zeros(1, T, dtype=torch.bool)
    context[:, :prompt] = True
    valid = torch.ones(1, T, dtype=torch.bool)
    needed = ~context
    common = dict(context=context, key_valid=valid, scaling=64**-0.5, chunk_size=256)
    runs = {
        "before": lambda: before(query, key, **common),
        "after, every row": lambda: after(query, key, **common),
        "after": lambda: after(query, key, **common, query_needed=needed),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats + 1):  # the first round is a warm-up
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    first, second = runs["before"](), runs["after"]()
    agree = torch.allclose(first[needed], second[needed], atol=1e-6)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(
        f"seq_len={T} threads={args.threads} (median of {args.repeats}): before {medians['before']:.3f} s, "
        f"after with every row {medians['after, every row']:.3f} s "
        f"({medians['after, every row'] / medians['before']:.3f}x), after with response rows only "
        f"{medians['after']:.3f} s ({medians['after'] / medians['before']:.3f}x); response-row values agree: {agree}"
    )


if __name__ == "__main__":
    main()
