"""The semantic signal: how much attention each position pays to its context, in one layer.

`context_attention_mass` is the pure computation. `AttentionCapture` gets it the query and key states of one layer
during the model's own forward: it wraps the model's attention kernel (sdpa, eager, FlashAttention) under a new
`AttentionInterface` name that calls the original kernel unchanged and, when armed, also computes the statistic from
that layer's RoPE'd q and k under `no_grad`. No other layer is touched, no attention weights are returned or kept for
backward, and the statistic is computed in query chunks, so its extra memory is one (chunk x T) block per head.
"""

import functools
import inspect
import sys
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .scores import ATTENTION_SCORES as ATTENTION_SCORES  # re-exported: the table lives in scores.py
from .scores import attention_score


CAPTURE_ATTRIBUTE = "_sstoken_attention_capture"
PACKING_IMPLEMENTATIONS = (
    "sdpa",
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)


class AttentionUnavailableError(ValueError):
    """The model's attention cannot be captured (unknown architecture or attention implementation)."""


IMPLEMENTATION_PREFIX = "sstoken_"

# The attention scores (`SSTokenConfig.attention_score`) are a name -> function table, scores.py


def context_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    context: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    query_needed: torch.Tensor | None = None,
    chunk_size: int = 256,
    softcap: float | None = None,
    score: str = "context_mass",
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean attention mass each query puts on context keys, (B, Tq) float32, or one of its sink-free variants.

    Args:
        query: (B, H, Tq, d), after RoPE. Query position i is key position i (no cache).
        key: (B, H_kv, Tk, d), after RoPE; H must be a multiple of H_kv (grouped-query attention).
        context: (B, Tk) bool, keys whose attention mass is summed.
        key_valid: (B, Tk) bool, keys that are not padding.
        scaling: the layer's softmax scale, usually d ** -0.5.
        attention_mask: the mask the model handed its kernel, or None. Bool (True = attend), additive float
            (0 = attend), 4D (B, 1, Tq, Tk) or 2D (B, Tk). Only ever narrows the explicit causal and padding mask
            (for example a sliding window); the causal mask is always applied, even when the model passes None.
        sequence_ids: (B, Tk) long, the sequence of each position in packed or padding-free rows: a query only
            attends within its own sequence (block-diagonal), whatever the kernel was given.
        query_needed: (B, Tq) bool, the queries whose mass is wanted (response tokens). Chunks with none of them
            are skipped and read 0; with None every query is computed.
        chunk_size: query rows per block.
        softcap: attention logit soft-capping (Gemma 2 style), if the layer uses it.
        score: which statistic, a name in `ATTENTION_SCORES` (scores.py, where each is defined): "context_mass" (the
            paper's), "sink_free", "position_corrected". Without sink keys (sink None or all False), "sink_free"
            equals "context_mass" up to rounding.
        sink: (B, Tk) bool, the sink keys (see `sink_keys`); needed by the scores with `needs_sink`.

    A padding query (key_valid False at its own position) gets 0, and so does a query that sees no non-sink key
    (for the sink-free scores) or no non-sink context key ("position_corrected").
    """
    reduce = attention_score(score).reduce
    if attention_score(score).needs_sink and sink is None:
        raise ValueError(f"attention score {score!r} needs the sink keys (sink=...), see sink_keys().")
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads.")
    groups = num_heads // num_kv_heads
    key_t = key.float().transpose(-1, -2).unsqueeze(2)  # (B, H_kv, 1, d, Tk)
    model_allowed = _mask_to_allowed(attention_mask)
    key_positions = torch.arange(k_len, device=query.device)
    needed_rows = None if query_needed is None else query_needed.any(dim=0).tolist()  # one host sync per call
    masses = []
    for start in range(0, q_len, chunk_size):
        stop = min(start + chunk_size, q_len)
        if needed_rows is not None and not any(needed_rows[start:stop]):
            masses.append(query.new_zeros((batch, stop - start), dtype=torch.float32))
            continue
        # Causality: queries up to `stop` never see keys at or after `stop`, so the block is (chunk x stop), not T
        q_chunk = query[:, :, start:stop].float().reshape(batch, num_kv_heads, groups, stop - start, head_dim)
        logits = torch.matmul(q_chunk, key_t[..., :stop]) * scaling  # (B, H_kv, G, c, stop)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        query_positions = torch.arange(start, stop, device=query.device)
        allowed = (key_positions[None, :stop] <= query_positions[:, None])[None] & key_valid[:, None, :stop]
        if model_allowed is not None:
            allowed = allowed & _chunk_rows(model_allowed, start, stop)[..., :stop]
        if sequence_ids is not None:
            allowed = allowed & (sequence_ids[:, start:stop, None] == sequence_ids[:, None, :stop])
        probs = torch.softmax(logits.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)
        masses.append(reduce(probs, allowed, context[:, :stop], None if sink is None else sink[:, :stop]))  # (B, c)
    # Query i is key i: a padding query gets 0, whatever it could attend to
    return torch.cat(masses, dim=-1) * key_valid[:, :q_len]


def sink_keys(key_valid: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The attention-sink keys, (B, T) bool: the first non-padding position of each sequence.

    Every real LLM parks a large share of its attention on the first token it sees (`<|im_start|>` in SmolLM2's
    ChatML, `<bos>` in Gemma), whatever that token is: on SmolLM2's last layer about 40% of a response token's attention
    and more than half of its context mass, while no other key takes more than ~6% (docs/method.md). So the sink is
    defined by position, not by the attention it receives: in a padded row it is the first valid position (left
    padding included); in a packed or padding-free row (`sequence_ids`, -1 on padding) the first position of every
    packed sequence, because each sequence's first token is the one its queries can see first. A multi-turn chat is
    one sequence: only its first token is a sink, later turns' role tokens are ordinary context.

    Args:
        key_valid: (B, T) bool, positions that are not padding.
        sequence_ids: (B, T) long, the sequence of each position (packing), or None for one sequence per row.
    """
    previous_valid = torch.nn.functional.pad(key_valid[:, :-1], (1, 0), value=False)
    starts = key_valid & ~previous_valid
    if sequence_ids is not None:
        previous_sequence = torch.nn.functional.pad(sequence_ids[:, :-1], (1, 0), value=-1)
        starts = starts | (key_valid & (sequence_ids != previous_sequence))
    return starts


def _mask_to_allowed(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The model's mask as bool, True = may attend: (B, Tq, Tk) or (B, 1, Tk)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    elif attention_mask.is_floating_point():
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        allowed = attention_mask != 0
    if allowed.dim() == 4:
        if allowed.size(1) != 1:
            raise ValueError(f"Per-head attention masks are not supported (shape {tuple(allowed.shape)}).")
        return allowed[:, 0]
    if allowed.dim() == 2:
        return allowed[:, None, :]
    raise ValueError(f"Unexpected attention mask shape {tuple(allowed.shape)}.")


def _chunk_rows(allowed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return allowed if allowed.size(1) == 1 else allowed[:, start:stop]


class AttentionCapture:
    """Computes the context-attention statistic of one layer on the next forward after `armed`.

    It fires once per arming: under gradient checkpointing the layer runs again in the backward recompute, and that
    second call must neither recompute nor overwrite the statistic.

    The capturing implementation is on the model only while installed: from construction until `remove()`, or for
    the block of `installed()` / `armed()` (each installs it if it is not on already, and restores what was there
    after, also on errors). `SSTokenTrainer` removes it right after building the capture and installs it for
    `train()` and each armed forward, so the model leaves the trainer with the implementation it came with.
    """

    def __init__(self, model: torch.nn.Module, layer: int, chunk_size: int = 256, score: str = "context_mass"):
        attention_score(score)  # a known name, or a ValueError naming the allowed ones
        self.score = score
        self.base_model = _underlying_pretrained_model(model)
        modules = attention_modules(self.base_model)
        if not -len(modules) <= layer < len(modules):
            raise ValueError(
                f"attention_layer={layer} is out of range for a model with {len(modules)} layers; allowed values are "
                f"{-len(modules)} to {len(modules) - 1} (negative values count from the end)."
            )
        self.layer_index = layer % len(modules)
        self.module = modules[self.layer_index]
        self.chunk_size = chunk_size
        self.num_computations = 0
        self._armed = None
        self._result = None
        self._saved_implementations = None  # while installed: every config's implementation from before
        self.install()

    @property
    def is_installed(self) -> bool:
        return self._saved_implementations is not None

    def install(self):
        """Puts the capturing implementation of the model's current one on the model (a no-op while installed)."""
        if self.is_installed:
            return
        saved = _attention_implementations(self.base_model)
        self.base_model.set_attn_implementation(
            _register_capturing_implementation(self.base_model.config._attn_implementation)
        )
        self._saved_implementations = saved
        setattr(self.module, CAPTURE_ATTRIBUTE, self)

    def remove(self):
        """Gives every config of the model back the attention implementation it had before `install` (a no-op when
        not installed)."""
        if getattr(self.module, CAPTURE_ATTRIBUTE, None) is self:
            delattr(self.module, CAPTURE_ATTRIBUTE)
        if self._saved_implementations is not None:
            saved, self._saved_implementations = self._saved_implementations, None
            for config, implementation in saved:
                config._attn_implementation_internal = implementation

    @contextmanager
    def installed(self):
        """The capturing implementation on the model for the block; afterwards the model has what it had before."""
        was_installed = self.is_installed
        self.install()
        try:
            yield self
        finally:
            if not was_installed:
                self.remove()

    @contextmanager
    def armed(self, context, key_valid, sequence_ids=None, query_needed=None):
        """Arms the capture for the forward run inside the block (installed for it if it is not). context,
        key_valid: (B, T) bool; sequence_ids: (B, T) long for packed or padding-free batches; query_needed: (B, T)
        bool, the queries to compute."""
        with self.installed():
            self._armed = (context, key_valid, sequence_ids, query_needed)
            self._result = None
            try:
                yield self
            finally:
                self._armed = None

    def take(self) -> torch.Tensor:
        """The statistic of the last armed forward, (B, T) float32; it can be taken once."""
        if self._result is None:
            raise RuntimeError(
                f"The attention of layer {self.layer_index} was not captured: the armed forward did not run that "
                "layer's attention through the AttentionInterface."
            )
        result, self._result = self._result, None
        return result

    def record(self, query, key, attention_mask, kwargs):
        if self._armed is None:
            return
        context, key_valid, sequence_ids, query_needed = self._armed
        self._armed = None
        key_valid = key_valid.to(query.device)
        sequence_ids = None if sequence_ids is None else sequence_ids.to(query.device)
        sink = sink_keys(key_valid, sequence_ids) if attention_score(self.score).needs_sink else None
        with torch.no_grad():
            self._result = context_attention_mass(
                query.detach(),
                key.detach(),
                context=context.to(query.device),
                key_valid=key_valid,
                scaling=kwargs.get("scaling") or query.size(-1) ** -0.5,
                attention_mask=None if attention_mask is None else attention_mask.detach(),
                sequence_ids=sequence_ids,
                query_needed=query_needed,
                chunk_size=self.chunk_size,
                softcap=kwargs.get("softcap"),
                score=self.score,
                sink=sink,
            )
        self.num_computations += 1


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The causal self-attention modules of the model, in depth order: those the capture can see.

    A module qualifies by how it computes attention, not by its name: its `forward` looks its kernel up in
    transformers' `ALL_ATTENTION_FUNCTIONS` (the registry the capturing implementation is installed into), and it is
    not marked non-causal (vision towers and encoders of multimodal models are). That finds `*.self_attn` in Llama,
    Qwen or Gemma, `*.attention` in GPTNeoX and the attention mixers between the Mamba layers of hybrids such as
    NemotronH; layer indices (`attention_layer`) count these modules only.
    """
    modules = [
        module
        for module in model.modules()
        if _calls_attention_interface(type(module)) and getattr(module, "is_causal", True) is not False
    ]
    if not modules:
        raise AttentionUnavailableError(
            f"Cannot find an attention layer of {type(model).__name__} that runs through transformers' "
            "AttentionInterface (ALL_ATTENTION_FUNCTIONS), so its attention to the context cannot be captured. Set "
            "allow_rel_fallback=True to select by REL alone, or use selection_method='random', 'full' or a baseline."
        )
    return modules


@functools.cache
def _calls_attention_interface(module_class: type) -> bool:
    forward = module_class.__dict__.get("forward")
    if forward is None or module_class.__module__.startswith("torch."):
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source available (compiled or dynamically created)
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def _attention_implementations(model: PreTrainedModel) -> list[tuple]:
    """(config, implementation) for every config whose implementation `set_attn_implementation` may change: each
    submodel's config and, at any depth, their sub-configs (a multimodal model's text and vision configs). Restoring
    these values exactly gives back mixed implementations too, which setting one name again would not."""
    found, pending = {}, [module.config for module in model.modules() if isinstance(module, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = (config, config._attn_implementation_internal)
        pending.extend(
            sub for key in getattr(config, "sub_configs", {}) if (sub := getattr(config, key, None)) is not None
        )
    return list(found.values())


def _underlying_pretrained_model(model: torch.nn.Module) -> PreTrainedModel:
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Expected a transformers PreTrainedModel, got {type(model).__name__}.")
    return model


def _register_capturing_implementation(base_name: str) -> str:
    """Registers (once) an attention implementation that runs `base_name` and feeds an armed capture."""
    if base_name.startswith(IMPLEMENTATION_PREFIX):
        raise ValueError(f"The model's attention is already captured by another trainer ({base_name!r}).")
    name = IMPLEMENTATION_PREFIX + base_name
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base_name != "eager" and base_name not in ALL_ATTENTION_FUNCTIONS:
        raise AttentionUnavailableError(
            f"Cannot capture attention under the attention implementation {base_name!r}; supported: 'eager' and "
            f"{sorted(ALL_ATTENTION_FUNCTIONS)}. Set allow_rel_fallback=True to select by REL alone."
        )

    def capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
        capture = getattr(module, CAPTURE_ATTRIBUTE, None)
        if capture is not None:
            capture.record(query, key, attention_mask, kwargs)
        if base_name == "eager":  # eager lives in each modeling file, not in the registry
            kernel = sys.modules[type(module).__module__].eager_attention_forward
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[base_name]
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(name, capturing_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name
