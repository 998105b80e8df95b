"""How the overhead of ssToken grows with sequence length: runs benchmarks/perf/run.py at several lengths and plots
step time and peak memory relative to plain SFT.

    python benchmarks/perf/scaling.py --seq-lens 256 512 1024 --out benchmarks/results/perf-scaling-cpu
    python benchmarks/perf/scaling.py --scale llama-3.2-1b --device cuda --seq-lens 512 1024 2048 4096 ...
"""

import argparse
import json
import os
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--variants", nargs="+", default=["sft", "floor", "base", "base-cached", "lagged"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "perf-scaling-cpu"))
    args = parser.parse_args()

    points = {}
    for seq_len in args.seq_lens:
        out = f"{args.out}-{seq_len}"
        command = [
            sys.executable,
            os.path.join(HERE, "run.py"),
            "--scale",
            args.scale,
            "--device",
            args.device,
            "--seq-len",
            str(seq_len),
            "--batch",
            str(args.batch),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--examples",
            str(8 * args.batch),
            "--out",
            out,
            "--variants",
            *args.variants,
        ]
        print(" ".join(command), file=sys.stderr)
        subprocess.run(command, check=True)
        with open(out + ".json") as handle:
            points[seq_len] = json.load(handle)
    summary = {
        "command": "python " + " ".join(sys.argv),
        "seq_lens": args.seq_lens,
        "time_vs_sft": {v: [points[n]["variants"][v]["time_vs_sft"] for n in args.seq_lens] for v in args.variants},
        "memory_vs_sft": {
            v: [points[n]["variants"][v]["memory_vs_sft"] for n in args.seq_lens] for v in args.variants
        },
        "attention_share": {
            v: [points[n]["variants"][v]["attention_share_of_step"] for n in args.seq_lens] for v in args.variants
        },
    }
    with open(args.out + ".json", "w") as handle:
        json.dump(summary, handle, indent=2)
    plot(summary, args.out + ".png", f"{args.scale} on {args.device}")
    print(json.dumps(summary, indent=1))


def plot(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, values in summary["time_vs_sft"].items():
        left.plot(summary["seq_lens"], values, marker="o", label=variant)
    for variant, values in summary["memory_vs_sft"].items():
        right.plot(summary["seq_lens"], values, marker="o", label=variant)
    for axis, name in ((left, "step time / plain SFT"), (right, "peak memory / plain SFT")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(name)
        axis.axhline(1.0, color="grey", linewidth=0.5)
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle(f"ssToken overhead vs sequence length ({title})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
