"""QLoRA with ssToken on one 24 GB GPU (RTX 3090/4090, A10G, L4): an 8B-class model, the settings that fit, and why.

    python examples/qlora_single_gpu.py                                   # Qwen2.5-7B-Instruct on trl-lib/Capybara
    python examples/qlora_single_gpu.py --model_name_or_path meta-llama/Llama-3.1-8B-Instruct   # gated on the hub
    python examples/qlora_single_gpu.py --dataset_name my_data.jsonl --output_dir my-run         # any flag overrides

Every `trl-sstoken train` flag works here; this script only changes the defaults (QLORA_24GB below) and prints a
memory estimate, computed from the model's config, before it trains. The estimate is arithmetic, not a measurement:
it leaves out allocator fragmentation and framework buffers, so keep a few GB of headroom.
If a step runs out of memory: halve --per_device_train_batch_size and double --gradient_accumulation_steps (the
effective batch, and with `selection_loss_normalization="selected"` the loss, stay the same).
"""

import sys

from trl_sstoken import cli


QLORA_24GB = dict(
    # An 8B-class model whose chat template TRL can mark for assistant-only loss (see assistant_only_loss below)
    model_name_or_path="Qwen/Qwen2.5-7B-Instruct",
    dataset_name="trl-lib/Capybara",
    output_dir="Qwen2.5-7B-Instruct-ssToken-QLoRA",
    # 4-bit NF4 base weights: about 0.5 byte per parameter of the linear layers instead of 2 in bf16; the nested
    # ("double") quantization of the per-block scales saves about 0.4 bit more per parameter. Embeddings and the LM
    # head stay in bf16 (bitsandbytes does not quantize them).
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    use_bnb_nested_quant=True,
    # bf16 compute: every 24 GB card above is Ampere or newer. (On a T4 or V100 use float16 and --fp16; see the
    # Colab notebook.)
    dtype="bfloat16",
    bf16=True,
    # LoRA as in the ssToken paper (r=64, alpha=16, dropout 0.1, all linear layers). The history model is the base
    # weights with the adapter disabled, so REL costs one extra no-grad forward and no extra weights.
    use_peft=True,
    lora_r=64,
    lora_alpha=16,
    lora_dropout=0.1,
    lora_target_modules="all-linear",
    history="base",
    # ssToken's defaults, written out: keep 60% of each response's tokens, half REL, half attention
    selection_ratio=0.6,
    selection_gamma=0.5,
    # Multi-turn chat data: train on the assistant turns only, so the user turns are the context whose attention the
    # score measures. TRL swaps in a training chat template with generation markers for Qwen2.5, Llama 3 and others.
    assistant_only_loss=True,
    # Activations are what grows with batch and length. Gradient checkpointing keeps one hidden state per layer
    # and recomputes the rest in the backward pass; 4 x 2048 tokens per micro-batch, 12 micro-batches per step:
    # an effective batch of 48 sequences, the paper's.
    gradient_checkpointing=True,
    max_length=2048,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=12,
    # The paper's schedule: 1 epoch, lr 1e-4, linear decay, 3% warm-up
    learning_rate=1e-4,
    lr_scheduler_type="linear",
    warmup_steps=0.03,
    num_train_epochs=1,
    logging_steps=10,
    save_strategy="steps",
    save_steps=200,
    report_to="tensorboard",
)


def estimate_memory_gib(config, lora_r, batch_size, max_length, nested_quant=True, history="base"):
    """A rough GPU memory budget of one QLoRA training step, in GiB, from the model's config. Not a measurement.

    Returns a dict of parts: 4-bit linear weights, bf16 embeddings and LM head, LoRA weights + gradients + AdamW
    states (TRL keeps LoRA weights in bf16 under quantization, and AdamW's states take the weights' dtype), the
    hidden states gradient checkpointing keeps, and one decoder layer's recomputed activations at a time.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    shapes = [(h, heads * head_dim), (h, kv_heads * head_dim), (h, kv_heads * head_dim), (heads * head_dim, h)]
    shapes += [(h, inter), (h, inter), (inter, h)]  # gate, up, down
    linear_params = layers * sum(a * b for a, b in shapes)
    lora_params = layers * lora_r * sum(a + b for a, b in shapes)
    embedding_params = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    tokens = batch_size * max_length
    gib = 1024**3
    bytes_per_4bit_param = 0.5 + (0.016 if nested_quant else 0.0625)  # 4 bits + the per-64-block scales
    parts = {
        "4-bit linear weights": linear_params * bytes_per_4bit_param / gib,
        "bf16 embeddings + LM head": embedding_params * 2 / gib,
        "LoRA weights, gradients, AdamW states (bf16)": lora_params * (2 + 2 + 4) / gib,
        "history adapter (lagged/ema only)": lora_params * 2 / gib if history != "base" else 0.0,
        "checkpointed hidden states": layers * tokens * h * 2 / gib,
        # q/k/v/o and gate/up/down outputs, the SiLU product and LoRA dropout copies of the inputs, bf16
        "one layer recomputed in the backward": tokens * (6 * h + 4 * inter) * 2 / gib,
    }
    parts["total (estimate)"] = sum(parts.values())
    return parts


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.make_parser("train")
    parser.set_defaults(**QLORA_24GB)
    try:
        script_args, training_args, model_args, dataset_args, loading_args = cli.arguments.parse_command_args(
            parser, argv
        )
    except ValueError as error:
        sys.exit(f"qlora_single_gpu.py: error: {error}")

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    parts = estimate_memory_gib(
        config,
        model_args.lora_r,
        training_args.per_device_train_batch_size,
        training_args.max_length,
        nested_quant=model_args.use_bnb_nested_quant,
        history=training_args.history,
    )
    print(f"Estimated GPU memory of one step for {model_args.model_name_or_path} (arithmetic, not measured):")
    for name, value in parts.items():
        print(f"  {name:<46} {value:6.2f} GiB")
    return cli.train.main(script_args, training_args, model_args, dataset_args, loading_args)


if __name__ == "__main__":
    main()
