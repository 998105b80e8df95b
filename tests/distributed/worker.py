"""One launch of the distributed tier: every scenario of several engines, one after another, in the same processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py OUT ENGINE/SCENARIO [...]
    python tests/distributed/worker.py OUT single/SCENARIO [...]      # the single-process reference, global batch 4

ENGINE is one of `ENGINES` (ddp, fsdp1, fsdp2, fsdp2sharded, zero2, zero3) or `single`. A scenario is `sft`
(plain SFTTrainer), `full`, `base`, `cached`, `lagged`, `ema` (sstoken with that history), or `resume-<history>`: a
run that checkpoints at step 3, is aborted at step 4 (every process raises, as a killed job leaves its checkpoint
behind), and is resumed from that checkpoint by a fresh trainer to the last step. Starting a launch (importing
torch, transformers, trl, deepspeed and joining the process group) costs more than an engine's scenarios, so a
launch runs many, of several engines: they share the process group, and between two engines `reset_engine` clears
what one leaves behind for the next (accelerate's singletons, transformers' DeepSpeed config, the environment).

For each scenario the main process writes OUT/<engine>/<scenario>.json (status, losses and sstoken/rel_mean per
step, or the error) and OUT/<engine>/<scenario>.safetensors (the trained adapter, gathered whole). A scenario that
raises is recorded and the next one runs, so a refusal at construction is a result, not a crash of the launch; a
crash (a segfault) loses only the scenarios after it, and the test names them.
"""

import faulthandler
import gc
import json
import os
import signal
import sys
import time
import traceback


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import cpu_engines  # noqa: E402


cpu_engines.install()

import datasets  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


GLOBAL_BATCH = 4
STEPS = 6
CHECKPOINT_STEP = 3
ROWS_FILE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "trl_sstoken", "data", "quickstart.jsonl")

_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}
ENGINES = {
    "ddp": {},
    "fsdp1": dict(
        fsdp="full_shard auto_wrap",
        fsdp_config={
            "fsdp_version": 1,
            "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
            "use_orig_params": True,
            "sync_module_states": False,  # its param_init_fn asks for a GPU; every process builds the same model
            # FULL_STATE_DICT: torch's FSDP1 segfaults gathering it on the CPU (plain SFTTrainer's final save too)
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    ),
    "fsdp2": dict(
        fsdp="full_shard auto_wrap",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]},
    ),
    "fsdp2sharded": dict(
        fsdp="full_shard auto_wrap",
        fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    ),
    "zero2": dict(deepspeed={**_DEEPSPEED, "zero_optimization": {"stage": 2}}),
    "zero3": dict(
        deepspeed={
            **_DEEPSPEED,
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        }
    ),
}


def rows():
    with open(ROWS_FILE) as handle:
        return [json.loads(line) for line in handle if line.strip()][: GLOBAL_BATCH * STEPS]


def tokenizer_for(data):
    texts = [row["prompt"] + row["completion"] for row in data]
    return build_tiny_tokenizer(texts)


def settings(engine: str, scenario: str, out_dir: str, world_size: int) -> dict:
    history = scenario.split("-")[-1]
    values = dict(
        output_dir=out_dir,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=not engine.startswith("zero"),  # use_cpu switches DeepSpeed off; the shim gives it gloo
        save_strategy="steps" if scenario.startswith("resume") else "no",
        save_steps=CHECKPOINT_STEP,
        max_length=64,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_grad_norm=1e9,  # no clipping: its norm would be another cross-process reduction to compare
        **ENGINES.get(engine, {}),
    )
    if history == "sft":
        return values
    values.update(attention_warmup_ratio=0.0, history_update_steps=2, history_ema_alpha=0.5)
    if scenario == "full":
        values.update(selection_method="full")
    elif history == "cached":
        values.update(history="base", history_cache_dir=os.path.join(out_dir, "history-cache"))
    else:
        values.update(history=history)
    return values


class AbortAt(TrainerCallback):
    """Stops the run at the start of `step` on every process, as a kill after the checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"aborted at step {self.step}")


def build(engine, scenario, out_dir, data, tokenizer, world_size):
    model = build_tiny_model(tokenizer)
    values = settings(engine, scenario, out_dir, world_size)
    plain = scenario.split("-")[-1] == "sft"
    trainer = (SFTTrainer if plain else SSTokenTrainer)(
        model=model,
        args=(SFTConfig if plain else SSTokenConfig)(**values),
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    trainer.remove_callback(PrinterCallback)
    with torch.no_grad():  # an informative REL from the first step: the adapter differs from the base
        generator = torch.Generator().manual_seed(1)
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return trainer


def full_adapter(trainer) -> dict:
    """The trained adapter, whole, on every process, whatever the engine sharded."""
    wrapped = trainer.model_wrapped
    named = [(n, p) for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if ".default." in n]
    if trainer.is_deepspeed_enabled and any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone().contiguous() for n, p in named}
    if trainer.is_fsdp_enabled and type(wrapped).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped):
            named = [(n, p) for n, p in wrapped.named_parameters() if ".default." in n]
            return {_clean(n): p.detach().clone().contiguous() for n, p in named}
    return {
        n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone().contiguous() for n, p in named
    }


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1 if name.startswith("module.") else 0)


def per_step(trainer, key) -> list:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def run_scenario(engine, scenario, out, data, tokenizer, world_size) -> dict:
    out_dir = os.path.join(out, f"run-{scenario}")
    trainer = build(engine, scenario, out_dir, data, tokenizer, world_size)
    result = {
        "fsdp": bool(trainer.is_fsdp_enabled),
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "world_size": trainer.accelerator.num_processes,
    }
    if scenario.startswith("resume"):
        trainer.add_callback(AbortAt(CHECKPOINT_STEP + 1))
        try:
            trainer.train()
            raise RuntimeError("the run was not aborted")
        except KeyboardInterrupt:
            pass
        result["losses_before_abort"] = per_step(trainer, "loss")
        del trainer
        trainer = build(engine, scenario, out_dir, data, tokenizer, world_size)
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer.train()
    result["sharded"] = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in trainer.model.parameters())
    result["losses"] = per_step(trainer, "loss")
    result["rel"] = per_step(trainer, "sstoken/rel_mean")
    result["steps"] = per_step(trainer, "step")
    adapter = full_adapter(trainer)
    final = os.path.join(out_dir, "final")
    try:  # recorded apart: a failing final save must not hide the training results
        trainer.save_model(final)
        result["final_files"] = sorted(os.listdir(final)) if os.path.isdir(final) else []
    except Exception as error:  # noqa: BLE001
        result["final_save_error"] = f"{type(error).__name__}: {error}"[:2000]
    if trainer.accelerator.is_main_process:
        save_file(adapter, os.path.join(out, f"{scenario}.safetensors"))
    trainer.accelerator.wait_for_everyone()
    return result


def reset_engine(environment: dict) -> None:
    """Clears what one engine's trainers leave in the process for the next engine's.

    Every `TrainingArguments` already resets accelerate's `AcceleratorState` and `PartialState` when it sets up its
    device (which is why one engine's scenarios can follow each other); between engines this also drops the
    `GradientState` (accelerate's tests reset it too), transformers' global ZeRO-3 config (`is_deepspeed_zero3_enabled`
    would otherwise build the next engine's model under `zero.Init`) and any `ACCELERATE_*`/`FSDP_*` variable an
    engine set. The process group stays: torch's, which DeepSpeed's comm adopts when it finds it initialised.
    """
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    gc.collect()
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ.clear()
    os.environ.update(environment)


def main(out, runs):
    faulthandler.enable()  # a crash of the engine prints where it happened
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung process is
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    data = rows()
    tokenizer = tokenizer_for(data)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    environment = dict(os.environ)
    previous = None
    for run in runs:
        engine, scenario = run.split("/")
        if previous is not None and engine != previous:
            reset_engine(environment)
        previous = engine
        engine_out = os.path.join(out, engine)
        os.makedirs(engine_out, exist_ok=True)
        began = time.monotonic()
        try:
            result = {"status": "ok", **run_scenario(engine, scenario, engine_out, data, tokenizer, world_size)}
        except Exception as error:  # noqa: BLE001 - recorded as the scenario's result; the next one runs
            result = {"status": "error", "error": f"{type(error).__name__}: {error}"[:3000]}
            result["traceback"] = traceback.format_exc()[-6000:]
        result.update(engine=engine, seconds=round(time.monotonic() - began, 1))
        if rank == 0:
            with open(os.path.join(engine_out, f"{scenario}.json"), "w") as handle:
                json.dump(result, handle, indent=1)
        print(f"[{engine} rank {rank}] {scenario}: {result['status']} {result.get('error', '')[:300]}", flush=True)  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    sys.stdout.flush()
    os._exit(0)  # every result is written: skip the interpreter's (and the process group's) slow teardown
