"""What each history mode costs in memory: parameter bytes and optimizer-state bytes, measured on real objects.

Two parts:
1. measured: a small Llama-shaped model is trained for one step by SSTokenTrainer in each mode (LoRA and full
   fine-tuning), and the bytes of the trainable parameters, the history (adapter or model copy) and the optimizer's
   state tensors are read off the live objects;
2. counted: the same objects built on the meta device (no memory) for the Llama-3.2-1B and Llama-3.1-8B shapes with
   LoRA r=64 on all linear layers, giving the bytes the history adds at real scale (the optimizer state is that of
   AdamW: two fp32 moments per trainable parameter, as in part 1).

    python benchmarks/memory_cost.py      # writes benchmarks/results/memory-cost.json and prints a markdown table
"""

import json
import os
import platform
import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.history import AdapterHistory  # noqa: E402
from trl_sstoken.tiny import build_tiny_tokenizer  # noqa: E402


SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear")


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer):
    return sum(nbytes(v for v in state.values() if torch.is_tensor(v)) for state in optimizer.state.values())


def measured(mode, peft):
    torch.manual_seed(0)
    texts = [f"what is item {i} ? item {i} is number {i % 7} ." for i in range(32)]
    tokenizer = build_tiny_tokenizer(texts)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    rows = [{"prompt": t.split("?")[0] + "?", "completion": t.split("?")[1]} for t in texts]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SSTokenTrainer(
            model=model,
            args=SSTokenConfig(
                output_dir=output_dir,
                max_steps=1,
                per_device_train_batch_size=4,
                report_to="none",
                use_cpu=True,
                bf16=False,
                save_strategy="no",
                history=mode,
                attention_warmup_ratio=0.0,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear") if peft else None,
        )
        trainer.train()
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        return {
            "mode": mode,
            "training": "LoRA r=16" if peft else "full fine-tuning",
            "model_parameter_bytes": nbytes(p for n, p in trainer.model.named_parameters() if ".history." not in n),
            "trainable_parameter_bytes": nbytes(trainable),
            "history_bytes": trainer._history.parameter_bytes,
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        }


def counted(shape_name, adapter_dtype=torch.bfloat16):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape_name]))
        peft_model = get_peft_model(model, LoraConfig(**LORA))
        history = AdapterHistory(peft_model, "lagged", 1, 0.5)
    adapter_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".default." in n)
    history_params = sum(p.numel() for p in history.history_params)
    base_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n)
    # bitsandbytes quantizes the decoder's linear layers (4 bits + one fp32 absmax per 64 values, no double
    # quantization); embeddings, norms and lm_head stay in bf16
    quantized = sum(
        m.base_layer.weight.numel()
        for n, m in peft_model.named_modules()
        if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear) and "lm_head" not in n
    )
    bytes_per = torch.finfo(adapter_dtype).bits // 8
    return {
        "shape": shape_name,
        "lora": LORA,
        "base_parameters": base_params,
        "adapter_parameters": adapter_params,
        "history_adapter_parameters": history_params,
        "adapter_dtype": str(adapter_dtype),
        "history_adapter_bytes (lagged/ema)": history_params * bytes_per,
        "adapter_adamw_state_bytes (two moments in the adapter dtype)": adapter_params * bytes_per * 2,
        "full_fine_tuning_history_copy_bytes (bf16)": base_params * 2,
        "base_weights_bytes_bf16": base_params * 2,
        "base_weights_bytes_nf4": int(quantized * (0.5 + 4 / 64) + (base_params - quantized) * 2),
    }


def main():
    torch.set_num_threads(2)
    results = {
        "command": "python benchmarks/memory_cost.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "measured": [measured(mode, peft) for peft in (True, False) for mode in ("base", "lagged", "ema")],
        "counted": [counted(name) for name in SHAPES],
    }
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/memory-cost.json", "w") as handle:
        json.dump(results, handle, indent=2)
    print("| training | history | model params | trainable | history adds | optimizer state |")
    print("|---|---|---|---|---|---|")
    for row in results["measured"]:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        print(
            f"| {row['training']} | {row['mode']} | {mib(row['model_parameter_bytes'])} | "
            f"{mib(row['trainable_parameter_bytes'])} | {mib(row['history_bytes'])} | "
            f"{mib(row['optimizer_state_bytes'])} |"
        )
    print()
    for row in results["counted"]:
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
