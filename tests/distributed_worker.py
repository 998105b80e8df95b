"""One training step of SSTokenTrainer, run in-process or under torchrun, saving the trained adapter and the loss.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT BATCH GA METHOD NORMALIZATION

Used by tests/test_distributed.py to show that the loss normalisation is exact across processes and micro-batches.
"""

import json
import os
import sys


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


ROWS = [
    {"prompt": "what is two plus three ?", "completion": " sure ! two plus three is five ."},
    {"prompt": "reverse the list : h c e b", "completion": " sure ! b e c h ."},
    {
        "prompt": "the owl is green , the cow is black . what color is the cow ?",
        "completion": " sure ! the cow is black .",
    },
    {"prompt": "what is one plus one ?", "completion": " two ."},
]


def run(out_dir, batch_size, accumulation, method, normalization, fsdp=False):
    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in ROWS])
    model = build_tiny_model(tokenizer)
    args = SSTokenConfig(
        output_dir=out_dir,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        selection_method=method,
        selection_loss_normalization=normalization,
        attention_warmup_ratio=0.0,
        logging_steps=1,
        max_grad_norm=1e9,
        optim="sgd",
        **(dict(fsdp=True, fsdp_config={"fsdp_version": 2}) if fsdp else {}),
    )
    trainer = SSTokenTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad():  # an informative REL from the first step: the adapter differs from the base
        generator = torch.Generator().manual_seed(1)
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    if trainer.accelerator.is_main_process:
        initial = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if ".default." in n}
        save_file(initial, os.path.join(out_dir, "adapter_initial.safetensors"))
    trainer.train()
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters())
    adapter = {
        n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().contiguous()
        for n, p in trainer.model.named_parameters()
        if ".default." in n
    }
    if trainer.accelerator.is_main_process:
        save_file(adapter, os.path.join(out_dir, "adapter.safetensors"))
        loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
        with open(os.path.join(out_dir, "result.json"), "w") as handle:
            json.dump(
                {
                    "loss": loss,
                    "world_size": trainer.accelerator.num_processes,
                    "fsdp": trainer.is_fsdp_enabled,
                    "sharded": sharded,
                },
                handle,
            )


if __name__ == "__main__":
    out, batch, accumulation, method, normalization = sys.argv[1:6]
    run(out, int(batch), int(accumulation), method, normalization, fsdp=sys.argv[6:7] == ["fsdp"])
