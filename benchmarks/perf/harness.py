"""Shared pieces of the cost benchmarks: shapes, synthetic data, the variants, and a step-at-a-time runner.

Used by `benchmarks/perf/run.py` (CPU side-by-side) and `benchmarks/gpu/check.py` (the prepared GPU check). Only the
public API of trl_sstoken (SSTokenConfig, SSTokenTrainer, trl_sstoken.attention.capture) and of transformers' Trainer is
used, with two exceptions, each isolated in one function below and named there: `prepare_history_cache` and
`AttentionTimer`.

Variants:
  sft          plain trl.SFTTrainer
  floor        plain SFTTrainer plus exactly one no-grad forward of the same model per micro-batch (adapter
               disabled): the least an on-the-fly history can cost
  attention    SSTokenTrainer, selection_method="attention": the attention statistic alone, no history forward
  base         SSTokenTrainer, history="base", on the fly
  base-cached  SSTokenTrainer, history="base" with history_cache_dir (the caching pass is timed separately)
  lagged       SSTokenTrainer, history="lagged" (K = 50)
  ema          SSTokenTrainer, history="ema" (K = 1, alpha = 0.98)
"""

import itertools
import random
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig
from trl import SFTConfig, SFTTrainer

from trl_sstoken import SSTokenConfig, SSTokenTrainer


VARIANTS = ("sft", "floor", "attention", "base", "base-cached", "lagged", "ema")
SSTOKEN_VARIANTS = ("attention", "base", "base-cached", "lagged", "ema")
SCALES = {
    "toy": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab=200,
    ),  # for the smoke tests only
    # big enough on 2 CPU cores that the matrix products dominate, small enough for a few minutes
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab=4000,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab=128256,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab=128256,
    ),
}
# the selection settings of each SSTokenTrainer variant (on top of attention_warmup_ratio=0)
SELECTION = {
    "attention": dict(selection_method="attention"),
    "base": dict(history="base"),
    "base-cached": dict(history="base"),  # + history_cache_dir, history_cache_batch_size (build_trainer)
    "lagged": dict(history="lagged", history_update_steps=50),
    "ema": dict(history="ema", history_update_steps=1, history_ema_alpha=0.98),
}


class FloorTrainer(SFTTrainer):
    """Plain SFT plus one no-grad forward of the base model per micro-batch: an on-the-fly history's floor."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                model(**{**inputs, "use_cache": False}, fused_lm_head=True)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def synthetic_data(vocab_words: int, seq_len: int, examples: int, seed: int = 0):
    """Fixed-length prompt-completion pairs of random words: 3/4 prompt, 1/4 completion, no padding noise."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_words)]
    prompt_len, completion_len = (seq_len * 3) // 4, seq_len - (seq_len * 3) // 4 - 1  # -1: TRL appends EOS
    rows = [
        {
            "prompt": " ".join(rng.choices(words, k=prompt_len)),
            "completion": " " + " ".join(rng.choices(words, k=completion_len)),
        }
        for _ in range(examples)
    ]
    return rows, words


def llama_config(shape: dict, tokenizer, max_positions: int, attn_implementation: str = "sdpa") -> LlamaConfig:
    """A Llama config of `shape` (a SCALES entry or the same keys) for `tokenizer`'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


def lora(r: int = 16) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def build_trainer(
    variant,
    model,
    tokenizer,
    rows,
    *,
    output_dir,
    cache_dir,
    seq_len,
    batch,
    steps,
    device,
    bf16=None,
    peft_config=None,
    **overrides,
):
    """The trainer of one variant on `model` (which it takes over), gradient checkpointing on, LoRA r=16 by default."""
    common = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_checkpointing=True,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        max_length=seq_len,
        bf16=(device == "cuda") if bf16 is None else bf16,
        use_cpu=device == "cpu",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    common.update(overrides)
    peft_config = peft_config or lora()
    dataset = Dataset.from_list(rows)
    if variant in ("sft", "floor"):
        trainer_class = SFTTrainer if variant == "sft" else FloorTrainer
        return trainer_class(
            model=model,
            args=SFTConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    selection = dict(attention_warmup_ratio=0.0, **SELECTION[variant])
    if variant == "base-cached":
        selection.update(history_cache_dir=cache_dir, history_cache_batch_size=2 * batch)
    return SSTokenTrainer(
        model=model,
        args=SSTokenConfig(**common, **selection),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class AttentionTimer:
    """Times every call of the attention statistic (CUDA events on a GPU, wall clock on the CPU).

    INTERNAL DEPENDENCY: wraps `trl_sstoken.attention.capture.context_attention_mass` in that module's namespace, so it relies
    on `AttentionCapture.record` looking the function up there at call time. If the trainer stops doing so, the timer
    simply counts no calls (`calls == 0`), which the benchmarks report as "not instrumented" instead of a 0% share.
    """

    def __init__(self, device):
        import trl_sstoken.attention.capture as module

        self.device, self.module = device, module
        self.original = module.context_attention_mass
        self.calls = 0
        self._pending = []  # (start event, end event) on CUDA, seconds on the CPU

        def timed(*args, **kwargs):
            self.calls += 1
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = self.original(*args, **kwargs)
                end.record()
                self._pending.append((start, end))
            else:
                began = time.perf_counter()
                result = self.original(*args, **kwargs)
                self._pending.append(time.perf_counter() - began)
            return result

        module.context_attention_mass = timed

    def take_seconds(self) -> float:
        """Seconds spent in the statistic since the last call (after the step's final synchronisation)."""
        if self.device == "cuda":
            seconds = sum(start.elapsed_time(end) for start, end in self._pending) / 1000.0
        else:
            seconds = sum(self._pending)
        self._pending = []
        return seconds

    def remove(self):
        self.module.context_attention_mass = self.original


def prepare_history_cache(trainer) -> bool:
    """Builds (or loads) a cached base history now, so that its pass is not part of a timed step; True if it ran.

    INTERNAL DEPENDENCY: calls `SSTokenTrainer._prepare_history_cache` where it exists. Without it nothing breaks: the
    trainer builds the cache lazily in its first training step, which is then the (untimed) warm-up step.
    """
    prepare = getattr(trainer, "_prepare_history_cache", None)
    if prepare is None or getattr(trainer.args, "history_cache_dir", None) is None:
        return False
    prepare()
    return True


class Runner:
    """Runs one optimizer step at a time of a trainer, as its training loop would (GA = 1), through public Trainer
    methods: the model and optimizer prepared by the trainer's accelerator (autocast under bf16, as in `train()`),
    `get_batch_samples`, `training_step`, gradient clipping, and the callbacks' `on_step_end` (which moves a lagged or
    EMA history forward)."""

    def __init__(self, name, trainer, device, attention_timer: AttentionTimer | None = None):
        self.name, self.trainer, self.device = name, trainer, device
        total = trainer.args.max_steps
        trainer.create_optimizer_and_scheduler(num_training_steps=total)
        trainer.state.max_steps = total
        self.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = self.model
        self.model.train()
        self.batches = itertools.cycle(trainer.get_train_dataloader())
        self.timer = attention_timer
        self.times, self.attention_times, self.tokens = [], [], []

    def step(self):
        trainer = self.trainer
        samples, num_items = trainer.get_batch_samples(iter([next(self.batches)]), 1, trainer.args.device)
        inputs = samples[0]
        tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        sync(self.device)
        if self.timer is not None:
            self.timer.take_seconds()  # drop anything recorded outside this step
        start = time.perf_counter()
        trainer.training_step(self.model, inputs, num_items)
        if trainer.args.max_grad_norm:
            trainer.accelerator.clip_grad_norm_(self.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        trainer.control = trainer.callback_handler.on_step_end(trainer.args, trainer.state, trainer.control)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        self.attention_times.append(self.timer.take_seconds() if self.timer is not None else 0.0)
        self.tokens.append(tokens)
        return tokens
