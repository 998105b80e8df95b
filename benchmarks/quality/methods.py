"""Methods and ablations, each nothing but a set of `SSTokenConfig` overrides on top of the shared settings.

Every run of the benchmark trains with the same LoRA, steps, batch size and learning rate (`scales.py`); a method or
an ablation only changes the fields below. A method whose `selection_method` value the installed `SSTokenConfig`
does not accept is skipped with a printed message and recorded as "skipped (not available)".
"""

import dataclasses
import tempfile

from trl_sstoken import SSTokenConfig


# The selection settings every selecting method shares unless a method or an ablation changes them. Written out here
# (not taken from the package defaults) so that a change of defaults cannot silently change the benchmark.
SHARED = {
    "selection_ratio": 0.6,
    "selection_gamma": 0.5,
    "history": "base",
    "attention_layer": -1,
    "attention_warmup_ratio": 0.2,
}

METHODS = {
    "full": {"selection_method": "full"},
    "random": {"selection_method": "random"},
    "rel": {"selection_method": "rel"},
    "attention": {"selection_method": "attention"},
    "sstoken": {"selection_method": "sstoken"},
    "rho1": {"selection_method": "rho1"},  # + reference_adapter=<path>, filled in by the harness
    # ProFit keeps a data-dependent number of tokens, so the package refuses "selected" normalisation for it;
    # "all" (divide by every response token) is ProFit's own normalisation.
    "profit": {"selection_method": "profit", "selection_loss_normalization": "all"},
    "dft": {"selection_method": "dft"},
}

# Names of the field that may carry the Rho-1 reference adapter's path, in order of preference.
REFERENCE_FIELD_CANDIDATES = (
    "reference_adapter",
    "rho1_reference",
    "reference_adapter_path",
    "reference_model",
    "reference_model_path",
    "reference_path",
    "ref_adapter",
    "ref_model",
)


def ablations(num_layers: int, max_steps: int) -> dict[str, dict]:
    """Ablations of `sstoken` on the noisy data: name -> overrides on top of METHODS["sstoken"].

    The settings of the main `sstoken` run (ratio 0.6, gamma 0.5, history base, warm-up 0.2, last layer) are the
    reference point of every ablation and are not rerun.
    """
    short_k, long_k = max(1, max_steps // 15), max(1, max_steps // 3)
    grid = {}
    for ratio in (0.4, 0.8, 1.0):
        grid[f"ratio={ratio}"] = {"selection_ratio": ratio}
    for gamma in (0.0, 0.25, 0.75, 1.0):
        grid[f"gamma={gamma}"] = {"selection_gamma": gamma}
    grid[f"history=lagged,K={short_k}"] = {"history": "lagged", "history_update_steps": short_k}
    grid[f"history=lagged,K={long_k}"] = {"history": "lagged", "history_update_steps": long_k}
    grid["history=ema,K=1,alpha=0.95"] = {"history": "ema", "history_update_steps": 1, "history_ema_alpha": 0.95}
    grid["warmup=off"] = {"attention_warmup_ratio": 0.0}
    grid["layer=first"] = {"attention_layer": 0}
    grid[f"layer=middle({num_layers // 2})"] = {"attention_layer": num_layers // 2}
    return grid


# The main-table value of each ablation axis, for reading the ablation table.
ABLATION_BASELINE_LABELS = {
    "ratio": "ratio=0.6",
    "gamma": "gamma=0.5",
    "history": "history=base",
    "warmup": "warmup=0.2",
    "layer": "layer=last",
}


def accepted_selection_methods() -> tuple[str, ...] | None:
    """The `selection_method` values the installed package declares, or None if it does not declare them."""
    try:
        from trl_sstoken import config as config_module

        return tuple(config_module.SELECTION_METHODS)
    except (ImportError, AttributeError):
        return None


def availability(method: str) -> tuple[bool, str]:
    """(available, reason) for a method, from what the installed SSTokenConfig accepts."""
    value = METHODS[method]["selection_method"]
    declared = accepted_selection_methods()
    if declared is not None and value not in declared:
        return False, f"selection_method={value!r} is not accepted by the installed SSTokenConfig ({declared})"
    if declared is None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                SSTokenConfig(output_dir=tmp, selection_method=value, report_to="none", use_cpu=True, bf16=False)
            except ValueError as error:
                if "selection_method" in str(error) and "not supported" in str(error):
                    return False, str(error)
    if method == "rho1" and reference_field() is None:
        return False, "selection_method='rho1' is accepted but SSTokenConfig has no field for the reference adapter"
    return True, ""


def reference_field() -> str | None:
    """The SSTokenConfig field that takes the Rho-1 reference (adapter path), if any."""
    names = [field.name for field in dataclasses.fields(SSTokenConfig)]
    for candidate in REFERENCE_FIELD_CANDIDATES:
        if candidate in names:
            return candidate
    others = [name for name in names if "reference" in name and "steps" not in name]
    return others[0] if others else None


def overrides_for(method: str, reference_path: str | None = None, extra: dict | None = None) -> dict:
    """The full set of SSTokenConfig overrides of one run."""
    overrides = {**SHARED, **METHODS[method], **(extra or {})}
    if method == "rho1":
        if reference_path is None:
            raise ValueError("rho1 needs the reference adapter path")
        overrides[reference_field()] = reference_path
    return overrides
