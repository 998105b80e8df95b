"""The attention scores (`SSTokenConfig.attention_score`): name -> function, each a pure reduction of one query
chunk's softmax weights to one number per query.

`context_attention_mass` (capture.py) computes the softmax weights of a chunk of queries once and hands them to the
chosen score; a score never sees the model. With p_hij the weight of head h, query i, key j:

- "context_mass" (the paper's): mean_h sum_{j in C} p_hij, C the context keys query i may see.
- "sink_free": the context mass with the sink keys S removed and the rest renormalised, pooled over heads:
  sum_h sum_{j in C - S} p_hij / sum_h sum_{j not in S} p_hij. Pooling (rather than renormalising each head and then
  averaging) weights each head by the mass it puts off the sink, so a "dormant" head that parks nearly all of its
  attention on the sink does not get a full vote for the few percent it has left. In [0, 1].
- "position_corrected": the sink-free mass m relative to what uniform attention over the visible non-sink keys would
  give, u = |C - S visible| / |visible - S|, reported as m / (m + u), in [0, 1) with 0.5 meaning "as much as uniform
  attention": a late response token sees more response keys than an early one, and the ratio removes that dilution.

Adding a score: one function with the signature below, one `AttentionScore` entry in `ATTENTION_SCORES` (or
`register_attention_score`), and its tests (tests/test_attention_scores.py).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


def context_mass(probs: torch.Tensor, allowed: torch.Tensor, context: torch.Tensor, sink) -> torch.Tensor:
    """probs (B, H_kv, G, c, K) softmax weights; allowed (B, c, K) bool; context, sink (B, K) bool -> (B, c)."""
    return (probs * context.float()[:, None, None, None, :]).sum(dim=-1).mean(dim=(1, 2))


def sink_free(probs: torch.Tensor, allowed: torch.Tensor, context: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    on_context = (probs * (context & ~sink).float()[:, None, None, None, :]).sum(dim=-1).sum(dim=(1, 2))
    off_sink = (probs * (~sink).float()[:, None, None, None, :]).sum(dim=-1).sum(dim=(1, 2))
    return torch.where(off_sink > 0, on_context / off_sink.clamp_min(1e-30), 0.0)


def position_corrected(
    probs: torch.Tensor, allowed: torch.Tensor, context: torch.Tensor, sink: torch.Tensor
) -> torch.Tensor:
    mass = sink_free(probs, allowed, context, sink)
    visible = allowed & ~sink[:, None, :]  # (B, c, K)
    uniform = (visible & context[:, None, :]).sum(-1) / visible.sum(-1).clamp_min(1)  # (B, c)
    return torch.where(uniform > 0, mass / (mass + uniform).clamp_min(1e-30), 0.0)


@dataclass(frozen=True)
class AttentionScore:
    name: str
    reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_sink: bool  # the capture computes the sink keys (`sink_keys`) only for scores that read them


ATTENTION_SCORES: dict[str, AttentionScore] = {}


def register_attention_score(name: str, reduce: Callable, needs_sink: bool) -> AttentionScore:
    """Adds a score to `ATTENTION_SCORES`, read at use time by the config and the capture."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"An attention score needs an identifier as its name, got {name!r}.")
    if name in ATTENTION_SCORES and ATTENTION_SCORES[name].reduce is not reduce:
        raise ValueError(f"attention score {name!r} is already registered; choose another name.")
    if not callable(reduce):
        raise TypeError(f"attention score {name!r}: reduce must be a function, got {reduce!r}.")
    ATTENTION_SCORES[name] = AttentionScore(name, reduce, bool(needs_sink))
    return ATTENTION_SCORES[name]


register_attention_score("context_mass", context_mass, needs_sink=False)
register_attention_score("sink_free", sink_free, needs_sink=True)
register_attention_score("position_corrected", position_corrected, needs_sink=True)


def attention_score(name: str) -> AttentionScore:
    if name not in ATTENTION_SCORES:
        raise ValueError(f"attention_score={name!r} is not supported; allowed values: {tuple(ATTENTION_SCORES)}.")
    return ATTENTION_SCORES[name]
