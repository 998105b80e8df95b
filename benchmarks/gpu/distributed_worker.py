"""Worker of the GPU check's distributed stage, run under `accelerate launch --num_processes 1` (FSDP, ZeRO-3, or
plain on the CPU): LoRA + sstoken with each history mode for a few steps, a checkpoint at the last step, then the
final save. One process cannot show scaling; it runs the wrapping, gathering and checkpoint code that
docs/multi-gpu.md only predicts. Writes its JSON after every mode."""

import argparse
import math
import os
import sys
import time
import traceback


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from benchmarks.gpu import models  # noqa: E402
from benchmarks.gpu.record import log, write_json  # noqa: E402
from benchmarks.gpu.settings import HISTORY_MODES, SCALES, load  # noqa: E402
from benchmarks.perf.harness import lora  # noqa: E402
from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scale", choices=list(SCALES), required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--modes", nargs="+", default=list(HISTORY_MODES))
    args = parser.parse_args()
    s = load(args.scale)
    cuda = torch.cuda.is_available() and s["device"] == "cuda"
    device = "cuda" if cuda else "cpu"
    dtype = models.dtype_of(s)
    shape, seq, steps = s["distributed_shape"], s["distributed_seq"], s["distributed_steps"]
    import accelerate
    from accelerate import PartialState

    state = PartialState()
    result = {
        "status": "running",
        "accelerate": accelerate.__version__,
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "device": device,
        "modes": {},
    }
    write_json(args.out, result)
    rows, tokenizer = models.data(shape["vocab"], seq, 2 * steps * 2)
    dataset = Dataset.from_list(rows)
    os.makedirs(args.work, exist_ok=True)
    checkpoint = models.random_checkpoint(args.work, "dist", shape, tokenizer, 4 * seq, "cpu", dtype)
    for mode in args.modes:
        entry = {"status": "running"}
        result["modes"][mode] = entry
        began = time.time()
        try:
            run_mode(entry, mode, checkpoint, tokenizer, dataset, device, dtype, seq, steps, args.work, s)
            entry["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - recorded; the next mode still runs
            # an engine's refusal when the trainer is built (trl_sstoken/engines.py) is a result, not a failure
            refused = isinstance(error, ValueError) and "is not supported" in str(error)
            entry.update(
                status="refused" if refused else "failed",
                error=f"{type(error).__name__}: {error}"[:2000],
                traceback=traceback.format_exc()[-4000:],
            )
        entry["seconds"] = round(time.time() - began, 1)
        log("distributed", f"{result['distributed_type']} {mode}: {entry['status']} {entry.get('error', '')[:300]}")
        write_json(args.out, result)
        models.free(device)
    result["status"] = "ok" if all(e["status"] in ("ok", "refused") for e in result["modes"].values()) else "failed"
    write_json(args.out, result)


def run_mode(entry, mode, checkpoint, tokenizer, dataset, device, dtype, seq, steps, work, s):
    output_dir = os.path.join(work, f"run-{mode}")
    model = models.load_model(checkpoint, "none", dtype, device, "sdpa")
    config = SSTokenConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=steps,
        report_to="none",
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        max_length=seq,
        gradient_checkpointing=True,
        attention_warmup_ratio=0.0,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        history="base" if mode == "base-cached" else mode,
        history_update_steps=1,
        history_cache_dir=os.path.join(output_dir, "history-cache") if mode == "base-cached" else None,
    )
    trainer = SSTokenTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora(8)
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    entry.update(
        is_fsdp_enabled=bool(trainer.is_fsdp_enabled), is_deepspeed_enabled=bool(trainer.is_deepspeed_enabled)
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    entry["losses"] = losses
    entry["selected_fraction"] = [
        e["sstoken/selected_fraction"] for e in trainer.state.log_history if "sstoken/selected_fraction" in e
    ]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), f"losses {losses}"
    checkpoint_dir = os.path.join(output_dir, f"checkpoint-{steps}")
    assert os.path.isdir(checkpoint_dir), f"no {checkpoint_dir}"
    entry["checkpoint_files"] = sorted(_listing(checkpoint_dir))
    if mode in ("lagged", "ema"):
        assert any(path.startswith("history/") for path in entry["checkpoint_files"]), (
            "the checkpoint has no history/ adapter"
        )
    final = os.path.join(output_dir, "final")
    trainer.save_model(final)
    entry["final_files"] = sorted(_listing(final))
    assert any("adapter_model" in path for path in entry["final_files"]), "the final save has no adapter"
    assert not any(path.startswith("history/") for path in entry["final_files"]), "the final save kept history/"
    del trainer, model


def _listing(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            yield os.path.relpath(os.path.join(root, name), directory)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # the JSON is written: skip interpreter teardown
