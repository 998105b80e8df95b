"""`SSTokenTrainer`: TRL's `SFTTrainer`, training on the response tokens ssToken selects.

One training step (`compute_loss`): read the regions off the batch -> the selection method plans what the step
needs -> (no grad) history and reference forwards -> current forward through TRL's fused LM head, with the attention
capture armed on one layer -> the method selects the tokens -> NLL of the kept tokens over the denominator the
config names (`selection/loss.py`) -> metrics (`selection/metrics.py`). Evaluation is untouched: plain NLL over
every response token, so eval losses stay comparable with plain SFT. The parts it holds are built in
`components.py`, the methods live in `selection/methods.py`, saving and resuming in `saving/`.
"""

import functools
import textwrap
import warnings
from contextlib import nullcontext

import torch
from transformers.integrations.neftune import deactivate_neftune
from trl import SFTTrainer

from .components import (
    check_prompt_learning,
    make_attention_capture,
    make_history,
    make_reference,
    prepare_history_cache,
    reference_dataset_of,
    warn_about_dropped_examples,
)
from .config import as_sstoken_config
from .data.collator import EXAMPLE_ID_COLUMN, SelectionCollator, add_example_ids, pop_example_index
from .data.inputs import check_prepared_inputs, check_trainer_inputs
from .divergence import DivergenceGuard, TrainingDivergedError, check_savable
from .engines import check_history, check_resume, engine_of
from .history import HistoryUpdateCallback
from .history.base import eval_mode
from .history.reference_training import build_trained_reference
from .quantized import keep_quantized_weights_unpacked
from .saving import trainer_hooks
from .saving.model_card import add_sstoken_section_to_card, card_names
from .saving.output_lock import check_output_dir_free, run_locked
from .selection.loss import WindowCounts, selected_loss, window_sums, zero_loss_touching
from .selection.methods import METHODS, Selection, Signals, StepPlan, step_generator, warmup_steps
from .selection.metrics import METRIC_PREFIX, log_sft_token_metrics, selection_metrics, selection_sums
from .selection.regions import Regions, regions_from_batch
from .selection.scoring import excess_loss, retrospective_excess_loss


REGIONS_KEY = "sstoken_regions"  # a batch's Regions, read off it once in `get_batch_samples`


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
        args = as_sstoken_config(model, args)
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "SSTokenTrainer computes its own loss from the selected tokens; compute_loss_func cannot be combined "
                "with it. Subclass SSTokenTrainer and override compute_loss instead."
            )
        train_dataset = trainer_kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        eval_dataset = trainer_kwargs.get("eval_dataset", trainer_args[2] if len(trainer_args) > 2 else None)
        check_trainer_inputs(args, model, train_dataset, eval_dataset)
        check_output_dir_free(args, owner=self)  # before any data is loaded or prepared; train() holds the lock
        reference_dataset = reference_dataset_of(args, model, trainer_kwargs.get("peft_config"))
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._reference_dataset = reference_dataset
        check_prepared_inputs(self, model, train_dataset)
        keep_quantized_weights_unpacked(self.model)  # exact and differentiable 4-bit forwards on the CPU
        if self.label_smoother is not None:
            raise ValueError(
                "label_smoothing_factor is not supported by SSTokenTrainer (its loss is the NLL of the selected "
                "tokens, which would silently ignore it); set it to 0."
            )
        self.method = METHODS[args.selection_method](args)
        check_prompt_learning(self.accelerator.unwrap_model(self.model), self.method)
        self.data_collator = SelectionCollator(self.data_collator)
        if self.train_dataset is not None:
            self.train_dataset = add_example_ids(self.train_dataset)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._history = self._reference = self._attention = None
        self._engine = engine_of(self)  # DDP, FSDP1/2, ZeRO-2/3: what the history needs from it (engines.py)
        if self.method.needs_history:
            check_history(self._engine, args)
            self._history = make_history(self.model, args, self.is_fsdp_enabled or self.is_deepspeed_enabled)
            self.add_callback(HistoryUpdateCallback(self._history))
            if self._engine.name in ("zero2", "fsdp2") and hasattr(self._history, "restore_from_adapter_folder"):
                self.add_callback(trainer_hooks.HistoryRestoredAfterEngineLoad(self))
        if self.method.needs_reference:
            self._reference = make_reference(self.model, unwrapped, args, self.processing_class)
        if self.method.needs_attention:
            self._attention = make_attention_capture(self.model, unwrapped, args, self.padding_free)
        if self._attention is not None:
            # checked and registered now; on the model only during train() and armed forwards (preview_selection)
            self._attention.remove()
        warn_about_dropped_examples(
            args,
            trainer_kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None),
            self.train_dataset,
        )
        self._divergence = DivergenceGuard(self)  # stops a diverged run (divergence.py)
        self.add_callback(self._divergence)
        self._window_counts: WindowCounts | None = None  # of the current gradient-accumulation window
        self._micro_step = 0  # within that window
        self._warned: set[str] = set()

    def _prepare_history_cache(self):
        prepare_history_cache(self)

    def _prepare_reference(self):
        """With `reference_dataset`: trains Rho-1's reference adapter on it, or reuses the one in output_dir."""
        build_trained_reference(self)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if EXAMPLE_ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXAMPLE_ID_COLUMN]

    # ----- the training step -----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        regions = inputs.pop(REGIONS_KEY, None)
        example_index = pop_example_index(inputs)
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs, selection = self._forward_and_select(model, inputs, example_index, regions)
        log_probs = label_aligned(outputs.log_probs, selection.regions)
        finite = self._signals_are_finite(log_probs, selection)
        self._divergence.record_batch(skipped=not finite)
        if finite:
            self._metrics["train"][METRIC_PREFIX + "nonfinite_skipped"].append(0.0)
            window = self._window_counts
            if window is None:  # compute_loss called outside Trainer's loop: a window of this micro-batch
                window = self._count_window([selection.regions], log_probs.device)
            weights = self.method.token_weights(log_probs, selection.keep)
            loss = selected_loss(
                log_probs,
                weights,
                selection.keep,
                selection.regions,
                self.args.selection_loss_normalization,
                window,
            )
            if window.across_processes:
                # The denominator counts every process's tokens while DDP averages gradients: undo that average
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / self.current_gradient_accumulation_steps
            self._log_selection_metrics(selection)
            log_sft_token_metrics(self, outputs, inputs)
        else:  # skipped: no gradient, but every trainable parameter takes part (DDP)
            loss = zero_loss_touching(p for p in self.model.parameters() if p.requires_grad)
        self._micro_step += 1
        return (loss, outputs) if return_outputs else loss

    def _forward_and_select(self, model, inputs, example_index, regions: Regions | None = None) -> tuple:
        """History and reference forwards (no grad), current forward with the capture armed, then the method's
        selection: (outputs, Selection)."""
        inputs["use_cache"] = False
        if regions is None or regions.response.device != inputs["labels"].device:
            regions = regions_from_batch({**inputs, **example_index})
        plan = self._plan_step(regions)
        # FSDP1's unwrapped model holds flat 1-D shards: it must be called through its wrapper
        unwrapped = model if self._engine.calls_through_wrapper else self.accelerator.unwrap_model(model)
        history_logps = None
        if plan.needs_history:
            self._history.prepare(self)  # a cached history loads or builds its cache on first use
            history_logps = self._history.log_probs(unwrapped, inputs, example_index)
        if plan.needs_reference:
            self._prepare_reference()
        reference_logps = self._reference.log_probs(unwrapped, inputs) if plan.needs_reference else None
        capture = (
            self._attention.armed(regions.context, regions.valid, regions.sequence_ids, regions.response_tokens)
            if plan.needs_attention
            else nullcontext()
        )
        with capture:
            outputs = model(**inputs, fused_lm_head=True)
        current_logps = label_aligned(outputs.log_probs, regions).detach()
        signals = Signals(
            current_logps,
            rel=retrospective_excess_loss(current_logps, history_logps) if history_logps is not None else None,
            attention=self._attention.take()[:, 1:] if plan.needs_attention else None,
            excess_loss=excess_loss(current_logps, reference_logps) if reference_logps is not None else None,
            generator=self._random_generator() if self.method.draws_at_random else None,  # seeded per micro-step
        )
        return outputs, self._select(signals, regions, plan)

    def _plan_step(self, regions: Regions) -> StepPlan:
        in_warmup = self.state.global_step < warmup_steps(self.args.attention_warmup_ratio, self.state.max_steps)
        plan = self.method.plan(regions, in_warmup, attention_available=self._attention is not None)
        if plan.rel_only_sequences:
            self._warn_once(
                "no_context",
                "Some sequences have no context (prompt) before their response, so their attention score is "
                "undefined; they are selected by REL only. The count is logged as sstoken/no_context_sequences.",
            )
        return plan

    def _select(self, signals: Signals, regions: Regions, plan: StepPlan) -> Selection:
        """The method's keep mask and score, with the signals they came from."""
        keep, score = self.method.select(signals, regions, plan)
        return Selection(keep, regions, plan, score, signals)

    def _random_generator(self) -> torch.Generator:
        return step_generator(self.args.seed, self.state.global_step, self._micro_step, self.args.process_index)

    @torch.no_grad()
    def preview_selection(self, inputs: dict) -> Selection:
        """Which tokens of a collated batch the current step would train on, without training or logging.

        Runs the same forwards and scoring as a training step (including the warm-up rule at the current
        `state.global_step`), in eval mode so that dropout does not blur the picture. All tensors of the result are
        in prediction space: column j is token j + 1.
        """
        inputs = self._prepare_inputs(dict(inputs))
        example_index = pop_example_index(inputs)
        self._prepare_history_cache()
        self._prepare_reference()
        with eval_mode(self.model):
            _, selection = self._forward_and_select(self.model, inputs, example_index)
        return selection

    def _signals_are_finite(self, log_probs, selection: Selection) -> bool:
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
            "at a diverging model (lower the learning rate) or at fp16 overflow (use bf16); after "
            f"max_consecutive_skipped_steps={self.args.max_consecutive_skipped_steps} optimizer steps in a row with "
            "every batch skipped, training stops with TrainingDivergedError.",
        )
        return False

    # ----- gradient-accumulation window -----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Reads each batch's regions once and counts the kept tokens of the whole window before its first forward:
        every method that allows `selected` normalisation keeps a count that follows from the labels alone."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:
            batch[REGIONS_KEY] = regions_from_batch(batch)
        self._window_counts = self._count_window([batch[REGIONS_KEY] for batch in batch_samples], device)
        self._micro_step = 0
        return batch_samples, num_items_in_batch

    def _count_window(self, window_regions: list[Regions], device) -> WindowCounts:
        counts = window_sums(self.method, window_regions, device)
        across = self.args.average_tokens_across_devices and self.args.world_size > 1
        if across:
            counts = self.accelerator.gather(counts).view(-1, 3).sum(dim=0)
        return WindowCounts(counts[0], counts[1], counts[2], across)

    # ----- logging -----

    def _log_selection_metrics(self, selection: Selection):
        local = selection_sums(selection)
        # gather, not gather_for_metrics: the latter trims the last, incomplete batch's tensors as if they were
        # per-sample rows, which this vector of sums is not
        totals = self.accelerator.gather(local).view(-1, local.numel()).sum(dim=0).tolist()
        metrics = selection_metrics(totals, selection.plan.in_warmup)
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        if empty := metrics[METRIC_PREFIX + "empty_sequences"]:
            self._warn_once(
                "empty",
                f"{int(empty)} sequence(s) in a training batch have no response token left (all labels are -100, "
                "for example truncated away by max_length): nothing can be selected from them and they add nothing "
                "to the loss. The count is logged as sstoken/empty_sequences.",
            )

    def _warn_once(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ----- saving and resuming (saving/trainer_hooks.py) -----

    def _save_checkpoint(self, model, trial):
        """`Trainer`'s checkpoint, written by the crash-safe protocol of `saving/checkpoints.py`: marked complete (files and
        settings recorded) before any older checkpoint is deleted."""
        check_savable(self, f"checkpoint-{self.state.global_step}")
        trainer_hooks.save_checkpoint(self, functools.partial(super()._save_checkpoint, model, trial), trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As `Trainer.train`, but a checkpoint is resumed from only if it verifies (every recorded file unchanged, the
        same ssToken settings); `resume_from_checkpoint=True` (or "true") takes the last one that does. A diverged
        run raises `TrainingDivergedError` (divergence.py) and saves nothing from its non-finite state. The run holds
        the lock of its output_dir throughout (`saving/output_lock.py`): a second run training into it is refused.
        The model runs the attention capture's implementation (`sstoken_sdpa`, ...) only during the call and has
        its own back after, also when training fails."""
        with run_locked(self.args, owner=self):
            resume_from_checkpoint = trainer_hooks.resolve_resume_checkpoint(self, resume_from_checkpoint)
            self._resumed_from = resume_from_checkpoint
            if resume_from_checkpoint is not None:
                check_resume(self._engine, self.accelerator.unwrap_model(self.model))
            self._prepare_history_cache()
            self._prepare_reference()
            # the attention capture's implementation for the whole run (gradient-checkpointing recomputes
            # included), and the model's own back when it ends, however it ends
            capture = self._attention.installed() if self._attention is not None else nullcontext()
            try:
                with capture:
                    return super().train(resume_from_checkpoint, *args, **kwargs)
            except TrainingDivergedError:
                self._end_diverged_training()
                raise

    def _end_diverged_training(self):
        """What `Trainer` does at the end of a run that a divergence cut short: NEFTune's hook off the embeddings."""
        if self.neftune_noise_alpha is not None and getattr(self, "neftune_hook_handle", None) is not None:
            deactivate_neftune(self.model, self.neftune_hook_handle, self.accelerator)
            self.neftune_hook_handle = None
        self.is_in_train = False

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        trainer_hooks.load_checkpoint(self, super()._load_from_checkpoint, resume_from_checkpoint, model)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, naming the base model (hub id or local path) and the dataset, with hub links for hub ids
        only and the output folder's name as title by default, plus a section that records the method and every
        ssToken setting of this run."""
        names = card_names(self, model_name, dataset_name)
        super().create_model_card(model_name=names.trl_model_name, dataset_name=names.hub_dataset, tags=tags)
        add_sstoken_section_to_card(self, names)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints keep the history adapter (exact resume). The final artefact holds only what a user ships: the
        trained adapter (or model), the tokenizer, and a model card that records the method and its settings.
        Non-finite trained weights are never saved (`TrainingDivergedError`)."""
        if not _internal_call:  # a checkpoint's save_model call was checked by _save_checkpoint
            check_savable(self, f"the model to {output_dir or self.args.output_dir}")
        trainer_hooks.save_model(self, super().save_model, output_dir, _internal_call)


def label_aligned(log_probs: torch.Tensor, regions: Regions) -> torch.Tensor:
    """The fused head's log-probs (B, T'-1) in the batch's prediction space (B, T-1). They differ only under PEFT
    prompt tuning / p-tuning, which prepends T' - T virtual tokens labelled -100: their columns come first and are
    dropped."""
    return log_probs[:, log_probs.size(1) - regions.response.size(1) :]
