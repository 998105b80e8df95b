"""The selection metrics (metrics.py) on a hand-computed case."""

import math

import pytest
import torch
from test_loss import two_sequences

from trl_sstoken.selection.methods import Selection, Signals, StepPlan
from trl_sstoken.selection.metrics import METRIC_PREFIX, selection_metrics, selection_sums


def test_selection_metrics_from_sums():
    regions = two_sequences()
    keep = torch.tensor([[True, False, False, True, True, False]])
    rel = torch.tensor([[1.0, 3.0, 7.0, 0.0, 0.0, 2.0]])  # on response columns 0, 1, 3, 4, 5
    selection = Selection(keep, regions, StepPlan(None, False, False), signals=Signals(torch.zeros_like(rel), rel=rel))
    metrics = selection_metrics(selection_sums(selection).tolist(), in_warmup=True)
    values = [1.0, 3.0, 0.0, 0.0, 2.0]
    mean = sum(values) / 5
    assert metrics[METRIC_PREFIX + "selected_fraction"] == pytest.approx(3 / 5)
    assert metrics[METRIC_PREFIX + "warmup"] == 1.0
    assert metrics[METRIC_PREFIX + "rel_mean"] == pytest.approx(mean)
    assert metrics[METRIC_PREFIX + "rel_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 5))
    assert METRIC_PREFIX + "attention_mean" not in metrics
    assert metrics[METRIC_PREFIX + "empty_sequences"] == 0 and metrics[METRIC_PREFIX + "no_context_sequences"] == 0
