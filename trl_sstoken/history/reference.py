"""The reference model of the Rho-1 baseline: a second frozen model, or a frozen LoRA adapter on the same base.

Rho-1 (Lin et al., 2024, "Not All Tokens Are What You Need") scores a token by its excess loss against a reference
model trained on clean, high-quality data. Its reference is either
- a separate model (`reference_model`: a hub id or local path), loaded frozen in eval mode next to the trained one,
  which costs one more model of memory; it must share the trained model's vocabulary; or
- a LoRA adapter (`reference_adapter`: a local path), loaded as an extra frozen adapter named `reference` on the
  trained model's own base layers, which costs one adapter; the trained model must then be a PEFT model.
Both are `History` objects (`history/base.py`): the trainer asks them for log-probs as it asks a history.
"""

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from .base import History, adapter_activated, fused_log_probs, parameter_bytes


REFERENCE_ADAPTER = "reference"


class ReferenceModel(History):
    """A separate frozen model."""

    def __init__(self, path: str, model, tokenizer=None, trust_remote_code: bool = False):
        dtype = next(model.parameters()).dtype
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        vocab, expected = self.model.config.get_text_config().vocab_size, model.config.get_text_config().vocab_size
        if vocab != expected:
            raise ValueError(
                f"reference_model={path!r} has a vocabulary of {vocab} tokens, the trained model {expected}: Rho-1 "
                "compares per-token losses, so both must use the same tokenizer."
            )
        if tokenizer is not None and _has_tokenizer_files(path):
            reference_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"The tokenizer saved with reference_model={path!r} differs from the trainer's processing_class: "
                    "Rho-1 compares per-token losses, so both must tokenize identically."
                )
        self.model.to(next(model.parameters()).device).eval().requires_grad_(False)
        add_fused_lm_head(self.model)
        self.parameter_bytes = parameter_bytes(self.model.parameters())

    def log_probs(self, model, inputs, example_index=None) -> torch.Tensor:
        return fused_log_probs(self.model, inputs)


class ReferenceAdapter(History):
    """A frozen LoRA adapter loaded next to the trained one."""

    def __init__(self, path: str, peft_model):
        if not (hasattr(peft_model, "peft_config") and hasattr(peft_model, "load_adapter")):
            raise ValueError(
                "reference_adapter needs the trained model to be a PEFT model (pass peft_config); with full "
                "fine-tuning, give the reference as a whole model with reference_model."
            )
        if REFERENCE_ADAPTER in peft_model.peft_config:
            raise ValueError(f"The model already has an adapter named {REFERENCE_ADAPTER!r}.")
        self.peft_model = peft_model
        self.trained_adapter = peft_model.active_adapter
        self.trained_params = [p for n, p in peft_model.named_parameters() if f".{self.trained_adapter}." in n]
        flags = [p.requires_grad for p in self.trained_params]
        peft_model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        # Loading an adapter can flip the trained adapter's flags (peft#3580): put them back, freeze the reference
        for param, flag in zip(self.trained_params, flags, strict=True):
            param.requires_grad_(flag)
        reference = [p for n, p in peft_model.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
        self.reference_params = reference
        for param in reference:
            param.requires_grad_(False)
        peft_model.set_adapter(self.trained_adapter)
        for param, flag in zip(self.trained_params, flags, strict=True):
            param.requires_grad_(flag)
        self.parameter_bytes = parameter_bytes(reference)

    def active(self):
        return adapter_activated(
            self.peft_model, REFERENCE_ADAPTER, self.trained_adapter, self.trained_params, self.reference_params
        )


def _has_tokenizer_files(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    )
