"""The method itself: pure tensor functions that turn per-token signals into a selection mask.

Every tensor here is in *prediction space*: shape (B, T - 1), where column j scores the token at position j + 1
(TRL's fused LM head returns `log_probs[:, j] = log p(token j+1 | tokens <= j)`). Nothing in this module touches a
model, so every function can be tested against a hand computation.
"""

import math

import torch


MINMAX_EPS = 1e-8


def retrospective_excess_loss(current_logps: torch.Tensor, history_logps: torch.Tensor) -> torch.Tensor:
    """REL = L_hist - L_cur = log p_cur - log p_hist, (B, T-1).

    Positive where the current model predicts the token better than its history did: the model has made progress on
    it, so it is learnable. This is the opposite sign of Rho-1's excess loss (L_cur - L_ref).
    """
    return current_logps.float() - history_logps.float()


def minmax_per_row(values: torch.Tensor, mask: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """Min-max normalise each row over its masked positions into [0, 1]; 0 off the mask.

    A row whose masked values are all equal maps to 0, so the other score component decides it. The arithmetic is
    float64, so that no finite float32 row overflows (a span above float32's maximum would give inf / inf = NaN);
    the result is float32.
    """
    values = values.double()
    row_min = values.masked_fill(~mask, math.inf).amin(dim=-1, keepdim=True)
    row_max = values.masked_fill(~mask, -math.inf).amax(dim=-1, keepdim=True)
    normalised = (values - row_min) / (row_max - row_min + eps)
    return normalised.masked_fill(~mask, 0.0).float()


def num_to_keep(response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-row count of tokens to keep, ceil(ratio * n) for the n masked positions of each row, (B,) long.

    The product is rounded to 6 decimals before the ceiling so that float error never adds a token (0.6 * 5 is
    3.0000000000000004 in floating point; this keeps 3). Any row with a response keeps at least one token. It
    depends on the labels alone, so the kept count of a whole accumulation window is known before any forward.
    """
    n = response_mask.sum(dim=-1).long()
    k = torch.ceil(torch.round(n.double() * ratio, decimals=6)).long()
    return torch.where(n > 0, k.clamp(min=1), 0).minimum(n)


def top_k_per_row(scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k[b] highest-scoring masked positions of each row b, (B, T-1) bool.

    Ties go to the earlier position (stable sort). Non-finite scores (NaN, +inf, -inf alike) rank below every finite
    one, in position order, but stay eligible, so a row always keeps exactly min(k[b], n[b]) tokens.
    """
    return (_rank_per_row(scores, mask) < k.unsqueeze(-1)) & mask


def _rank_per_row(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each position's rank in its row, 0 = best, by `top_k_per_row`'s order (masked finite scores descending, ties
    to the earlier position, then masked non-finite ones, then the positions off the mask), (B, T-1) long."""
    scores = scores.float()
    finite = torch.isfinite(scores)
    # Order by score (stable: ties keep position order), then stably by tier: finite masked, non-finite masked, off mask
    order = torch.sort(scores.masked_fill(~finite, 0.0), dim=-1, descending=True, stable=True).indices
    tier = torch.where(mask, torch.where(finite, 2, 1), 0).gather(-1, order)
    order = order.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)
    positions = torch.arange(scores.size(-1), device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


# ----- position-balanced selection (`selection_positions="balanced"`, docs/method.md) -----


def position_buckets(mask: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """The relative-position bucket of each masked position, (B, T-1) long, -1 off the mask.

    The i-th of a row's n masked positions (i = 0 .. n-1, in position order, gaps between response segments skipped)
    lies in bucket floor(i * num_buckets / n): contiguous runs of the row's response tokens, of sizes floor(n / nb)
    or ceil(n / nb). With n < num_buckets some buckets are empty and the others hold one token each.
    """
    rank = torch.cumsum(mask.long(), dim=-1) - 1
    n = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(mask, torch.div(rank * num_buckets, n, rounding_mode="floor"), -1)


def bucket_sizes(buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """How many positions each row has in each bucket, (B, num_buckets) long (-1 counts nowhere)."""
    one_hot = torch.nn.functional.one_hot(buckets.clamp(min=0), num_buckets) * (buckets >= 0).unsqueeze(-1)
    return one_hot.sum(dim=-2)


def bucket_quotas(sizes: torch.Tensor, k: torch.Tensor, tie_order: torch.Tensor | None = None) -> torch.Tensor:
    """Split each row's k into per-bucket quotas proportional to the bucket sizes, (B, nb) long.

    Largest remainder (Hamilton): every bucket gets floor(k * size / n), and the k - sum of those tokens left over go,
    one each, to the buckets with the largest fractional part; among equal fractional parts to the lowest
    `tie_order` (B, nb) (default: the earlier bucket). So the quotas sum to exactly k, each is within one token of
    proportional (floor or ceil of k * size / n), and none exceeds its bucket (k <= n gives k * size / n <= size, and a
    full bucket has no fractional part). Exact integer arithmetic.
    """
    n = sizes.sum(dim=-1, keepdim=True)
    k = torch.minimum(k.long().unsqueeze(-1), n)
    share = k * sizes  # exact: the proportional quota is share / n
    n_safe = n.clamp(min=1)
    base = torch.div(share, n_safe, rounding_mode="floor")
    remainder = share - base * n_safe  # fractional part times n
    left_over = k - base.sum(dim=-1, keepdim=True)
    order = torch.arange(sizes.size(-1), device=sizes.device).expand_as(sizes)
    if tie_order is not None:
        order = torch.sort(tie_order, dim=-1, stable=True).indices
    order = order.gather(-1, torch.sort(remainder.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    positions = torch.arange(sizes.size(-1), device=sizes.device).expand_as(order)
    place = torch.empty_like(order).scatter_(-1, order, positions)
    return base + (place < left_over).long()


def balanced_top_k_per_row(
    scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, num_buckets: int
) -> torch.BoolTensor:
    """Position-balanced top-k: the same min(k[b], n[b]) tokens per row as `top_k_per_row`, taken as quotas from
    `num_buckets` contiguous relative-position buckets of the row's masked positions (`position_buckets`), so the
    kept fraction is flat along the response while the score chooses within each bucket.

    A bucket keeps its best tokens by `top_k_per_row`'s order. Its quota is `bucket_quotas`' largest remainder, the
    tokens left over going, among buckets with equal fractional parts, to the bucket whose next token scores best, so
    the score also decides what rounding leaves open. With one bucket, and for rows with no more masked positions
    than buckets (every bucket holds one token or none, all remainders tie), it is `top_k_per_row` exactly.
    """
    return _top_k_in_buckets(scores, position_buckets(mask, num_buckets), k, num_buckets)


def _top_k_in_buckets(scores: torch.Tensor, buckets: torch.Tensor, k: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """`balanced_top_k_per_row` on given buckets (B, T-1), -1 off the mask (rho1 passes buckets pooled in one row)."""
    mask = buckets >= 0
    bucket = buckets.clamp(min=0)
    rank = _rank_per_row(scores, mask)  # the row's order
    order = torch.argsort(rank, dim=-1)  # positions, best first (the ranks are a permutation)
    in_order = bucket.gather(-1, order)
    one_hot = torch.nn.functional.one_hot(in_order, num_buckets) * mask.gather(-1, order).unsqueeze(-1)
    within = torch.empty_like(order).scatter_(-1, order, (torch.cumsum(one_hot, dim=-2) * one_hot).sum(-1) - 1)
    sizes = one_hot.sum(dim=-2)
    # Each bucket's next candidate beyond its floor quota, by its rank in the row: the leftover tokens' tie-break
    n = sizes.sum(dim=-1, keepdim=True).clamp(min=1)
    floor = torch.div(torch.minimum(k.long().unsqueeze(-1), n) * sizes, n, rounding_mode="floor")
    candidate = mask & (within == floor.gather(-1, bucket))
    missing = rank.size(-1)  # a bucket without a candidate (full) has no remainder either
    candidate_rank = torch.full_like(sizes, missing).scatter_reduce(
        -1, bucket, torch.where(candidate, rank, missing), reduce="amin"
    )
    quotas = bucket_quotas(sizes, k, tie_order=candidate_rank)
    return mask & (within < quotas.gather(-1, bucket))


def combine_scores(
    rel: torch.Tensor | None,
    attention: torch.Tensor | None,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
) -> torch.Tensor:
    """score = gamma * minmax(REL) + (1 - gamma) * attention, (B, T-1).

    `gamma` is a float or a per-row (B,) tensor (rows without any context fall back to REL only). A component whose
    weight is zero everywhere may be None, so callers can skip the forward pass that would produce it.
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float32, device=response_mask.device)
    gamma = gamma.reshape(-1, 1) if gamma.dim() == 1 else gamma
    score = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    if bool((gamma > 0).any()):
        if rel is None:
            raise ValueError("REL is needed when gamma > 0 but was not given.")
        score = score + gamma * minmax_per_row(rel, response_mask)
    if bool((gamma < 1).any()):
        if attention is None:
            raise ValueError("The attention score is needed when gamma < 1 but was not given.")
        score = score + (1 - gamma) * attention.float()
    return score.masked_fill(~response_mask, 0.0)


def select_tokens(
    current_logps: torch.Tensor | None,
    history_logps: torch.Tensor | None,
    attention: torch.Tensor | None,
    response_mask: torch.Tensor,
    ratio: float,
    gamma: float | torch.Tensor,
) -> torch.BoolTensor:
    """ssToken's selection: per row, the top ceil(ratio * n) response tokens by the combined score.

    Shapes: all (B, T-1), aligned per predicted token; `response_mask` is True where the label is not -100. The
    log-probs may be None when gamma is 0 everywhere, the attention when gamma is 1 everywhere. A row without
    response positions keeps nothing. Padding is never selected, since it is never in `response_mask`.
    """
    rel = None
    if current_logps is not None and history_logps is not None:
        rel = retrospective_excess_loss(current_logps, history_logps)
    scores = combine_scores(rel, attention, response_mask, gamma)
    return top_k_per_row(scores, response_mask, num_to_keep(response_mask, ratio))


def select_random(
    response_mask: torch.Tensor, ratio: float, generator: torch.Generator, num_buckets: int | None = None
) -> torch.BoolTensor:
    """The `random` baseline: ceil(ratio * n) response tokens per row, uniformly, from `generator`; with
    `num_buckets`, stratified by relative position (`balanced_top_k_per_row`)."""
    noise = torch.rand(response_mask.shape, generator=generator, device=generator.device).to(response_mask.device)
    k = num_to_keep(response_mask, ratio)
    if num_buckets is None:
        return top_k_per_row(noise, response_mask, k)
    return balanced_top_k_per_row(noise, response_mask, k, num_buckets)


# ----- baselines -----


def excess_loss(current_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Rho-1's excess loss, L_cur - L_ref = log p_ref - log p_cur, (B, T-1): high where the reference model, trained
    on clean data, predicts the token and the current model does not yet (Lin et al., 2024)."""
    return reference_logps.float() - current_logps.float()


def top_k_per_batch(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.BoolTensor:
    """Rho-1's selection: the top ceil(ratio * n) masked positions of the whole batch, not of each row."""
    keep = top_k_per_row(scores.reshape(1, -1), mask.reshape(1, -1), num_to_keep(mask.reshape(1, -1), ratio))
    return keep.reshape(mask.shape)


def balanced_top_k_per_batch(
    scores: torch.Tensor, mask: torch.Tensor, ratio: float, num_buckets: int
) -> torch.BoolTensor:
    """Rho-1's selection, position-balanced: the same ceil(ratio * n) tokens of the whole batch, taken as quotas from
    relative-position buckets pooled over the rows (bucket b of the batch is bucket b of every row), so sequences
    still compete for the batch's budget while the kept fraction is flat along the response. One row per sequence:
    (S, L) from `Regions.to_sequences`. With one bucket it is `top_k_per_batch` exactly.
    """
    buckets = position_buckets(mask, num_buckets).reshape(1, -1)
    k = num_to_keep(mask.reshape(1, -1), ratio)
    return _top_k_in_buckets(scores.reshape(1, -1), buckets, k, num_buckets).reshape(mask.shape)


def select_by_probability(current_logps: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.BoolTensor:
    """ProFit's selection: the masked tokens whose current probability is at least `threshold`."""
    return mask & (current_logps.float() >= math.log(threshold))


def probability_weights(current_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DFT's per-token weight: the detached probability of the token (Wu et al., 2025), 0 off the mask."""
    return current_logps.detach().float().exp() * mask
