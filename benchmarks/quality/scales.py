"""Benchmark scales: model size, data sizes and the training recipe shared by every method.

- `tiny`: a smoke test of the whole pipeline (seconds; the numbers mean nothing).
- `cpu` (default): about 30 minutes on 2 CPU cores, including pretraining the base model the first time.
- `gpu`: a bigger model, more data and more steps, for one GPU (pass `--device cuda`).

Within a scale, every method and ablation uses the same LoRA, steps, batch size and learning rate.

Real-model budget scales (issue 27): `real-cpu-100` and `real-cpu-300` are `real-cpu` (24 steps) trained for 100 and
300 steps of batch 8, i.e. 2 and 6 epochs over the 400 training prompts (`real-cpu` is under half an epoch). Named by
their step count, the number they change (an epoch count would stop being true under `--set train_per_family=...`);
their results go to `quality-real-cpu-100-<model>.json` and `quality-real-cpu-300-<model>.json`, beside the 24-step
`quality-real-cpu-<model>.json`. What a budget moves, and what it must not:

- moves: `sft_steps`; the learning rate, which each budget takes from a calibration of full SFT per model
  (`sft_lr=None`: benchmarks/quality/calibration.py reads `results/calibration/lr-<scale>-<model>.json`, and the
  harness refuses compared methods until that holds a final choice; `lr_candidates` is the grid written down before
  calibrating); and the rho1 reference's `reference_steps`, kept at the design's 2/3 of the run's steps (16 of 24;
  67 of 100; 200 of 300): the package trains the reference at the run's learning rate and schedule, so at a
  smaller calibrated lr a fixed 16 steps would leave the reference near the base model, and rho1 would be judged on
  a weaker reference for a reason that is not its method;
- moves by itself, being a fraction or derived from the steps: the warm-up (3%), the attention warm-up (20%), the
  logging interval (steps/10) and the history-lag ablation's K (steps/3);
- does not move: the data (seed, sizes, the same 80 eval prompts), LoRA, batch size, max length, the selection
  settings (`methods.SHARED`), the seeds, decoding and scoring, so that a budget's row differs from another's by
  the budget and its lr only;
- ablations: none by default (`ablations=[]`; the sweep compares methods, and one ablation at 300 steps costs a
  full run); `--ablations NAME ...` still runs any.

`real-cpu-75`: the long task set's (`--tasks long` only) cell of the longest budget. A long-set step costs ~25-33
CPU-s (batch 8 x 448) against ~5-6.6 for the short set, so 300 steps over the long set's 400 training prompts would
cost ~10,000 CPU-s a run. This scale keeps the longest budget's *epoch count* (6) on a smaller training set: 100 long
training prompts (50 per family), 75 steps of batch 8; everything else is the long set at `real-cpu-300` (the same 80
eval prompts, which are drawn before the training set, max_length 448, 288 new tokens, LoRA, shared settings) and
rho1's reference trains 2/3 of the steps (50). Named by its step count, as the other budget scales are; its sizes
are the long set's own (`long_tasks.scale_for` does not double them), and the short set is refused there, since
no design has a short cell on 100 prompts. Its lr is calibrated like theirs, in `lr-real-cpu-75-<model>-long.json`;
results go to `quality-real-cpu-75-<model>-long.json`.
"""

SCALES = {
    "tiny": dict(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        pretrain_steps=30, pretrain_batch_size=8, pretrain_block_size=48, pretrain_lr=1e-3, pretrain_seed=0,
        data_seed=1234, train_per_family=12, eval_per_family=5, reference_per_family=4,
        sft_steps=6, sft_batch_size=8, sft_lr=2e-3, lora_r=8, lora_alpha=16, lora_dropout=0.1,
        reference_steps=4, max_length=64, seeds=[0],
    ),
    "cpu": dict(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        pretrain_steps=2500, pretrain_batch_size=32, pretrain_block_size=64, pretrain_lr=1e-3, pretrain_seed=0,
        data_seed=1234, train_per_family=400, eval_per_family=100, reference_per_family=50,
        sft_steps=300, sft_batch_size=16, sft_lr=2e-3, lora_r=16, lora_alpha=32, lora_dropout=0.1,
        reference_steps=150, max_length=64, seeds=[0, 1, 2],
    ),
    "gpu": dict(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
        pretrain_steps=8000, pretrain_batch_size=64, pretrain_block_size=128, pretrain_lr=1e-3, pretrain_seed=0,
        data_seed=1234, train_per_family=2500, eval_per_family=250, reference_per_family=250,
        sft_steps=600, sft_batch_size=32, sft_lr=5e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1,
        reference_steps=600, max_length=64, seeds=[0, 1, 2],
    ),
    # ----- real-model mode (--model smollm2|gemma3): see README, "Real pretrained models" -----
    "real-tiny": dict(
        data_seed=1234, train_per_family=4, eval_per_family=2, reference_per_family=2, diagnostic_rows=4,
        sft_steps=2, sft_batch_size=4, sft_lr=1e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
        reference_steps=1, max_length=128, seeds=[0], ablations=[],
        methods_by_data={},
    ),
    "real-cpu": dict(
        data_seed=1234, train_per_family=100, eval_per_family=20, reference_per_family=12, diagnostic_rows=16,
        sft_steps=24, sft_batch_size=8, sft_lr=1e-3, lora_r=16, lora_alpha=32, lora_dropout=0.1,
        reference_steps=16, max_length=128, seeds=[0, 1, 2], ablations=None,
        methods_by_data={},
    ),
    # real-gpu: 750 training prompts per family, not 1000: `add` has only 900 distinct prompts (operands 0-29, so
    # that a + b <= tasks.MAX_NUMBER), and 1000 + the 100 eval prompts could never be drawn
    "real-gpu": dict(
        data_seed=1234, train_per_family=750, eval_per_family=100, reference_per_family=50, diagnostic_rows=64,
        sft_steps=300, sft_batch_size=16, sft_lr=5e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1,
        reference_steps=150, max_length=128, seeds=[0, 1, 2], ablations=None,
        methods_by_data={},
    ),
}  # fmt: skip


def budget_scale(steps: int, lr_candidates=(1e-3, 3e-4, 1e-4)) -> dict:
    """`real-cpu` at another training budget: see the module docstring for what moves and what does not."""
    return {**SCALES["real-cpu"], "sft_steps": steps, "sft_lr": None, "lr_candidates": list(lr_candidates),
            "reference_steps": round(steps * 16 / 24), "ablations": []}  # fmt: skip


SCALES["real-cpu-100"] = budget_scale(100)
SCALES["real-cpu-300"] = budget_scale(300)
# the long set's sizes as they are (tasks="long": `long_tasks.scale_for` keeps them; --tasks short is refused)
SCALES["real-cpu-75"] = {**budget_scale(75), "train_per_family": 50, "eval_per_family": 40, "reference_per_family": 24,
                         "tasks": "long"}  # fmt: skip


def task_sets(scale_name: str) -> tuple[str, ...]:
    """The task sets (`--tasks`) a scale can run: a scale with `tasks` in it is for that set only."""
    only = SCALES[scale_name].get("tasks")
    return (only,) if only else ("short", "long")
