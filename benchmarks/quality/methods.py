"""Methods and ablations, each nothing but a set of `SSTokenConfig` overrides on top of the shared settings.

Every run of the benchmark trains with the same LoRA, steps, batch size and learning rate (`scales.py`); a method or
an ablation only changes the fields below. A method whose `selection_method` is not registered in the installed
package (`trl_sstoken.selection.methods.METHODS`) is skipped with a printed message and recorded as "skipped (not
available)".
"""

from trl_sstoken.selection.methods import METHODS as SELECTION_REGISTRY

from . import position_matched


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
    "rho1": {"selection_method": "rho1"},  # + reference_dataset=<the clean subset>, filled in by the harness
    # ProFit keeps a data-dependent number of tokens, so the package refuses "selected" normalisation for it;
    # "all" (divide by every response token) is ProFit's own normalisation.
    "profit": {"selection_method": "profit", "selection_loss_normalization": "all"},
    "dft": {"selection_method": "dft"},
}

# Real-model mode (issue 13): the same methods plus the attention-score variants (`SSTokenConfig.attention_score`),
# each as attention alone (gamma 0) and inside ssToken (gamma 0.5).
REAL_METHODS = {
    **METHODS,
    "attention[sink_free]": {"selection_method": "attention", "attention_score": "sink_free"},
    "attention[position_corrected]": {"selection_method": "attention", "attention_score": "position_corrected"},
    "sstoken[sink_free]": {"selection_method": "sstoken", "attention_score": "sink_free"},
    "sstoken[position_corrected]": {"selection_method": "sstoken", "attention_score": "position_corrected"},
    # Issue 27: the position-balanced top-k (`SSTokenConfig.selection_positions`), the bucket count written out (the
    # package default, tenths) so that a change of defaults cannot change the benchmark
    "sstoken[balanced]": {"selection_method": "sstoken", "selection_positions": "balanced",
                          "selection_position_buckets": 10},
    "rel[balanced]": {"selection_method": "rel", "selection_positions": "balanced", "selection_position_buckets": 10},
    # ... and the position-matched random control (position_matched.py): random tokens with the measured position
    # profile of the `sstoken` run on the same data and seed, which the harness reads when the control starts
    "random[position_matched]": {"selection_method": position_matched.PositionMatchedRandom.name},
}  # fmt: skip

# The rho1 runs train their reference inside the run (`SSTokenConfig.reference_dataset`, issue 26): the harness
# passes this marker, and the worker puts the clean reference subset in its place (a Dataset cannot go into the JSON).
REFERENCE_DATA = "benchmark:clean-reference-subset"


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


# Real-model priority (README, "Priority"): tier 0 = the core comparison on noisy data, tier 1 = the other methods on
# noisy data, tier 2 = every method on the clean control, tier 3 = ablations; seed-major within a tier, so every
# finished seed completes its tier's table.
REAL_CORE = ("full", "sstoken", "attention", "sstoken[sink_free]", "attention[sink_free]")
# Issue 27 puts the controls before the variants: the position-matched control right after `random` (it also runs
# after the `sstoken` run of its seed and data, whose profile it copies: `run_jobs` holds it until then), the
# position-balanced variants after rho1.
REAL_ORDER = (*REAL_CORE, "rel", "attention[position_corrected]", "sstoken[position_corrected]", "random",
              "random[position_matched]", "rho1", "sstoken[balanced]", "rel[balanced]", "profit", "dft")  # fmt: skip


def real_priority(job: dict) -> tuple:
    if job["group"] == "ablation":
        return (3, job["seed"], job["name"])
    name = job["name"]
    order = REAL_ORDER.index(name) if name in REAL_ORDER else len(REAL_ORDER)
    if job["data"] == "noisy":
        return (0 if name in REAL_CORE else 1, job["seed"], order)
    return (2, job["seed"], order)


def real_ablations(num_layers: int, max_steps: int) -> dict[str, dict]:
    """Real-model ablations of `sstoken` on the noisy data. gamma 0 and 1 are the `attention` and `rel` rows of the
    main table, so the gamma axis here is 0.25 / 0.75; the layer axis adds ~70% depth, where the exploration on
    SmolLM2 saw answer tokens attend most to the user's prompt (README, "Real pretrained models")."""
    long_k = max(1, max_steps // 3)
    grid = {
        "ratio=0.4": {"selection_ratio": 0.4},
        "ratio=0.8": {"selection_ratio": 0.8},
        "gamma=0.25": {"selection_gamma": 0.25},
        "gamma=0.75": {"selection_gamma": 0.75},
        f"history=lagged,K={long_k}": {"history": "lagged", "history_update_steps": long_k},
        "history=ema,K=1,alpha=0.95": {"history": "ema", "history_update_steps": 1, "history_ema_alpha": 0.95},
        "warmup=off": {"attention_warmup_ratio": 0.0},
        f"layer=0.7depth({round(0.7 * num_layers)})": {"attention_layer": round(0.7 * num_layers)},
    }
    return grid


# The main-table value of each ablation axis, for reading the ablation table.
ABLATION_BASELINE_LABELS = {
    "ratio": "ratio=0.6",
    "gamma": "gamma=0.5",
    "history": "history=base",
    "warmup": "warmup=0.2",
    "layer": "layer=last",
}


def availability(method: str, table: dict = METHODS) -> tuple[bool, str]:
    """(available, reason) for a method: whether its `selection_method` is registered in the installed package."""
    value = table[method]["selection_method"]
    if value == position_matched.PositionMatchedRandom.name:  # the benchmark's own: registered around each run
        return True, ""
    if value not in SELECTION_REGISTRY:
        return (
            False,
            f"selection_method={value!r} is not registered in the installed trl_sstoken ({tuple(SELECTION_REGISTRY)})",
        )
    return True, ""


def overrides_for(method: str, reference_steps: int | None = None, extra: dict | None = None, table: dict = METHODS):
    """The full set of SSTokenConfig overrides of one run. rho1: its reference adapter is trained by the run itself
    on the clean reference subset (`REFERENCE_DATA`, replaced by the worker) for `reference_steps` steps, by the
    package's recipe, which is the one this harness used to train the references by hand (full SFT, the run's
    LoRA, learning rate, batch size and max length, the run's seed)."""
    overrides = {**SHARED, **table[method], **(extra or {})}
    if method == "rho1":
        if reference_steps is None:
            raise ValueError("rho1 needs the number of steps of its reference adapter")
        overrides.update(reference_dataset=REFERENCE_DATA, reference_max_steps=reference_steps)
    return overrides
