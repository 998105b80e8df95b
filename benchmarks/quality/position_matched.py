"""`random[position_matched]`: the position-matched random control of the real-model benchmark (issue 27).

ssToken keeps 86-99% of the first tenth of a response and 25-45% of the ninth, and it loses to `random` selection of
the same number of tokens. This control separates the two things that could cost it: it draws tokens at random, as
`random` does, but with ssToken's *measured* keep probability at each response-position decile. If it does as badly
as `sstoken`, the position profile is the cost; if it does as well as `random`, the choices within a position are.

It is a benchmark control, not a user feature, so it lives here and reaches the trainer through the package's
open registry (`trl_sstoken.selection.methods.register`), with its one parameter on a config subclass
(`PositionMatchedConfig.position_profile`): the package itself is unchanged. It is in the registry only while a run
needs it (`registered()`, around each of the harness's runs): a process that merely imports the benchmark (the test
suite) keeps the package's own method list, whose help text is written when the package is imported.

The draw, per sequence (one row per original sequence, `Regions.to_sequences`, so packing and padding-free work):
- k = ceil(ratio * n) tokens of its n response tokens, exactly as `random` and `sstoken` keep;
- the response is cut into 10 contiguous relative-position buckets (`scoring.position_buckets`, the deciles the
  benchmark's `KindTracker` reports), and bucket d gets an expected share t[d] proportional to
  profile[d] * size[d], scaled to sum to k and capped at the bucket's size (water-filling: a full bucket's excess
  goes to the others in the same proportions);
- the integer quotas are drawn by systematic sampling from the t[d], so each quota is floor or ceil of its t[d],
  they sum to exactly k, and E[quota[d]] = t[d]; then uniform tokens within each bucket, with the step's generator
  (deterministic per seed, like `random`).
So every token of bucket d is kept with probability t[d] / size[d], which is proportional to profile[d]; with a flat
profile that is k / n for every token, as `random`. The quotas are not `scoring.bucket_quotas`' largest remainder on
purpose: deterministic rounding always gives the leftover token to the bucket with the largest fraction, which on
this benchmark's short responses (SmolLM2's real-cpu training responses: 5-44 tokens, median 17 noisy / 7 clean,
many with fewer tokens than buckets) would exaggerate the profile it is meant to copy (a 0.6-probability token is
then kept always or never).

What it does not copy: ssToken's profile as it moves during training (warm-up by attention alone, then REL), and its
dependence on response length and task family; it uses one profile, pooled over the whole run (all steps, families
and lengths), at every step. The benchmark reports the control's realised profile next to ssToken's, so how well
the pooled profile is reproduced is measured, not assumed.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch

from trl_sstoken import SSTokenConfig
from trl_sstoken.selection.methods import METHODS, PerSequenceTopK, register
from trl_sstoken.selection.scoring import bucket_sizes, num_to_keep, position_buckets


NUM_DECILES = 10
GRID = 1 << 24  # integer units per token of the systematic draw: exact sums, expectations exact to 6e-8 tokens


def check_profile(profile, name: str = "position_profile") -> list[float]:
    """The profile as a list of NUM_DECILES floats, or ValueError naming `name`, what was given and what is allowed."""
    if not isinstance(profile, (list, tuple)) or len(profile) != NUM_DECILES:
        raise ValueError(
            f"{name} must be a list of {NUM_DECILES} kept fractions, one per response-position decile (the "
            f"`kept_fraction_by_position_decile` of an sstoken run), got {str(profile)[:200]}."
        )
    for decile, value in enumerate(profile):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{name}[{decile}] must be a finite number >= 0, got {value!r}"
                + (" (no token of the source run fell in this decile)" if value is None else "")
                + "."
            )
    if not any(value > 0 for value in profile):
        raise ValueError(f"{name} must have at least one decile above 0, got {list(profile)}.")
    return [float(value) for value in profile]


# ----- the draw (pure tensor functions) -----


def matched_targets(sizes: torch.Tensor, k: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """Expected kept tokens per bucket, (B, nb) float64: proportional to profile[d] * sizes[b, d], summing to
    min(k[b], n[b]), none above its bucket's size (water-filling).

    sizes (B, nb) long, k (B,) long, profile (nb,) >= 0. A row whose positive-profile buckets are all full puts the
    rest in its zero-profile buckets, by size: k is kept whatever the profile.
    """
    sizes_f = sizes.double()
    k = torch.minimum(k.long(), sizes.sum(-1)).double().unsqueeze(-1)  # (B, 1)
    weight = profile.double().to(sizes.device) * sizes_f
    capped = torch.zeros_like(sizes, dtype=torch.bool)
    for _ in range(sizes.size(-1) + 1):  # each pass caps at least one more bucket, or ends
        free = ~capped
        room = k - (sizes_f * capped).sum(-1, keepdim=True)
        share = weight * free
        share = torch.where(share.sum(-1, keepdim=True) > 0, share, sizes_f * free)
        total = share.sum(-1, keepdim=True)
        target = torch.where(capped, sizes_f, room * share / torch.where(total > 0, total, 1.0))
        over = free & (target > sizes_f)
        if not bool(over.any()):
            return target
        capped |= over
    return target


def systematic_quotas(targets: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integer quotas, (B, nb) long, drawn so that E[quota[d]] = targets[d] (to 1 / GRID), each quota is the floor or
    the ceil of its target, never above sizes[d], and every row's quotas sum to round(sum of its targets).

    Systematic sampling on an integer grid: with one uniform offset u per row, quota[d] = floor((T[d] + u) / GRID) -
    floor((T[d-1] + u) / GRID) for the cumulative targets T in grid units. The few units that flooring the targets
    loses go to the bucket with the most room, so the sum is exact and no quota exceeds its bucket.
    """
    k = torch.round(targets.sum(-1)).long()
    units = torch.minimum(torch.floor(targets * GRID).long(), sizes * GRID)
    short = (k * GRID - units.sum(-1)).clamp(min=0)
    units = units.scatter_add(-1, (sizes * GRID - units).argmax(-1, keepdim=True), short.unsqueeze(-1))
    offset = torch.randint(0, GRID, (targets.size(0), 1), generator=generator, device=generator.device)
    upper = torch.div(torch.cumsum(units, -1) + offset.to(units.device), GRID, rounding_mode="floor")
    return upper - torch.cat([torch.zeros_like(upper[:, :1]), upper[:, :-1]], dim=-1)


def select_position_matched(
    response_mask: torch.Tensor, ratio: float, profile: torch.Tensor, generator: torch.Generator
) -> torch.BoolTensor:
    """The control's keep mask, (B, L) bool: ceil(ratio * n) response tokens per row (`num_to_keep`, as `random`),
    quotas per relative-position decile by `matched_targets` + `systematic_quotas`, uniform within each decile."""
    buckets = position_buckets(response_mask, NUM_DECILES)  # (B, L), -1 off the mask
    sizes = bucket_sizes(buckets, NUM_DECILES)
    targets = matched_targets(sizes.cpu(), num_to_keep(response_mask, ratio).cpu(), profile)
    quotas = systematic_quotas(targets, sizes.cpu(), generator).to(response_mask.device)
    noise = torch.rand(response_mask.shape, generator=generator, device=generator.device).to(response_mask.device)
    order = torch.argsort(noise.masked_fill(~response_mask, -1.0), dim=-1, descending=True, stable=True)
    in_order = buckets.gather(-1, order)
    one_hot = torch.nn.functional.one_hot(in_order.clamp(min=0), NUM_DECILES) * (in_order >= 0).unsqueeze(-1)
    rank_in_bucket = (torch.cumsum(one_hot, dim=-2) * one_hot).sum(-1) - 1  # -1 off the mask
    within = torch.empty_like(order).scatter_(-1, order, rank_in_bucket)
    return response_mask & (within < quotas.gather(-1, buckets.clamp(min=0)))


# ----- the method and its config -----


@dataclass
class PositionMatchedConfig(SSTokenConfig):
    """`SSTokenConfig` with the profile of `selection_method='position_matched_random'` (the benchmark builds it for
    that method only; every other run uses `SSTokenConfig` itself)."""

    position_profile: list[float] | None = field(
        default=None,
        metadata={
            "help": "Kept fraction per response-position decile (10 numbers >= 0, decile 1 first) that "
            "selection_method='position_matched_random' copies: the measured `kept_fraction_by_position_decile` "
            "of an sstoken run on the same data, seed and scale. Only the ratios between deciles matter: the kept "
            "count per sequence is ceil(selection_ratio * n), as `random`."
        },
    )

    def __post_init__(self):
        if self.selection_method == PositionMatchedRandom.name:
            self.position_profile = check_profile(self.position_profile)
        elif self.position_profile is not None:
            raise ValueError(
                f"position_profile is only read by selection_method={PositionMatchedRandom.name!r}; got "
                f"selection_method={self.selection_method!r}. Unset position_profile or use that method."
            )
        super().__post_init__()


class PositionMatchedRandom(PerSequenceTopK):
    name = "position_matched_random"
    description = (
        "benchmark control: ceil(selection_ratio * n) random tokens per sequence, kept by response-position decile "
        "in proportion to position_profile (PositionMatchedConfig)"
    )
    draws_at_random = True
    balances_positions = False  # it has its own position rule: selection_positions='balanced' is refused

    def __init__(self, args):
        super().__init__(args)
        profile = getattr(args, "position_profile", None)
        if profile is None:
            raise ValueError(
                f"selection_method={self.name!r} needs the profile it copies: build the config as "
                "benchmarks.quality.position_matched.PositionMatchedConfig(position_profile=[10 kept fractions], ...)."
            )
        self.profile = torch.tensor(check_profile(profile), dtype=torch.float64)

    def select(self, signals, regions, plan):
        keep = select_position_matched(regions.sequence_response, self.ratio, self.profile, signals.generator)
        return regions.to_predictions(keep, False), None

    def describe(self) -> str:
        profile = ", ".join(f"{value:.2f}" for value in self.profile.tolist())
        return (
            f"a random {self.ratio:g} of every response's tokens, kept by response-position decile in proportion to "
            f"the profile ({profile}) (a control: no score)"
        )


@contextlib.contextmanager
def registered():
    """The control in the package's registry for the duration (config validation, the trainer and the model card look
    its name up there), and out of it again afterwards, unless it was there before."""
    added = METHODS.get(PositionMatchedRandom.name) is not PositionMatchedRandom
    if added:
        register(PositionMatchedRandom)
    try:
        yield PositionMatchedRandom
    finally:
        if added:
            METHODS.pop(PositionMatchedRandom.name, None)


# ----- the harness side: where a control run's profile comes from -----

# The benchmark method of each control, and the method whose measured profile it copies
SOURCE_OF = {"random[position_matched]": "sstoken"}


def _shared(overrides: dict, method_keys) -> dict:
    return {key: value for key, value in overrides.items() if key not in method_keys}


def is_source(candidate: dict, job: dict, method_table: dict) -> bool:
    """Whether `candidate` (a job or a run) is the run whose profile `job` copies: the `main` run of
    `SOURCE_OF[job["name"]]` on the same data and seed, with the same settings apart from the two methods' own
    overrides (so a budget or any other shared setting has to match too)."""
    source = SOURCE_OF[job["name"]]
    own = {*method_table[source], *method_table[job["name"]]}
    return (
        candidate.get("group") == "main"
        and candidate.get("name") == source
        and candidate.get("data") == job["data"]
        and candidate.get("seed") == job["seed"]
        and candidate.get("max_steps") == job.get("max_steps")
        and _shared(candidate["overrides"], own) == _shared(job["overrides"], own)
    )


def resolve(job: dict, finished: list[dict], unfinished: list[dict], method_table: dict) -> tuple[str, object]:
    """What a job needs before it can start: ("ready", the job to run), ("wait", None) while its source run is still
    to finish, or ("fail", reason) when no source run will come (never a default profile). A control job comes back
    with `position_profile` (what it copies) and `position_profile_from` (which run it was measured on)."""
    if job["name"] not in SOURCE_OF:
        return "ready", job
    source = SOURCE_OF[job["name"]]
    where = f"{source} on the {job['data']} data, seed {job['seed']}"
    runs = [run for run in finished if is_source(run, job, method_table)]
    ok = [run for run in runs if run["status"] == "ok"]
    if not ok:
        if any(is_source(other, job, method_table) for other in unfinished):
            return "wait", None
        reason = f"whose run failed: {runs[-1]['error']}" if runs else "which is neither in this grid nor a finished "\
            "run of the --resume file"  # fmt: skip
        return "fail", f"{job['name']} copies the position profile of {where}, {reason}"
    run = ok[-1]
    profile = run["result"]["selection"]["kept_fraction_by_position_decile"]
    try:
        profile = check_profile(profile, f"the kept_fraction_by_position_decile of {where}")
    except ValueError as error:
        return "fail", str(error)
    origin = {"name": source, "data": run["data"], "seed": run["seed"], "resumed": bool(run.get("resumed"))}
    return "ready", {**job, "position_profile": profile, "position_profile_from": origin}


def missing_sources(
    chosen: list[str], datasets: list[str], seeds: list[int], methods_by_data: dict, earlier_runs: list[dict]
) -> list[str]:
    """Before anything is trained: the (control, data, seed) cells whose source method is neither scheduled in this
    invocation nor a finished `main` run of the --resume file, as readable strings (empty: nothing missing)."""
    missing = []
    for name in chosen:
        source = SOURCE_OF.get(name)
        if source is None:
            continue
        for dataset in datasets:
            allowed = methods_by_data.get(dataset)
            if allowed is not None and name not in allowed:
                continue  # the control is not scheduled on this data
            scheduled = source in chosen and (allowed is None or source in allowed)
            for seed in seeds:
                earlier = any(run["group"] == "main" and run["name"] == source and run["data"] == dataset
                              and run["seed"] == seed and run["status"] == "ok" for run in earlier_runs)  # fmt: skip
                if not scheduled and not earlier:
                    missing.append(f"{name} on {dataset} seed {seed} (needs {source} on {dataset} seed {seed})")
    return missing
