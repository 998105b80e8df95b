"""The stages of the GPU check; `check.py` runs each in its own process:

    python -m benchmarks.gpu.stages STAGE --out DIR --scale gpu|toy --work DIR --deadline EPOCH_SECONDS

Every sizing comes from `settings.py`; only the public API of trl_sstoken is used (SSTokenConfig, SSTokenTrainer,
trl_sstoken.attention.capture), plus the two isolated internals of `benchmarks/perf/harness.py`.
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.gpu.record import Skip, StageRecorder  # noqa: E402
from benchmarks.gpu.settings import SCALES, load  # noqa: E402


REQUIRED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "trl_sstoken")
OPTIONAL = (
    "bitsandbytes",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "pyarrow",
    "triton",
    "flash_attn",
    "deepspeed",
    "numpy",
)


# ----------------------------------------------------------------------------------------------------------- env


def stage_env(rec, s, args):
    versions, errors = {}, {}
    rec.data["versions"], rec.data["import_errors"] = versions, errors

    def imports(entry):
        versions["python"] = sys.version.split()[0]
        for name in REQUIRED + OPTIONAL:
            if name in ("flash_attn", "deepspeed", "triton") and importlib.util.find_spec(name) is None:
                versions[name] = None  # absent is an answer, not an error
                continue
            try:
                module = importlib.import_module(name)
                versions[name] = getattr(module, "__version__", "unknown")
            except Exception as error:  # noqa: BLE001
                errors[name] = f"{type(error).__name__}: {error}"[:1000]
        from trl import SFTTrainer  # noqa: F401

        from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: F401

        missing = [name for name in REQUIRED if name in errors]
        if s["device"] == "cuda" and "bitsandbytes" in errors:
            missing.append("bitsandbytes")
        entry["versions"] = versions
        if missing:
            raise RuntimeError(f"required packages do not import: {', '.join(missing)}: {errors}")

    rec.run("imports", imports)
    if rec.data["substeps"]["imports"]["status"] != "ok":
        return

    def device(entry):
        import torch

        entry["torch_cuda"] = torch.version.cuda
        entry["cuda_available"] = torch.cuda.is_available()
        if s["device"] != "cuda":
            entry["note"] = "CPU scale: no CUDA device is used"
            return
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False on the GPU scale")
        properties = torch.cuda.get_device_properties(0)
        entry.update(
            name=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            total_memory_bytes=properties.total_memory,
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            entry["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            entry["nvidia_smi"] = f"unavailable: {error}"

    rec.run("device", device)

    def bitsandbytes(entry):
        import bitsandbytes as bnb
        import torch

        from benchmarks.gpu.models import dtype_of

        device, dtype = s["device"], dtype_of(s)
        weight = torch.randn(512, 256, dtype=dtype, device=device)
        packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
        restored = bnb.functional.dequantize_4bit(packed, state)
        entry["nf4_roundtrip_relative_error"] = float(
            (restored.float() - weight.float()).norm() / weight.float().norm()
        )
        layer = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(4, 256, dtype=dtype, device=device)
        y = layer(x)
        entry["linear4bit_vs_dequantized_max_error"] = float(
            (y.float() - x.float() @ restored.float().t()).abs().max()
        )
        entry["linear4bit_output_finite"] = bool(torch.isfinite(y).all())
        assert entry["nf4_roundtrip_relative_error"] < 0.2, entry
        assert entry["linear4bit_output_finite"], entry

    rec.run("bitsandbytes", bitsandbytes)

    def attention_kernels(entry):
        import torch
        import torch.nn.functional as F
        from transformers.utils import is_flash_attn_2_available

        from benchmarks.gpu.models import dtype_of

        entry["flash_attention_2_available"] = bool(is_flash_attn_2_available())
        entry["triton_importable"] = importlib.util.find_spec("triton") is not None
        # TRL's fused LM head projects only the labelled positions on CUDA with Triton (trl/trainer/utils.py)
        entry["fused_head_compact_path_expected"] = s["device"] == "cuda" and entry["triton_importable"]
        q = torch.randn(2, 8, 128, 64, dtype=dtype_of(s), device=s["device"])
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        reference = F.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
        entry["sdpa_max_error_vs_float64"] = float((out.double() - reference).abs().max())
        assert torch.isfinite(out).all()

    rec.run("attention_kernels", attention_kernels)


# ------------------------------------------------------------------------------------------------------- prepare


def stage_prepare(rec, s, args):
    """In the background while env and correctness run (check.py starts it): the random checkpoints of the cost and
    memory-cap shapes, so that those stages do not spend their budget initialising and writing 16 GB."""
    from benchmarks.gpu import models

    device, dtype = s["device"], models.dtype_of(s)
    shapes = {}
    for label, shape, _ in (*s["cost_shapes"], s["cap_shape"]):
        shapes.setdefault(label, shape)
    for label, shape in shapes.items():

        def write(entry, label=label, shape=shape):
            _, tokenizer = models.data(shape["vocab"], s["cost_seq"], 1)
            path = models.random_checkpoint(
                args.work, label, shape, tokenizer, max(s["share_seq_lens"]), device, dtype
            )
            entry["path"] = path
            entry["bytes"] = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
            models.free(device)

        rec.run(f"checkpoint-{label}", write)


# --------------------------------------------------------------------------------------------------- correctness


def _sstoken_config(s, output_dir, mode, steps, batch, seq, **overrides):
    from trl_sstoken import SSTokenConfig

    cuda = s["device"] == "cuda"
    settings = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        max_length=seq,
        gradient_checkpointing=True,
        attention_warmup_ratio=0.0,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        history="lagged" if mode == "lagged" else "ema" if mode == "ema" else "base",
        history_update_steps=1,
    )
    if mode == "base-cached":
        settings["history_cache_dir"] = os.path.join(output_dir, "history-cache")
    settings.update(overrides)
    return SSTokenConfig(**settings)


def quiet(trainer):
    """No per-step log dicts on stdout (they would crowd the progress lines out of the device tool's output tail)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _attention_skip_reason(s, attn):
    if attn != "flash_attention_2":
        return None
    if s["device"] != "cuda":
        return "FlashAttention-2 runs on CUDA only"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "the flash_attn package is not installed on this machine (transformers' is_flash_attn_2_available)"
    return None


def stage_correctness(rec, s, args):
    import torch
    from datasets import Dataset

    from benchmarks.gpu import models
    from benchmarks.perf.harness import lora
    from trl_sstoken import SSTokenTrainer

    device, dtype = s["device"], models.dtype_of(s)
    shape, seq, batch, steps = s["small_shape"], s["small_seq"], s["small_batch"], s["small_steps"]
    rows, tokenizer = models.data(shape["vocab"], seq, batch * steps * 2)
    dataset = Dataset.from_list(rows)
    checkpoint = models.random_checkpoint(args.work, "small", shape, tokenizer, max(4 * seq, 2048), device, dtype)
    rec.data.update(shape=shape, seq_len=seq, batch=batch, steps=steps, dtype=str(dtype), device=device)

    def train(quantization, attn, mode, packed=False):
        def run(entry):
            reason = _attention_skip_reason(s, attn)
            if reason:
                raise Skip(reason)
            model = models.load_model(checkpoint, quantization, dtype, device, attn)
            if quantization == "nf4":
                assert models.is_quantized(model), "the model did not load in 4 bits"
            # packed: bins of twice the row length, so that two sequences really share a row (padding-free under
            # the default "bfd" strategy: position_ids and cu_seq_lens instead of an attention mask)
            extra = dict(packing=True, max_length=2 * seq) if packed else {}
            trainer = SSTokenTrainer(
                model=model,
                args=_sstoken_config(
                    s,
                    os.path.join(args.work, f"c-{quantization}-{attn}-{mode}{'-packed' if packed else ''}"),
                    mode,
                    steps,
                    batch,
                    seq,
                    **extra,
                ),
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=lora(8),
            )
            quiet(trainer)
            named = dict(trainer.model.named_parameters())
            frozen_before = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            began = time.time()
            trainer.train()
            entry["train_seconds"] = round(time.time() - began, 2)
            losses = _logged(trainer, "loss")
            entry["losses"] = losses
            entry["selected_fraction"] = _logged(trainer, "sstoken/selected_fraction")
            if packed:
                first = next(iter(trainer.get_train_dataloader()))
                entry["packed_batch_keys"] = sorted(first)
                if "position_ids" in first:  # sequences per packed row: restarts of position_ids at 0
                    entry["sequences_per_row"] = (
                        float((first["position_ids"] == 0).sum()) / first["position_ids"].shape[0]
                    )
            entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
            assert len(losses) == steps and all(math.isfinite(v) for v in losses), f"losses {losses}"
            assert entry["selected_fraction"] and all(0 < f < 1 for f in entry["selected_fraction"]), entry
            # bitsandbytes' CPU backend repacks a 4-bit weight in place (same values, another layout) on its first
            # eval-mode no-grad forward, which the history cache pass is: compare those only on CUDA
            repacked = {
                n
                for n in frozen_before
                if getattr(getattr(named[n], "quant_state", None), "packing_format_for_cpu", False)
            }
            entry["cpu_repacked_4bit_weights"] = len(repacked)
            changed = [
                n
                for n, before in frozen_before.items()
                if n not in repacked and not torch.equal(named[n].detach(), before)
            ]
            assert not changed, f"frozen (base) parameters changed: {changed[:5]}"
            trained = [p for n, p in named.items() if ".default." in n and "lora_B" in n]
            assert trained and any(p.detach().abs().sum() > 0 for p in trained), "the adapter did not train"
            optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            history = [p for n, p in named.items() if "lora_" in n and ".default." not in n]
            entry["history_adapter_parameters"] = len(history)
            assert not any(id(p) in optimized for p in history), "a history parameter is in the optimizer"
            if mode in ("lagged", "ema"):
                assert history and not any(p.requires_grad for p in history), "no frozen history adapter"
            del trainer, model
            models.free(device)

        return run

    for quantization in s["quantizations"]:
        for attn in s["attentions"]:
            for mode in s["correctness_modes"]:
                rec.run(f"train-{quantization}-{attn}-{mode}", train(quantization, attn, mode), needs_seconds=3)
            rec.run(
                f"train-{quantization}-{attn}-packed-base",
                train(quantization, attn, "base", packed=True),
                needs_seconds=3,
            )

    rec.run("attention-kernel-vs-float64", lambda entry: _kernel_check(entry, s))
    for attn in s["attentions"]:
        for model_dtype in dict.fromkeys(("float32", s["dtype"])):
            rec.run(
                f"attention-capture-{attn}-{model_dtype}-vs-float64-eager",
                lambda entry, attn=attn, model_dtype=model_dtype: _capture_check(
                    entry, s, checkpoint, tokenizer, attn, getattr(torch, model_dtype)
                ),
                needs_seconds=3,
            )
    for quantization in s["quantizations"]:
        rec.run(
            f"full-equals-sft-{quantization}",
            lambda entry, q=quantization: _full_equals_sft(entry, s, args, checkpoint, tokenizer, dataset, q),
            needs_seconds=5,
        )


def _kernel_check(entry, s):
    """context_attention_mass on random q/k on the device against an explicit float64 computation."""
    import torch

    from trl_sstoken.attention.capture import context_attention_mass

    shape = s["attention_kernel_check"]
    heads, kv_heads, dim, length = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["seq"]
    device = s["device"]
    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(2, heads, length, dim, device=device, generator=generator)
    key = torch.randn(2, kv_heads, length, dim, device=device, generator=generator)
    context = torch.zeros(2, length, dtype=torch.bool, device=device)
    context[:, : (3 * length) // 4] = True
    valid = torch.ones(2, length, dtype=torch.bool, device=device)
    valid[1, length - length // 8 :] = False  # right padding in the second row
    needed = ~context & valid
    full_key = key.double().repeat_interleave(heads // kv_heads, dim=1)
    logits = query.double() @ full_key.transpose(-1, -2) * dim**-0.5
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None] & valid[:, None, None, :]
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = (weights * context[:, None, None, :].double()).sum(-1).mean(1)
    for name, dtype in (("float32", torch.float32), (s["dtype"], getattr(torch, s["dtype"]))):
        q, k = query.to(dtype), key.to(dtype)
        reference = expected
        if dtype != torch.float32:  # compare against the float64 statistic of the rounded inputs
            rk = k.double().repeat_interleave(heads // kv_heads, dim=1)
            rl = (q.double() @ rk.transpose(-1, -2) * dim**-0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
            reference = (rl * context[:, None, None, :].double()).sum(-1).mean(1)
        got = context_attention_mass(
            q, k, context=context, key_valid=valid, scaling=dim**-0.5, query_needed=needed, chunk_size=256
        )
        error = float((got.double() - reference)[needed].abs().max())
        entry[f"max_abs_error_{name}"] = error
        assert error < 1e-4, f"{name}: max abs error {error}"


def _capture_check(entry, s, checkpoint, tokenizer, attn, model_dtype):
    """The statistic captured inside the model's forward (AttentionCapture) against float64 eager attention weights of
    the same weights, each row run alone and unpadded; first and last layer, right padding, chunk boundaries."""
    import copy

    import torch

    from benchmarks.gpu import models
    from trl_sstoken.attention.capture import AttentionCapture

    reason = _attention_skip_reason(s, attn)
    if reason:
        raise Skip(reason)
    if attn == "flash_attention_2" and model_dtype == torch.float32:
        raise Skip("FlashAttention-2 has no float32 kernel")
    device, length = s["device"], s["attention_check_seq"]
    model = models.load_model(checkpoint, "none", model_dtype, device, attn).eval()
    reference_model = copy.deepcopy(model).double()
    reference_model.set_attn_implementation("eager")
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, len(tokenizer), (2, length), generator=generator).to(device)
    attention_mask = torch.ones(2, length, dtype=torch.long, device=device)
    attention_mask[1, length - length // 5 :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, tokenizer.pad_token_id)
    valid = attention_mask.bool()
    context = torch.zeros_like(valid)
    context[0, : (3 * length) // 4] = True
    context[1, : (3 * (length - length // 5)) // 4] = True
    needed = valid & ~context
    tolerance = 1e-4 if model_dtype == torch.float32 else 5e-2
    layers = (0, model.config.num_hidden_layers - 1)
    for layer in layers:
        expected = torch.zeros(valid.shape, dtype=torch.float64, device=device)
        for row in range(2):
            with torch.no_grad():
                out = reference_model(input_ids=input_ids[row, valid[row]][None], output_attentions=True)
            weights = out.attentions[layer][0]
            expected[row, valid[row]] = (weights * context[row, valid[row]].double()).sum(-1).mean(0)
        capture = AttentionCapture(model, layer, chunk_size=128)
        try:
            with torch.no_grad(), capture.armed(context, valid, query_needed=needed):
                model(input_ids=input_ids, attention_mask=attention_mask)
            got = capture.take()
        finally:
            capture.remove()
        error = float((got.double() - expected)[needed].abs().max())
        entry[f"layer_{layer}_max_abs_error"] = error
        entry[f"layer_{layer}_mean_statistic"] = float(expected[needed].mean())
        assert error < tolerance, f"layer {layer}: max abs error {error} > {tolerance}"
    entry["tolerance"] = tolerance
    del model, reference_model
    models.free(device)


def _full_equals_sft(entry, s, args, checkpoint, tokenizer, dataset, quantization):
    """selection_method="full" against plain SFTTrainer: one batch's loss and gradients, then three trained steps."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from benchmarks.gpu import models
    from benchmarks.perf.harness import lora
    from trl_sstoken import SSTokenTrainer

    device, dtype = s["device"], models.dtype_of(s)
    seq, batch, steps = s["small_seq"], s["small_batch"], s["small_steps"]

    def make(cls):
        model = models.load_model(checkpoint, quantization, dtype, device, "sdpa")
        common = dict(
            output_dir=os.path.join(args.work, f"full-{quantization}-{cls.__name__}"),
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=device == "cuda",
            use_cpu=device != "cuda",
            max_length=seq,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=True,
        )
        config = (
            SFTConfig(**common)
            if cls is SFTTrainer
            else _sstoken_config(
                s, common["output_dir"], "base", steps, batch, seq, selection_method="full", learning_rate=1e-3
            )
        )
        torch.manual_seed(0)
        trainer = quiet(
            cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora(8))
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero B matrices, the same in both, so that every adapter weight gets a gradient
            for name, param in sorted(trainer.model.named_parameters()):
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
        return trainer

    def loss_and_grads(trainer):
        batch_inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        trainer.model.zero_grad()
        with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, dict(batch_inputs))
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return float(loss), grads, batch_inputs["input_ids"].cpu()

    ours, plain = make(SSTokenTrainer), make(SFTTrainer)
    loss, grads, ids = loss_and_grads(ours)
    expected_loss, expected_grads, expected_ids = loss_and_grads(plain)
    assert torch.equal(ids, expected_ids), "the two trainers saw different first batches"
    entry["loss"], entry["sft_loss"] = loss, expected_loss
    entry["loss_relative_difference"] = abs(loss - expected_loss) / max(abs(expected_loss), 1e-12)
    assert grads.keys() == expected_grads.keys() and grads, "different trainable parameters"
    worst_relative, worst_cosine = 0.0, 1.0
    for name, grad in grads.items():
        reference = expected_grads[name]
        scale = float(reference.abs().max())
        if scale > 0:
            worst_relative = max(worst_relative, float((grad - reference).abs().max()) / scale)
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0)
            worst_cosine = min(worst_cosine, float(cosine))
    entry["grad_worst_relative_max_difference"] = worst_relative
    entry["grad_worst_cosine"] = worst_cosine
    exact = device != "cuda" and dtype == torch.float32
    tolerance = 1e-5 if exact else 2e-2
    entry["tolerance"] = tolerance
    assert entry["loss_relative_difference"] < tolerance, entry
    assert worst_relative < max(tolerance, 5e-2 if not exact else 0) and worst_cosine > 0.999, entry
    ours.model.zero_grad(set_to_none=True)
    plain.model.zero_grad(set_to_none=True)
    ours.train()
    plain.train()
    trained, expected = _logged(ours, "loss"), _logged(plain, "loss")
    entry["trained_losses"], entry["sft_trained_losses"] = trained, expected
    assert len(trained) == len(expected) == steps
    assert all(abs(a - b) <= 3 * tolerance * max(abs(b), 1e-6) for a, b in zip(trained, expected, strict=True)), entry
    del ours, plain
    models.free(device)


# ---------------------------------------------------------------------------------------------------------- cost


def stage_cost(rec, s, args):
    from benchmarks.perf.harness import AttentionTimer

    timer = AttentionTimer(s["device"])
    rec.data.update(
        seq_len=s["cost_seq"],
        variants=list(s["cost_variants"]),
        warmup_steps=s["cost_warmup"],
        timed_steps=s["cost_steps"],
        quantization="nf4",
        gradient_checkpointing=True,
        lora="r=16, alpha=16, all linear layers",
    )
    rec.run("attention-kernel-alone", lambda entry: _kernel_timing(entry, s))
    # shape by shape, the small one first: if the 8B shape runs out of budget, the 1B figures are all there
    for label, shape, batch in s["cost_shapes"]:
        rec.run(
            f"side-by-side-{label}",
            lambda entry, name=label, sh=shape, b=batch: _side_by_side(entry, rec, s, args, timer, name, sh, b),
            needs_seconds=20,
        )
        rec.run(
            f"attention-share-{label}",
            lambda entry, name=label, sh=shape: _attention_share(entry, rec, s, args, timer, name, sh),
            needs_seconds=20,
        )
    timer.remove()


def _kernel_timing(entry, s):
    """The statistic alone on one layer of each cost shape (3/4 prompt, response rows only), median of 3."""
    import torch

    from benchmarks.gpu.models import dtype_of
    from benchmarks.perf.harness import sync
    from trl_sstoken.attention.capture import context_attention_mass

    device, dtype = s["device"], dtype_of(s)
    for label, shape, _ in s["cost_shapes"]:
        heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        dim = shape["hidden_size"] // heads
        for length in s["kernel_seq_lens"]:
            query = torch.randn(1, heads, length, dim, dtype=dtype, device=device)
            key = torch.randn(1, kv_heads, length, dim, dtype=dtype, device=device)
            context = torch.zeros(1, length, dtype=torch.bool, device=device)
            context[:, : (3 * length) // 4] = True
            valid = torch.ones_like(context)
            times = []
            for _ in range(4):  # the first is a warm-up
                sync(device)
                began = time.perf_counter()
                context_attention_mass(
                    query, key, context=context, key_valid=valid, scaling=dim**-0.5, query_needed=~context
                )
                sync(device)
                times.append(time.perf_counter() - began)
            entry[f"{label}_seq{length}_seconds"] = statistics.median(times[1:])


def _side_by_side(entry, rec, s, args, timer, label, shape, batch):
    import torch

    from benchmarks.gpu import models
    from benchmarks.perf.harness import Runner, build_trainer, prepare_history_cache, sync

    device, dtype = s["device"], models.dtype_of(s)
    seq, warmup, steps = s["cost_seq"], s["cost_warmup"], s["cost_steps"]
    rows, tokenizer = models.data(shape["vocab"], seq, batch * (warmup + steps))
    entry.update(shape=shape, batch=batch, seq_len=seq, tokens_per_step=batch * seq)
    began = time.time()
    checkpoint = models.random_checkpoint(args.work, label, shape, tokenizer, max(s["share_seq_lens"]), device, dtype)
    entry["checkpoint_seconds"] = round(time.time() - began, 1)
    began = time.time()
    source = models.load_model(checkpoint, "nf4", dtype, device)
    entry["load_seconds"] = round(time.time() - began, 1)
    rec.log(f"{label}: checkpoint {entry['checkpoint_seconds']} s, NF4 load {entry['load_seconds']} s")
    runners, resident, copies, variants = [], {}, {}, {}
    entry["variants"] = variants
    for variant in s["cost_variants"]:
        before = models.memory_allocated(device)
        model, copies[variant] = models.clone(source, checkpoint, "nf4", dtype, device)
        trainer = build_trainer(
            variant,
            model,
            tokenizer,
            rows,
            output_dir=os.path.join(args.work, f"cost-{label}-{variant}"),
            cache_dir=os.path.join(args.work, f"cost-{label}-cache"),
            seq_len=seq,
            batch=batch,
            steps=warmup + steps,
            device=device,
        )
        runner = Runner(variant, trainer, device, attention_timer=timer)
        sync(device)
        cache_began = time.perf_counter()
        if prepare_history_cache(trainer):
            sync(device)
            variants.setdefault(variant, {})["caching_pass_seconds"] = time.perf_counter() - cache_began
        after = models.memory_allocated(device)
        resident[variant] = None if before is None else after - before
        runners.append(runner)
    del source
    models.free(device)
    entry["model_copies"] = copies
    extra = {runner.name: [] for runner in runners}
    for round_index in range(warmup + steps):
        for runner in runners:  # interleaved: every variant sees the same machine state
            before = models.memory_allocated(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runner.step()
            if device == "cuda":
                extra[runner.name].append(torch.cuda.max_memory_allocated() - before)
                if round_index == 0:  # the optimizer state, allocated in the first step, stays
                    resident[runner.name] += torch.cuda.memory_allocated() - before
        rec.log(
            f"{label}: round {round_index + 1}/{warmup + steps}: "
            + ", ".join(f"{r.name} {r.times[-1]:.3f}s" for r in runners)
        )
        _summarise(entry, runners, warmup, resident, extra, batch * seq)
        rec.write()
    del runners
    models.free(device)


def _summarise(entry, runners, warmup, resident, extra, tokens_per_step):
    medians = {r.name: statistics.median(r.times[warmup:] or r.times) for r in runners}
    for runner in runners:
        timed = runner.times[warmup:] or runner.times
        median = medians[runner.name]
        attention = statistics.median(runner.attention_times[warmup:] or runner.attention_times)
        result = entry["variants"].setdefault(runner.name, {})
        result.update(
            step_seconds_median=median,
            step_seconds_min=min(timed),
            step_seconds_max=max(timed),
            step_seconds_all=runner.times,
            timed_steps=len(runner.times[warmup:]),
            tokens_per_second=tokens_per_step / median,
            attention_seconds_median=attention,
            attention_share_of_step=attention / median,
            attention_instrumented=runner.timer is not None and runner.timer.calls > 0,
            resident_bytes=resident.get(runner.name),
            step_peak_extra_bytes=max(extra[runner.name]) if extra.get(runner.name) else None,
        )
        if result["resident_bytes"] is not None and result["step_peak_extra_bytes"] is not None:
            result["estimated_peak_alone_bytes"] = result["resident_bytes"] + result["step_peak_extra_bytes"]
        if "sft" in medians:
            result["time_vs_sft"] = median / medians["sft"]
        if "floor" in medians:
            result["time_vs_floor"] = median / medians["floor"]
    sft = entry["variants"].get("sft", {}).get("estimated_peak_alone_bytes")
    if sft:
        for result in entry["variants"].values():
            if result.get("estimated_peak_alone_bytes") is not None:
                result["memory_vs_sft"] = result["estimated_peak_alone_bytes"] / sft


def _attention_share(entry, rec, s, args, timer, label, shape):
    """history="base", batch 1, at each length of share_seq_lens: step time and the statistic's time in it."""
    import itertools

    from benchmarks.gpu import models
    from benchmarks.perf.harness import Runner, build_trainer

    device, dtype = s["device"], models.dtype_of(s)
    lengths, steps = s["share_seq_lens"], s["share_steps"]
    rows, tokenizer = [], None
    for length in lengths:
        part, tokenizer = models.data(shape["vocab"], length, steps + 1, seed=length)
        rows += part
    checkpoint = models.random_checkpoint(args.work, label, shape, tokenizer, max(lengths), device, dtype)
    model = models.load_model(checkpoint, "nf4", dtype, device)
    trainer = build_trainer(
        "base",
        model,
        tokenizer,
        rows,
        output_dir=os.path.join(args.work, f"share-{label}"),
        cache_dir=None,
        seq_len=max(lengths),
        batch=1,
        steps=len(rows) * 2,
        device=device,
    )
    runner = Runner("base", trainer, device, attention_timer=timer)
    by_length = {}
    for batch in trainer.get_train_dataloader():
        by_length.setdefault(int(batch["input_ids"].shape[1]), []).append(batch)
    entry["lengths_found"] = sorted(by_length)
    for length in sorted(by_length):
        runner.batches = itertools.cycle(by_length[length])
        runner.times, runner.attention_times = [], []
        for _ in range(steps + 1):
            runner.step()
        step = statistics.median(runner.times[1:])
        attention = statistics.median(runner.attention_times[1:])
        entry[f"seq{length}"] = dict(
            step_seconds=step,
            attention_seconds=attention,
            share=attention / step,
            tokens_per_second=length / step,
            instrumented=timer.calls > 0,
        )
        rec.log(
            f"{label} at {length} tokens: step {step:.3f} s, statistic {attention:.4f} s ({100 * attention / step:.1f}%)"
        )
        rec.write()
    del runner, trainer, model
    models.free(device)


# ------------------------------------------------------------------------------------------------------ memory cap


def stage_memory_cap(rec, s, args):
    from benchmarks.gpu import models

    label, shape, batch = s["cap_shape"]
    device, dtype = s["device"], models.dtype_of(s)
    rec.data.update(
        shape_label=label,
        batch=batch,
        seq_len=s["cap_seq"],
        cap_gib=s["cap_gib"],
        quantization="nf4",
        cap_applied=device == "cuda",
    )

    def checkpoint(entry):
        _, tokenizer = models.data(shape["vocab"], s["cap_seq"], 1)
        entry["path"] = models.random_checkpoint(
            args.work, label, shape, tokenizer, max(s["share_seq_lens"]), device, dtype
        )
        models.free(device)

    rec.run("checkpoint", checkpoint)
    pending = list(s["cap_modes"])
    while pending:
        group, pending = pending[: s["cap_parallel"]], pending[s["cap_parallel"] :]
        processes = {}
        for mode in group:
            path = os.path.join(args.out, f"cap-{mode}.json")
            if os.path.exists(path):
                os.remove(path)
            command = [
                sys.executable,
                "-m",
                "benchmarks.gpu.stages",
                "memory_cap_mode",
                "--mode",
                mode,
                "--out",
                args.out,
                "--scale",
                args.scale,
                "--work",
                args.work,
                "--deadline",
                str(args.deadline),
            ]
            log = open(os.path.join(args.out, f"cap-{mode}.log"), "w")
            processes[mode] = (subprocess.Popen(command, cwd=ROOT, stderr=log), log, path)
        rec.log(f"capped processes started: {', '.join(group)}")
        for mode, (process, log, path) in processes.items():

            def collect(entry, process=process, log=log, path=path, mode=mode):
                try:
                    process.wait(timeout=max(1.0, rec.seconds_left()))
                except subprocess.TimeoutExpired as error:
                    process.kill()
                    process.wait()
                    raise RuntimeError("the capped process ran past the stage budget") from error
                finally:
                    log.close()
                result = json.load(open(path)) if os.path.exists(path) else {}
                entry.update(result.get("substeps", {}).get("run", {}))
                entry.pop("seconds", None)
                if "fits" not in entry:
                    raise RuntimeError(
                        f"the capped process (exit {process.returncode}) gave no answer; see cap-{mode}.log"
                    )

            rec.run(f"mode-{mode}", collect)
        for process, log, _ in processes.values():  # any left running when the budget ran out
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
        summary = {mode: rec.data["substeps"].get(f"mode-{mode}", {}).get("fits") for mode in s["cap_modes"]}
        rec.data["fits"] = summary


def stage_memory_cap_mode(rec, s, args):
    """One mode under the cap, alone in this process (check.py -> memory_cap -> this)."""
    import torch

    from benchmarks.gpu import models
    from benchmarks.perf.harness import Runner, build_trainer, prepare_history_cache

    label, shape, batch = s["cap_shape"]
    device, dtype, seq = s["device"], models.dtype_of(s), s["cap_seq"]

    def run(entry):
        entry["mode"] = args.mode
        if device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            fraction = s["cap_gib"] * 2**30 / total
            torch.cuda.set_per_process_memory_fraction(fraction)
            entry.update(cap_fraction=fraction, cap_bytes=int(fraction * total), cap_applied=True)
        else:
            entry.update(cap_applied=False, note="CPU scale: no memory cap (CUDA only); this only runs the code path")
        rows, tokenizer = models.data(shape["vocab"], seq, batch * (s["cap_steps"] + 1))
        checkpoint = models.random_checkpoint(
            args.work, label, shape, tokenizer, max(s["share_seq_lens"]), device, dtype
        )
        try:
            model = models.load_model(checkpoint, "nf4", dtype, device)
            trainer = build_trainer(
                args.mode,
                model,
                tokenizer,
                rows,
                output_dir=os.path.join(args.work, f"cap-{args.mode}"),
                cache_dir=os.path.join(args.work, f"cap-{args.mode}-cache"),
                seq_len=seq,
                batch=batch,
                steps=s["cap_steps"] + 1,
                device=device,
            )
            runner = Runner(args.mode, trainer, device)
            prepare_history_cache(trainer)
            for _ in range(s["cap_steps"] + 1):
                runner.step()
            entry["fits"] = True
            entry["step_seconds"] = runner.times
        except torch.OutOfMemoryError as error:
            entry["fits"] = False
            entry["oom"] = str(error)[:1500]
        if device == "cuda":
            entry["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            entry["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()

    rec.run("run", run)


# ----------------------------------------------------------------------------------------------------- distributed


def stage_distributed(rec, s, args):
    configs = list(s["distributed_configs"])
    rec.data["configs"] = configs
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    runnable = [name for name in configs if deepspeed or not name.startswith("zero")]
    for name in configs:

        def launch(entry, name=name):
            if name.startswith("zero") and not deepspeed:
                raise Skip("not available: deepspeed is not installed on this machine (and is not carried in .whl)")
            if s["device"] != "cuda":
                raise Skip(
                    "accelerate refuses --cpu together with FSDP or DeepSpeed, and without a GPU Trainer runs "
                    "plain DDP (docs/multi-gpu.md); the worker's code path runs under sub-step plain-cpu instead"
                )
            share = rec.seconds_left() / max(1, len(runnable) - runnable.index(name))
            _launch_worker(
                entry,
                s,
                args,
                name,
                ["--config_file", os.path.join(ROOT, "benchmarks", "gpu", "accelerate", f"{name}.yaml")],
                share,
            )

        rec.run(name, launch, needs_seconds=15)
    if s["device"] != "cuda":
        rec.run("plain-cpu", lambda entry: _launch_worker(entry, s, args, "plain-cpu", ["--cpu"], rec.seconds_left()))


def _launch_worker(entry, s, args, name, launch_args, timeout):
    path = os.path.join(args.out, f"dist-{name}.json")
    if os.path.exists(path):
        os.remove(path)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_args,
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16" if s["device"] == "cuda" else "no",
        "--dynamo_backend",
        "no",
        "-m",
        "benchmarks.gpu.distributed_worker",
        "--out",
        path,
        "--scale",
        args.scale,
        "--work",
        os.path.join(args.work, f"dist-{name}"),
        "--modes",
        *s["distributed_modes"],
    ]
    entry["command"] = " ".join(shlex.quote(part) for part in command)
    with open(os.path.join(args.out, f"dist-{name}.log"), "w") as log:
        try:
            completed = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            entry["returncode"] = completed.returncode
        except subprocess.TimeoutExpired:
            entry["returncode"] = "timeout"
    result = json.load(open(path)) if os.path.exists(path) else {}
    entry.update({key: value for key, value in result.items() if key != "status"})
    # "refused": the engine refuses that history mode when the trainer is built (docs/multi-gpu.md), as it must
    failed = [mode for mode, value in result.get("modes", {}).items() if value.get("status") not in ("ok", "refused")]
    if entry["returncode"] != 0 or not result.get("modes") or failed:
        raise RuntimeError(f"worker exit {entry['returncode']}, failed modes {failed}; see dist-{name}.log")


# --------------------------------------------------------------------------------------------------------- quality


def stage_quality(rec, s, args):
    def entry_point(entry):
        if not os.path.exists(os.path.join(ROOT, "benchmarks", "quality", "run.py")):
            raise Skip("benchmarks/quality/run.py is not in this tree")
        extra = shlex.split(args.quality_args) if args.quality_args else ["--help"]
        command = [sys.executable, "-m", "benchmarks.quality.run", *extra]
        entry["command"] = " ".join(command)
        completed = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, rec.seconds_left() - 2)
        )
        entry["returncode"] = completed.returncode
        entry["output_tail"] = (completed.stdout + completed.stderr)[-3000:]
        if extra == ["--help"]:
            text = completed.stdout
            entry["mentions_gpu_scale"] = "gpu" in text
            entry["mentions_real_model_mode"] = "real" in text.lower()
            entry["note"] = (
                "only the entry point was checked (--help); pass --quality-args to check.py to run the "
                "real-model quality benchmark in this stage"
            )
        if completed.returncode != 0:
            raise RuntimeError(f"exit {completed.returncode}: {entry['output_tail'][-500:]}")

    rec.run("entry-point", entry_point, needs_seconds=5)


STAGES = {
    "env": stage_env,
    "prepare": stage_prepare,
    "correctness": stage_correctness,
    "cost": stage_cost,
    "memory_cap": stage_memory_cap,
    "memory_cap_mode": stage_memory_cap_mode,
    "distributed": stage_distributed,
    "quality": stage_quality,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--scale", choices=list(SCALES), required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--mode", default=None, help="memory_cap_mode: the variant to run under the cap")
    parser.add_argument("--quality-args", default=None)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    name = f"cap-{args.mode}" if args.stage == "memory_cap_mode" else f"stage-{args.stage}"
    rec = StageRecorder(os.path.join(args.out, f"{name}.json"), args.stage if not args.mode else name, args.deadline)
    settings = load(args.scale)
    rec.data["scale"] = args.scale
    if args.stage != "env":
        import torch

        torch.manual_seed(0)
        if settings["device"] == "cpu":
            torch.set_num_threads(min(2, os.cpu_count() or 1))
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        STAGES[args.stage](rec, settings, args)
    except Exception as error:  # noqa: BLE001 - recorded; the stage's status becomes failed
        import traceback

        rec.data["substeps"]["stage"] = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    return rec.finish()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is written: skip interpreter teardown (tens of seconds with models and threads)
