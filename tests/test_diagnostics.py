"""Collapse diagnostics against hand-worked values."""

import math
import statistics

import pytest
import torch
from torch import nn

from clipstudy.core import diagnostics


def test_collapsed_batch_has_cosine_one_and_no_spread():
    # every row points the same way (different lengths): a collapsed batch
    rows = torch.tensor([[1.0, 2.0, -1.0]]) * torch.tensor([[0.5], [1.0], [3.0], [7.0]])
    assert diagnostics.mean_offdiagonal_cosine(rows) == pytest.approx(1.0, abs=1e-6)
    assert diagnostics.mean_dimension_std(rows) == pytest.approx(0.0, abs=1e-6)
    assert diagnostics.mean_offdiagonal_cosine(rows) >= diagnostics.COLLAPSED_COS


def test_hand_computed_batch():
    # unit directions (1, 0), (0, 1), (1, 1)/sqrt2: pair cosines 0, 1/sqrt2, 1/sqrt2
    rows = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    assert diagnostics.mean_offdiagonal_cosine(rows) == pytest.approx((0 + c + c) / 3, abs=1e-6)
    # per-dimension sample std of the unit rows, by the standard library
    expected = (statistics.stdev([1.0, 0.0, c]) + statistics.stdev([0.0, 1.0, c])) / 2
    assert diagnostics.mean_dimension_std(rows) == pytest.approx(expected, abs=1e-6)
    # opposite rows: cosine -1
    assert diagnostics.mean_offdiagonal_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)


def test_weight_norm_counts_matrices_not_biases_or_norm_scales():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
        model[0].bias.fill_(5.0)
        model[1].weight.fill_(4.0)
    assert diagnostics.weight_norm(model) == pytest.approx(3.0)


def test_start_end_summary_takes_first_and_last_logged_values():
    history = [
        {"step": 1, "text_cos_mean": 0.9, "weight_norm": 10.0},
        {"step": 2, "loss": 1.0},
        {"step": 3, "text_cos_mean": 0.2, "weight_norm": 8.0},
    ]
    summary = diagnostics.start_end_summary(history)
    assert summary == {
        "text_cos_mean_start": 0.9,
        "text_cos_mean_end": 0.2,
        "weight_norm_start": 10.0,
        "weight_norm_end": 8.0,
    }


def test_start_end_summary_includes_the_gradient_norm():
    history = [{"step": 1, "grad_norm": 60.0, "weight_norm": 10.0}, {"step": 2, "grad_norm": 5.0, "weight_norm": 9.0}]
    assert diagnostics.start_end_summary(history) == {
        "weight_norm_start": 10.0,
        "weight_norm_end": 9.0,
        "grad_norm_start": 60.0,
        "grad_norm_end": 5.0,
    }
