"""bitsandbytes 4-bit layers on the CPU: keep their weights in the layout training uses.

On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight for its inference kernel on the first
forward that runs in eval mode without gradient (`_convert_weight_packed_for_cpu`), and keeps it packed until the
layer is saved (`_save_to_state_dict` unpacks it). Every later forward, in train mode too, then goes through
`gemv_4bit`, which gives other values (up to ~6e-3 on a 64-wide layer) and has no autograd kernel: no gradient flows
through the base layer to the adapters below it, and some graphs fail outright ("a view of a leaf Variable that
requires grad is being used in an in-place operation").

The inverse (`_convert_weight_packed_for_cpu_inverse`, also run by every `state_dict()` of a packed layer) is
approximate: the block scales were rounded to bf16 and are quantized again, so the layer's outputs move by ~2e-3.

`SSTokenTrainer` runs such forwards itself (the history-cache pass, `preview_selection`, evaluation), so a run's
numbers would depend on whether one happened since the last checkpoint: a resumed run would not repeat the
uninterrupted one, and a cached-history QLoRA run could not train. `keep_quantized_weights_unpacked`, called when
the trainer is built, turns the repacking off for the model's layers (before any such forward), and unpacks, with a
warning, a layer that was already packed.
"""

import warnings


def keep_quantized_weights_unpacked(model) -> int:
    """Unpacks every CPU-packed 4-bit weight of `model` and disables the repacking; returns how many layers it saw."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes (or one without CPU packing): nothing to do
        return 0
    layers, unpacked = 0, 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        layers += 1
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
            unpacked += 1
    if unpacked:
        warnings.warn(
            f"{unpacked} 4-bit layer(s) of the model were repacked by bitsandbytes for its CPU inference kernel (an "
            "eval-mode forward without gradient ran before the trainer was built); they were unpacked, which is "
            "approximate (block scales rounded to bf16). For exact, reproducible training, build the trainer on a "
            "freshly loaded model.",
            stacklevel=3,
        )
    return layers
