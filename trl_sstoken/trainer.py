"""`SSTokenTrainer`: TRL's `SFTTrainer`, training on the response tokens ssToken selects.

One training step: read the regions off the batch -> (no grad) history forward for REL -> current forward through
TRL's fused LM head, with the attention capture armed on one layer -> scoring picks the tokens -> NLL of the kept
tokens over the denominator the config names. Evaluation is untouched: plain NLL over every response token, so eval
losses stay comparable with plain SFT.
"""

import functools
import hashlib
import math
import os
import shutil
import textwrap
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import TrainingArguments
from trl import SFTTrainer

from .attention import PACKING_IMPLEMENTATIONS, AttentionCapture, AttentionUnavailableError
from .checkpoints import adapters_loaded_in_place, checkpoint_settings, resolve_resume, save_checkpoint
from .collator import EXAMPLE_ID_COLUMN, SelectionCollator, add_example_ids, pop_selection_fields
from .config import SSTokenConfig
from .config_reference import add_to_model_card
from .history import FrozenBaseHistory, HistoryUpdateCallback, build_history, is_peft_model
from .history.cache import (
    CACHE_FILE,
    CachedHistory,
    InitialWeightsHistory,
    dataset_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
)
from .inputs import check_prepared_inputs, check_trainer_inputs
from .quantized import keep_quantized_weights_unpacked
from .reference import ReferenceAdapter, ReferenceModel
from .regions import Regions, regions_from_batch
from .scoring import (
    excess_loss,
    keep_counts,
    probability_weights,
    retrospective_excess_loss,
    select_by_probability,
    select_random,
    select_tokens,
    top_k_per_batch,
)

METRIC_PREFIX = "sstoken/"
REL_METHODS = ("sstoken", "rel")
ATTENTION_METHODS = ("sstoken", "rel", "attention")  # "rel" uses attention during the warm-up
SEQUENCE_TOP_K_METHODS = ("sstoken", "rel", "attention", "random")  # keep ceil(ratio * n) per sequence


@dataclass
class WindowCounts:
    """Token and sequence counts of one gradient-accumulation window, summed over processes when averaging."""

    selected: torch.Tensor
    sequences: torch.Tensor
    responses: torch.Tensor
    across_processes: bool


@dataclass
class StepPlan:
    """What one micro-batch needs, decided from its labels before any forward pass."""

    gamma: torch.Tensor  # (S,) REL weight per sequence (regions.layout)
    needs_history: bool
    needs_attention: bool
    in_warmup: bool
    needs_reference: bool = False


@dataclass
class Selection:
    """The outcome of scoring one micro-batch. Token tensors are (B, T-1), in prediction space."""

    keep: torch.Tensor  # bool, the tokens trained on
    regions: Regions
    rel: torch.Tensor | None  # log p_cur - log p_hist, where the history forward ran
    attention: torch.Tensor | None  # attention mass on the context, where it was captured
    plan: StepPlan
    excess_loss: torch.Tensor | None = None  # rho1: L_cur - L_ref


class SSTokenTrainer(SFTTrainer):
    """`SFTTrainer` that trains on the tokens selected by ssToken (Qin et al., 2025).

    A drop-in for `SFTTrainer`: it takes the same arguments, with an [`SSTokenConfig`] (a plain `SFTConfig` or
    `TrainingArguments` is converted, with ssToken's defaults). With a PEFT adapter (`peft_config`, LoRA or QLoRA) the
    history model is the base weights, optionally plus a lagged or EMA copy of the adapter; with full fine-tuning it is
    a copy of the model, or a cached base history (`history_cache_dir`) that needs no copy at all.
    """

    _tag_names = ["trl", "sft", "sstoken"]
    _name = "ssToken"
    _paper = {
        "title": "ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning",
        "id": "2510.18250",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{qin2025sstoken,
                title   = {{ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning}},
                author  = {Xiaohan Qin and Xiaoxing Wang and Ning Liao and Cancheng Zhang and Xiangdong Zhang and Mingquan Feng and Jingzhi Wang and Junchi Yan},
                journal = {arXiv preprint arXiv:2510.18250},
                year    = 2025,
            }"""),
    }
    # The training loss is normalised over the whole accumulation window here, so Trainer must not divide it again
    loss_is_scaled_for_ga = True

    def __init__(self, model, args=None, *trainer_args, **trainer_kwargs):
        args = _as_sstoken_config(model, args)
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "SSTokenTrainer computes its own loss from the selected tokens; compute_loss_func cannot be combined "
                "with it. Subclass SSTokenTrainer and override compute_loss instead."
            )
        train_dataset = trainer_kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        eval_dataset = trainer_kwargs.get("eval_dataset", trainer_args[2] if len(trainer_args) > 2 else None)
        check_trainer_inputs(args, model, train_dataset, eval_dataset)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        check_prepared_inputs(self, model, train_dataset)
        keep_quantized_weights_unpacked(self.model)  # exact and differentiable 4-bit forwards on the CPU
        if self.label_smoother is not None:
            raise ValueError(
                "label_smoothing_factor is not supported by SSTokenTrainer (its loss is the NLL of the selected "
                "tokens, which would silently ignore it); set it to 0."
            )
        method = args.selection_method
        self.data_collator = SelectionCollator(self.data_collator)
        if self.train_dataset is not None:
            self.train_dataset = add_example_ids(self.train_dataset)
        self._history = None
        if method in REL_METHODS:
            self._history = self._build_history(args)
            self.add_callback(HistoryUpdateCallback(self._history))
        self._reference = None
        if method == "rho1":
            self._reference = self._build_reference(args)
        self._attention = None
        if method in ATTENTION_METHODS:
            self._attention = self._build_attention_capture(args)
        self._warn_about_dropped_examples(args, trainer_args, trainer_kwargs)
        self._window: WindowCounts | None = None
        self._micro_step = 0
        self._warned: set[str] = set()

    def _build_history(self, args: SSTokenConfig):
        if args.history_cache_dir is None:
            if not is_peft_model(self.model) and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
                raise ValueError(
                    f"history={args.history!r} with full fine-tuning under FSDP or DeepSpeed would copy the whole, "
                    "unsharded model on every process. Use history='base' with history_cache_dir (no copy at all) "
                    "or train a LoRA adapter (peft_config), whose history shards with the model."
                )
            return build_history(
                self.model, args.history, args.history_update_steps, args.history_ema_alpha,
                device=args.history_device, max_copy_gb=args.history_copy_max_gb,
            )
        source = FrozenBaseHistory(self.model) if is_peft_model(self.model) else InitialWeightsHistory()
        return CachedHistory(source, os.path.join(args.history_cache_dir, CACHE_FILE), identity=None)

    def _build_attention_capture(self, args: SSTokenConfig):
        implementation = self.accelerator.unwrap_model(self.model).config._attn_implementation
        if self.padding_free and implementation not in PACKING_IMPLEMENTATIONS:
            raise ValueError(
                f"padding-free batches (padding_free=True or packing with a 'bfd' strategy) need an attention "
                f"implementation that keeps packed sequences apart; {implementation!r} does not. Use one of "
                f"{list(PACKING_IMPLEMENTATIONS)} (attn_implementation when loading the model)."
            )
        try:
            return AttentionCapture(self.model, args.attention_layer, args.attention_chunk_size)
        except AttentionUnavailableError as error:
            if args.selection_method == "attention" or not args.allow_rel_fallback:
                raise
            warnings.warn(f"{error} Falling back to REL-only selection (allow_rel_fallback=True).", stacklevel=3)
            return None

    def _warn_about_dropped_examples(self, args, trainer_args, trainer_kwargs):
        """TRL silently drops examples with no response token left (e.g. truncated away by max_length): say so."""
        original = trainer_kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        prepared = self.train_dataset
        if args.packing or not hasattr(original, "__len__") or not hasattr(prepared, "__len__"):
            return
        dropped = len(original) - len(prepared)
        if dropped > 0:
            warnings.warn(
                f"{dropped} of {len(original)} training examples have no response token left after preparation "
                f"(e.g. truncated away by max_length={args.max_length}) and were dropped; check max_length.",
                stacklevel=3,
            )

    def _build_reference(self, args: SSTokenConfig):
        if args.reference_adapter is not None:
            return ReferenceAdapter(args.reference_adapter, self.model)
        model = self.accelerator.unwrap_model(self.model)
        return ReferenceModel(args.reference_model, model, self.processing_class, args.trust_remote_code)

    def _prepare_history_cache(self):
        """Loads the cached base history, or builds it in one no-grad pass over the training set."""
        if not isinstance(self._history, CachedHistory) or self._history.ready:
            return
        model = self.accelerator.unwrap_model(self.model)
        base_model = model.get_base_model() if is_peft_model(model) else model
        self._history.identity = {
            "dataset": dataset_fingerprint(self.train_dataset),
            "model": model_fingerprint(base_model),
            "tokenizer": tokenizer_fingerprint(self.processing_class),
        }
        batch_size = self.args.history_cache_batch_size or 2 * self.args.per_device_train_batch_size
        was_training = model.training
        model.eval()
        try:
            with self.accelerator.main_process_first():
                dataset = self._remove_unused_columns(self.train_dataset, description="history cache")
                self._history.load_or_build(model, dataset, self.data_collator, batch_size, self.accelerator.device)
        finally:
            model.train(was_training)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if EXAMPLE_ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXAMPLE_ID_COLUMN]

    # ----- the training step -----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        fields = pop_selection_fields(inputs)
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs, selection = self._forward_and_select(model, inputs, fields)
        if not self._signals_are_finite(outputs.log_probs, selection):
            loss = self._skipped_batch_loss()
            self._micro_step += 1
            return (loss, outputs) if return_outputs else loss
        self._metrics["train"][METRIC_PREFIX + "nonfinite_skipped"].append(0.0)
        loss = self._selected_loss(outputs.log_probs, selection.keep, selection.regions)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / self.current_gradient_accumulation_steps
        self._log_selection_metrics(selection)
        self._log_token_metrics(outputs, inputs)
        self._micro_step += 1
        return (loss, outputs) if return_outputs else loss

    def _forward_and_select(self, model, inputs, fields) -> tuple:
        """History forward (no grad), current forward with the capture armed, then scoring: (outputs, Selection)."""
        inputs["use_cache"] = False
        regions = regions_from_batch({**inputs, **fields})
        plan = self._plan_step(regions)
        history_logps = self._history_log_probs(model, inputs, fields) if plan.needs_history else None
        reference_logps = (
            self._reference.log_probs(self.accelerator.unwrap_model(model), inputs) if plan.needs_reference else None
        )
        capture = (
            self._attention.armed(regions.context, regions.valid, regions.sequence_ids, regions.response_tokens)
            if plan.needs_attention
            else nullcontext()
        )
        with capture:
            outputs = model(**inputs, fused_lm_head=True)
        attention = self._attention.take()[:, 1:] if plan.needs_attention else None
        current_logps = outputs.log_probs.detach()
        excess = excess_loss(current_logps, reference_logps) if reference_logps is not None else None
        keep = self._select(current_logps, history_logps, attention, regions, plan, excess)
        rel = retrospective_excess_loss(current_logps, history_logps) if history_logps is not None else None
        return outputs, Selection(keep, regions, rel, attention, plan, excess)

    @torch.no_grad()
    def preview_selection(self, inputs: dict) -> "Selection":
        """Which tokens of a collated batch the current step would train on, without training or logging.

        Runs the same forwards and scoring as a training step (including the warm-up rule at the current
        `state.global_step`), in eval mode so that dropout does not blur the picture. All tensors of the result are
        in prediction space: column j is token j + 1.
        """
        was_training = self.model.training
        self.model.eval()
        inputs = self._prepare_inputs(dict(inputs))
        fields = pop_selection_fields(inputs)
        self._prepare_history_cache()
        try:
            _, selection = self._forward_and_select(self.model, inputs, fields)
        finally:
            self.model.train(was_training)
        return selection

    def _signals_are_finite(self, log_probs, selection: "Selection") -> bool:
        """NaN or inf in the current, history or reference log-probs of response tokens would turn the selection and
        the update into garbage: such a micro-batch is skipped (warning + `sstoken/nonfinite_skipped`)."""
        response = selection.regions.response
        finite = torch.isfinite(log_probs.detach()[response]).all()
        for signal in (selection.rel, selection.excess_loss):
            if signal is not None:
                finite = finite & torch.isfinite(signal[response]).all()
        if bool(finite):
            return True
        self._metrics["train"][METRIC_PREFIX + "nonfinite_skipped"].append(1.0)
        self._warn_once(
            "nonfinite",
            f"Non-finite log-probabilities (NaN or inf) in a training batch at step {self.state.global_step}: the "
            "batch is skipped (it adds no gradient) and counted in sstoken/nonfinite_skipped. Frequent skips point "
            "at a diverging model (lower the learning rate) or at fp16 overflow (use bf16).",
        )
        return False

    def _skipped_batch_loss(self) -> torch.Tensor:
        """A zero loss that still touches every trainable parameter (with zero gradient), so that DDP's gradient
        all-reduce sees the same parameters on every process."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].nan_to_num(0.0, 0.0, 0.0) * 0.0).sum() for p in params)

    def _plan_step(self, regions: Regions) -> StepPlan:
        args = self.args
        method = args.selection_method
        in_warmup = method in REL_METHODS and self.state.global_step < self._warmup_steps()
        gamma = torch.full(regions.num_response.shape, 0.0 if in_warmup else args.effective_gamma)
        if method not in ATTENTION_METHODS:  # random, full and the baselines need neither REL nor attention
            return StepPlan(gamma, False, False, in_warmup=False, needs_reference=method == "rho1")
        if self._attention is None:  # allow_rel_fallback: the attention cannot be captured
            return StepPlan(torch.ones_like(gamma), needs_history=True, needs_attention=False, in_warmup=False)

        has_response = (regions.num_response > 0).cpu()
        no_context = has_response & ~regions.has_context.cpu()
        if bool(no_context.any()):
            if method == "attention":
                raise ValueError(
                    f"selection_method='attention' needs a context (prompt) before each response, but "
                    f"{int(no_context.sum())} sequence(s) in this batch have none (no label -100 position before their "
                    "first response token), e.g. plain language-modeling text. Use selection_method='sstoken', which "
                    "falls back to REL for such sequences, or a prompt-completion / conversational dataset."
                )
            self._warn_once(
                "no_context",
                "Some sequences have no context (prompt) before their response, so their attention score is "
                "undefined; they are selected by REL only. The count is logged as sstoken/no_context_sequences.",
            )
            gamma = torch.where(no_context, 1.0, gamma)
        active = gamma[has_response]
        return StepPlan(
            gamma,
            needs_history=bool((active > 0).any()),
            needs_attention=bool((active < 1).any()),
            in_warmup=in_warmup,
        )

    def _warmup_steps(self) -> int:
        """Optimizer steps at the start that select by attention only: ceil(ratio * max_steps)."""
        return math.ceil(round(self.args.attention_warmup_ratio * self.state.max_steps, 6))

    def _history_log_probs(self, model, inputs, fields) -> torch.Tensor:
        if isinstance(self._history, CachedHistory):
            self._prepare_history_cache()
        return self._history.log_probs(self.accelerator.unwrap_model(model), inputs, fields)

    def _select(self, current_logps, history_logps, attention, regions: Regions, plan: StepPlan, excess=None):
        """The keep mask, (B, T-1). Per-sequence methods score one row per original sequence (`regions.layout`), so
        packed and padding-free batches are selected exactly like padded ones."""
        args = self.args
        if args.selection_method in ("full", "dft"):
            return regions.response
        if args.selection_method == "rho1":
            return top_k_per_batch(excess, regions.response, args.selection_ratio)
        if args.selection_method == "profit":
            return select_by_probability(current_logps, regions.response, args.profit_threshold)
        layout = regions.layout
        response = layout.predictions_to_sequences(regions.response, False)
        if args.selection_method == "random":
            keep = select_random(response, args.selection_ratio, self._random_generator())
        else:
            per_sequence = [
                None if values is None else layout.predictions_to_sequences(values.float(), 0.0)
                for values in (current_logps, history_logps, attention)
            ]
            keep = select_tokens(*per_sequence, response, args.selection_ratio, plan.gamma)
        return layout.sequences_to_predictions(keep, False)

    def _random_generator(self) -> torch.Generator:
        """A generator seeded by (seed, step, micro-step, process): reproducible and independent of the history."""
        key = f"{self.args.seed}:{self.state.global_step}:{self._micro_step}:{self.args.process_index}"
        return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))

    def _selected_loss(self, log_probs: torch.Tensor, keep: torch.Tensor, regions: Regions) -> torch.Tensor:
        """NLL of the kept tokens over the configured denominator."""
        window = self._window if self._window is not None else self._count_window([regions], log_probs.device)
        weights = keep.to(log_probs.dtype)
        if self.args.selection_method == "dft":
            weights = probability_weights(log_probs, keep).to(log_probs.dtype)
        kept_nll = -log_probs * weights  # (B, T-1)
        normalization = self.args.selection_loss_normalization
        if normalization == "selected":
            loss = kept_nll.sum() / window.selected.clamp(min=1)
        elif normalization == "all":
            loss = kept_nll.sum() / window.responses.clamp(min=1)
        else:  # "sequence": the paper's Eq. 10, per original sequence even in packed rows
            layout = regions.layout
            kept_per_sequence = layout.predictions_to_sequences(kept_nll, 0.0).sum(dim=-1)
            count_per_sequence = layout.predictions_to_sequences(keep, False).sum(dim=-1)
            loss = (kept_per_sequence / count_per_sequence.clamp(min=1)).sum() / window.sequences.clamp(min=1)
        if window.across_processes:
            # The denominator counts every process's tokens while DDP averages gradients: undo that average
            loss = loss * self.accelerator.num_processes
        return loss

    # ----- gradient-accumulation window -----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Counts the kept tokens of the whole window before its first forward: k = ceil(ratio * n) needs labels only."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window = self._count_window([regions_from_batch(batch) for batch in batch_samples], device)
        self._micro_step = 0
        return batch_samples, num_items_in_batch

    def _count_window(self, window_regions: list[Regions], device) -> WindowCounts:
        """Kept tokens, sequences with a response and response tokens of the window. The kept count follows from
        labels alone for every method that allows `selected` normalisation (`profit` does not)."""
        method, ratio = self.args.selection_method, self.args.selection_ratio
        counts = torch.zeros(3, dtype=torch.long, device=device)
        for regions in window_regions:
            num_response = regions.num_response
            if method in SEQUENCE_TOP_K_METHODS:
                kept = keep_counts(num_response, ratio).sum()
            elif method == "rho1":  # top-k over the whole micro-batch
                kept = keep_counts(num_response.sum().reshape(1), ratio).sum()
            else:  # full, dft (and profit, whose kept count is never used as a denominator)
                kept = num_response.sum()
            counts += torch.stack([kept, (num_response > 0).sum(), num_response.sum()]).to(device)
        across = self.args.average_tokens_across_devices and self.args.world_size > 1
        if across:
            counts = self.accelerator.gather(counts).view(-1, 3).sum(dim=0)
        return WindowCounts(counts[0], counts[1], counts[2], across)

    # ----- logging -----

    def _log_selection_metrics(self, selection: Selection):
        regions, keep, rel, attention = selection.regions, selection.keep, selection.rel, selection.attention
        response = regions.response
        has_response = regions.num_response > 0
        nothing = torch.zeros(0, dtype=torch.double, device=response.device)
        rel_on = rel[response].double() if rel is not None else nothing
        attention_on = attention[response].double() if attention is not None else nothing
        local = torch.stack(
            [
                keep.sum().double(),
                response.sum().double(),
                rel_on.sum(),
                (rel_on**2).sum(),
                torch.tensor(rel_on.numel(), dtype=torch.double, device=response.device),
                attention_on.sum(),
                torch.tensor(attention_on.numel(), dtype=torch.double, device=response.device),
                (~has_response).sum().double(),
                (has_response & ~regions.has_context).sum().double(),
            ]
        )
        # gather, not gather_for_metrics: the latter trims the last, incomplete batch's tensors as if they were
        # per-sample rows, which this vector of sums is not
        totals = self.accelerator.gather(local).view(-1, local.numel()).sum(dim=0).tolist()
        kept, responses, rel_sum, rel_sq, rel_n, attn_sum, attn_n, empty, no_context = totals
        metrics = self._metrics["train"]
        metrics[METRIC_PREFIX + "selected_fraction"].append(kept / responses if responses else 0.0)
        metrics[METRIC_PREFIX + "warmup"].append(float(selection.plan.in_warmup))
        metrics[METRIC_PREFIX + "empty_sequences"].append(empty)
        metrics[METRIC_PREFIX + "no_context_sequences"].append(no_context)
        if rel_n:
            mean = rel_sum / rel_n
            metrics[METRIC_PREFIX + "rel_mean"].append(mean)
            metrics[METRIC_PREFIX + "rel_std"].append(math.sqrt(max(rel_sq / rel_n - mean**2, 0.0)))
        if attn_n:
            metrics[METRIC_PREFIX + "attention_mean"].append(attn_sum / attn_n)
        if empty:
            self._warn_once(
                "empty",
                f"{int(empty)} sequence(s) in a training batch have no response token left (all labels are -100, "
                "for example truncated away by max_length): nothing can be selected from them and they add nothing "
                "to the loss. The count is logged as sstoken/empty_sequences.",
            )

    def _log_token_metrics(self, outputs, inputs):
        """The metrics `SFTTrainer.compute_loss` logs, which this override replaces."""
        metrics = self._metrics["train"]
        num_valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy_sum = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        num_correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if "attention_mask" in inputs:
            local_tokens = inputs["attention_mask"].sum()
        else:  # padding-free: one row of real tokens
            local_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        num_tokens = self.accelerator.gather_for_metrics(local_tokens).sum().item()
        self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

    def _warn_once(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ----- saving and resuming -----

    def _save_checkpoint(self, model, trial):
        """`Trainer`'s checkpoint, written by the crash-safe protocol of `trl_sstoken.checkpoints`: marked complete
        (files and settings recorded) before any older checkpoint is deleted."""
        save_checkpoint(self, functools.partial(super()._save_checkpoint, model, trial), trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As `Trainer.train`, but a checkpoint is resumed from only if it verifies (every recorded file unchanged, the
        same ssToken settings); `resume_from_checkpoint=True` (or "true") takes the last one that does."""
        resume_from_checkpoint = resolve_resume(
            resume_from_checkpoint, self.args.output_dir, checkpoint_settings(self.args)
        )
        self._prepare_history_cache()
        return super().train(resume_from_checkpoint, *args, **kwargs)


    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus a section that records the method and every ssToken setting of this run."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                card = file.read()
            with open(path, "w", encoding="utf-8") as file:
                file.write(add_to_model_card(card, self.args))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints keep the history adapter (exact resume). The final artefact holds only what a user ships: the
        trained adapter (or model), the tokenizer, and a model card that records the method and its settings."""
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            if self._history is not None and self.args.should_save:
                self._history.save_checkpoint(output_dir or self.args.output_dir)
            return
        output_dir = output_dir or self.args.output_dir
        peft_model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(peft_model) and len(peft_model.peft_config) > 1:
            # Not the history adapter, not a Rho-1 reference adapter: only the trained one
            peft_model.save_pretrained = _with_selected_adapters(peft_model.save_pretrained, [peft_model.active_adapter])
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                del peft_model.save_pretrained
        else:
            super().save_model(output_dir, _internal_call)
        self._write_model_card(output_dir)

    def _write_model_card(self, output_dir: str):
        """TRL writes its card into `args.output_dir`; the saved artefact gets that card, with the ssToken section."""
        if not self.is_world_process_zero():
            return
        self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
        card = os.path.join(self.args.output_dir, "README.md")
        target = os.path.join(output_dir, "README.md")
        if os.path.isfile(card) and os.path.abspath(card) != os.path.abspath(target):
            shutil.copyfile(card, target)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with adapters_loaded_in_place(self.accelerator.unwrap_model(model if model is not None else self.model)):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._history is not None:
            self._history.load_checkpoint(resume_from_checkpoint)


def _with_selected_adapters(save_pretrained, adapters):
    def save_only(*args, **kwargs):
        kwargs.setdefault("selected_adapters", adapters)
        return save_pretrained(*args, **kwargs)

    return save_only


def _as_sstoken_config(model, args) -> SSTokenConfig:
    """Like SFTTrainer with SFTConfig: None gets defaults, other training arguments are converted."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return SSTokenConfig(f"{str(model_name).split('/')[-1]}-SSToken")
    if isinstance(args, SSTokenConfig):
        return args
    if isinstance(args, TrainingArguments):
        dict_args = args.to_dict()
        # to_dict masks every `*_token` field (hub_token, but also SFTConfig's eos_token and pad_token)
        dict_args.update({name: getattr(args, name) for name in dict_args if name.endswith("_token")})
        return SSTokenConfig(**dict_args)
    raise TypeError(f"args must be an SSTokenConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")
