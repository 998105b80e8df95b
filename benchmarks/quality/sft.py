"""One SFT run: LoRA on the cached base model with `SSTokenTrainer`, then greedy evaluation.

While it trains, the run counts which kinds of response token (answer, corrupt, format, boilerplate, random) were
kept, so the results say not only how well a method did but what it trained on.
"""

import time
from collections import Counter

import torch
from peft import LoraConfig
from transformers import PrinterCallback, set_seed

from trl_sstoken import SSTokenConfig, SSTokenTrainer

from .base_model import load_cached
from .evaluate import evaluate_chat
from .noise import KINDS
from .position_matched import PositionMatchedConfig


class KindTracker:
    """Kept and seen response tokens per kind, matched to the training rows through their token ids."""

    def __init__(self, dataset, pad_token_id: int):
        self.pad = pad_token_id
        # keyed without padding ids (a real tokenizer's pad can be its end-of-turn token, which ends every row)
        self.kinds_by_ids = {self._key(row["input_ids"]): row["kinds"] for row in dataset}
        self.kept, self.seen = Counter(), Counter()
        self.kept_by_decile, self.seen_by_decile = Counter(), Counter()
        self.unmatched_rows = 0

    def _key(self, ids):
        return tuple(i for i in ids if i != self.pad)

    @torch.no_grad()
    def update(self, input_ids: torch.Tensor, keep: torch.Tensor, response: torch.Tensor):
        """input_ids (B, T); keep and response (B, T-1) in prediction space (column j is token j + 1)."""
        keep, response = keep.float().cpu(), response.cpu()
        for row, ids in enumerate(input_ids.cpu().tolist()):
            kinds = self.kinds_by_ids.get(self._key(ids))
            if kinds is None:
                self.unmatched_rows += 1
                continue
            columns = [column for column, kind in enumerate(kinds[1:]) if kind >= 0 and response[row, column]]
            for offset, column in enumerate(columns):
                kind = KINDS[kinds[column + 1]]
                self.seen[kind] += 1
                self.kept[kind] += float(keep[row, column])
                decile = min(9, offset * 10 // len(columns))  # position of the token within its response
                self.seen_by_decile[decile] += 1
                self.kept_by_decile[decile] += float(keep[row, column])

    def summary(self) -> dict:
        total_kept = sum(self.kept.values())
        return {
            "kept_fraction_by_kind": {k: self.kept[k] / self.seen[k] for k in KINDS if self.seen[k]},
            "share_of_kept_by_kind": {k: self.kept[k] / total_kept for k in KINDS if total_kept and self.seen[k]},
            "kept_fraction_by_position_decile": [
                self.kept_by_decile[d] / self.seen_by_decile[d] if self.seen_by_decile[d] else None for d in range(10)
            ],
            "unmatched_rows": self.unmatched_rows,
        }


class BenchmarkTrainer(SSTokenTrainer):
    """SSTokenTrainer that reports every training selection to a KindTracker (diagnostics only)."""

    kind_tracker: KindTracker | None = None

    def _forward_and_select(self, model, inputs, *args, **kwargs):
        outputs, selection = super()._forward_and_select(model, inputs, *args, **kwargs)
        if self.kind_tracker is not None:
            self.kind_tracker.update(inputs["input_ids"], selection.keep, selection.regions.response)
        return outputs, selection


def training_args(scale: dict, seed: int, output_dir: str, device: str, overrides: dict, max_steps: int | None = None):
    # Real models: the weights are loaded in bf16 (`load_model`), so training runs in bf16 without autocast.
    # The position-matched control's profile is its config subclass's field; every other run is a plain SSTokenConfig.
    config_class = PositionMatchedConfig if "position_profile" in overrides else SSTokenConfig
    return config_class(
        output_dir=output_dir,
        max_steps=max_steps or scale["sft_steps"],
        per_device_train_batch_size=scale["sft_batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=scale["sft_lr"],
        lr_scheduler_type="linear",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=max(1, (max_steps or scale["sft_steps"]) // 10),
        report_to="none",
        use_cpu=device == "cpu",
        bf16=False,
        save_strategy="no",
        max_length=scale["max_length"],
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        # Was a workaround for a crash on an incomplete last batch (fixed in main, 87e83cc); kept so that results stay
        # comparable with the committed ones. The main training sets divide by the batch size, so this only drops
        # 8 of the rho1 reference's 200 examples per epoch.
        dataloader_drop_last=True,
        disable_tqdm=True,
        **overrides,
    )


def load_real_model(path: str, device: str):
    """A real pretrained model (tools.real_models) in bf16: its stored dtype, and fast on AMX CPUs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)


def lora_config(scale: dict) -> LoraConfig:
    return LoraConfig(
        r=scale["lora_r"],
        lora_alpha=scale["lora_alpha"],
        lora_dropout=scale["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def train_and_evaluate(
    base_path: str,
    tokenizer,
    train_dataset,
    eval_instances,
    scale: dict,
    overrides: dict,
    seed: int,
    output_dir: str,
    device: str = "cpu",
    max_steps: int | None = None,
    save_adapter_to: str | None = None,
) -> dict:
    """Trains one LoRA adapter with the given SSTokenConfig overrides and returns its scores and diagnostics."""
    start, cpu_start = time.time(), time.process_time()
    set_seed(seed)
    real = scale.get("model", "lab") != "lab"
    model = load_real_model(base_path, device) if real else load_cached(base_path, device)
    trainer = BenchmarkTrainer(
        model=model,
        args=training_args(scale, seed, output_dir, device, overrides, max_steps),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(scale),
    )
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the harness prints one line per run
    trainer.kind_tracker = KindTracker(train_dataset, tokenizer.pad_token_id)
    train_output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    fractions = [e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e]
    train_seconds = time.time() - start
    if real:
        from . import real_evaluate

        scores = real_evaluate.evaluate(trainer.model, tokenizer, scale["model"], eval_instances,
                                        max_new_tokens=scale.get("max_new_tokens", 48))  # fmt: skip
        diagnostic_rows = [train_dataset[i] for i in range(min(scale["diagnostic_rows"], len(train_dataset)))]
        scores["attention"] = real_evaluate.attention_diagnostics(
            trainer.model, diagnostic_rows, overrides.get("attention_layer", -1), tokenizer.pad_token_id
        )
    else:
        scores = evaluate_chat(trainer.model, tokenizer, eval_instances, samples=4)
    if save_adapter_to is not None:
        trainer.model.save_pretrained(save_adapter_to, selected_adapters=["default"])
    return {
        **scores,
        "train_loss_first_log": losses[0] if losses else None,
        "train_loss_last_log": losses[-1] if losses else None,
        "train_loss_mean": train_output.training_loss,
        "selected_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
        "selection": trainer.kind_tracker.summary(),
        "train_wall_seconds": train_seconds,
        "wall_seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
