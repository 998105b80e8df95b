"""Benchmark scales: model size, data sizes and the training recipe shared by every method.

- `tiny`: a smoke test of the whole pipeline (seconds; the numbers mean nothing).
- `cpu` (default): about 30 minutes on 2 CPU cores, including pretraining the base model the first time.
- `gpu`: a bigger model, more data and more steps, for one GPU (pass `--device cuda`).

Within a scale, every method and ablation uses the same LoRA, steps, batch size and learning rate.
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
    "real-gpu": dict(
        data_seed=1234, train_per_family=1000, eval_per_family=100, reference_per_family=50, diagnostic_rows=64,
        sft_steps=300, sft_batch_size=16, sft_lr=5e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1,
        reference_steps=150, max_length=128, seeds=[0, 1, 2], ablations=None,
        methods_by_data={},
    ),
}  # fmt: skip
