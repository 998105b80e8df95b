"""Every shape, size, step count and time budget of the GPU check, per scale (standard library only).

`gpu` is the real check (one CUDA GPU, under 9 minutes). `toy` runs the same code on the CPU with tiny shapes, for
the test suite (`tests/test_gpu_check.py`). Nothing else in the check hard-codes a size. Any entry can be
overridden for one run: `python -m benchmarks.gpu.check --set cost_steps=3 --set 'cap_modes=["sft","base"]'`
(JSON values; check.py hands them to every stage in GPU_CHECK_OVERRIDES).
"""

import json
import os


LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab=128256,
)
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab=128256,
)
# hidden 64, not 32: bitsandbytes' CPU path for no-grad 4-bit forwards repacks weights in blocks of 64 input features
# and fails on narrower layers (the history cache pass runs such a forward)
TOY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab=200
)

STAGES = ("env", "correctness", "cost", "memory_cap", "distributed", "quality")
HISTORY_MODES = ("base", "base-cached", "lagged", "ema")

SCALES = {
    "gpu": dict(
        device="cuda",
        dtype="bfloat16",
        total_budget=525,  # seconds for all stages; the device tool's limit is 600 including the wheel install
        budgets=dict(env=45, correctness=95, cost=210, memory_cap=95, distributed=75, quality=20),
        # 2. correctness: a small Llama-shaped model, a few steps of every combination
        small_shape=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab=2000,
        ),
        small_seq=256,
        small_batch=4,
        small_steps=3,
        quantizations=("nf4", "none"),  # QLoRA NF4 and plain LoRA, both in `dtype`
        attentions=("sdpa", "flash_attention_2"),
        correctness_modes=HISTORY_MODES,
        attention_check_seq=1024,
        attention_kernel_check=dict(heads=32, kv_heads=8, head_dim=64, seq=2048),
        # 3. cost: (label, shape, batch a 24 GB user would set at 2048 tokens)
        cost_shapes=(("llama-3.2-1b", LLAMA_1B, 8), ("llama-3.1-8b", LLAMA_8B, 2)),
        cost_seq=2048,
        cost_variants=("sft", "floor", "base", "base-cached", "lagged", "ema"),
        cost_warmup=2,
        cost_steps=5,
        share_seq_lens=(2048, 4096, 8192),  # the attention statistic's share of a step (batch 1, history base)
        share_steps=2,
        kernel_seq_lens=(2048, 4096, 8192),  # the statistic alone, at the cost shapes' layer shape
        # 4. the 24 GB cap: the 8B shape, QLoRA, 2048 tokens, each mode in its own capped process
        cap_shape=("llama-3.1-8b", LLAMA_8B, 2),
        cap_gib=24,
        cap_seq=2048,
        cap_modes=("sft", "base", "base-cached", "lagged", "ema"),
        cap_parallel=5,  # 5 x 24 GiB fit on one 141 GB H200; the processes only need to fit, not to be timed
        cap_steps=2,
        # 5. FSDP / DeepSpeed ZeRO-3 with one process
        distributed_configs=("fsdp2", "fsdp1", "zero3"),
        distributed_shape=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab=2000,
        ),
        distributed_seq=256,
        distributed_steps=3,
        distributed_modes=HISTORY_MODES,
    ),
    # The same code at toy shapes on the CPU. Where the GPU scale loops over every history mode, the toy scale takes
    # a subset that still runs every branch of the script (on-the-fly and cached history, a history adapter); the
    # modes themselves are covered by the unit tests.
    "toy": dict(
        device="cpu",
        dtype="float32",
        # generous: a shared 2-core machine runs the dry run in about 3 minutes, but 2-3x slower when busy
        total_budget=720,
        budgets=dict(env=90, correctness=180, cost=150, memory_cap=120, distributed=120, quality=60),
        small_shape=TOY,
        small_seq=32,
        small_batch=2,
        small_steps=2,
        quantizations=("nf4", "none"),  # QLoRA NF4 and plain LoRA, both in `dtype`
        attentions=("sdpa", "flash_attention_2"),
        correctness_modes=("base-cached", "lagged"),
        attention_check_seq=40,
        attention_kernel_check=dict(heads=4, kv_heads=2, head_dim=8, seq=64),
        cost_shapes=(("toy", TOY, 2),),
        cost_seq=32,
        cost_variants=("sft", "floor", "base", "base-cached", "lagged", "ema"),
        cost_warmup=1,
        cost_steps=2,
        share_seq_lens=(32, 64),
        share_steps=1,  # + 1 warm-up step per length
        kernel_seq_lens=(32, 64),
        cap_shape=("toy", TOY, 2),
        cap_gib=24,
        cap_seq=32,
        cap_modes=("sft", "base-cached"),
        cap_parallel=2,
        cap_steps=1,
        distributed_configs=("fsdp2", "fsdp1", "zero3"),
        distributed_shape=TOY,
        distributed_seq=32,
        distributed_steps=2,
        distributed_modes=("base-cached", "lagged"),
    ),
}


def load(scale: str) -> dict:
    """The settings of `scale` with the run's overrides (GPU_CHECK_OVERRIDES, a JSON object) applied."""
    settings = dict(SCALES[scale])
    overrides = json.loads(os.environ.get("GPU_CHECK_OVERRIDES") or "{}")
    unknown = set(overrides) - set(settings)
    if unknown:
        raise KeyError(f"unknown settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update(overrides)
    return settings
