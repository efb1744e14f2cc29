"""Collapse diagnostics against hand-worked values.

The image and the text embeddings of each batch below have different known statistics, so a figure read from
the wrong tower (or under the wrong name) shows.
"""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from clipstudy.core import diagnostics

C = 1 / math.sqrt(2)
# every row points the same way (different lengths): a collapsed batch, cosine 1 and no spread
COLLAPSED = torch.tensor([[1.0, 2.0, -1.0]]) * torch.tensor([[0.5], [1.0], [3.0], [7.0]])
# unit directions (1, 0), (0, 1), (1, 1)/sqrt2: pair cosines 0, 1/sqrt2, 1/sqrt2
SPREAD = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
SPREAD_COS = (0 + C + C) / 3
# per-dimension sample std of the unit rows, by the standard library
SPREAD_STD = (statistics.stdev([1.0, 0.0, C]) + statistics.stdev([0.0, 1.0, C])) / 2
# opposite rows: cosine -1; unit rows (1, 0), (-1, 0): std sqrt(2) in the first dimension, 0 in the second
OPPOSITE = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])


def linear_with_known_norm() -> nn.Module:
    """A weight matrix of norm 3 (1 + 4 + 4 + 0 = 9), a bias and a norm scale that do not count."""
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
        model[0].bias.fill_(5.0)
        model[1].weight.fill_(4.0)
    return model


def test_each_towers_figures_come_from_its_own_embeddings():
    figures = diagnostics.embedding_diagnostics(COLLAPSED, SPREAD)
    assert list(figures) == list(diagnostics.EMBEDDING_FIGURES)
    assert figures["image_cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert figures["image_std_mean"] == pytest.approx(0.0, abs=1e-6)
    assert figures["text_cos_mean"] == pytest.approx(SPREAD_COS, abs=1e-6)
    assert figures["text_std_mean"] == pytest.approx(SPREAD_STD, abs=1e-6)
    assert all(type(v) is float for v in figures.values())
    assert figures["image_cos_mean"] >= diagnostics.COLLAPSED_COS > figures["text_cos_mean"]
    swapped = diagnostics.embedding_diagnostics(SPREAD, OPPOSITE)
    assert swapped["image_cos_mean"] == pytest.approx(SPREAD_COS, abs=1e-6)
    assert swapped["image_std_mean"] == pytest.approx(SPREAD_STD, abs=1e-6)
    assert swapped["text_cos_mean"] == pytest.approx(-1.0, abs=1e-6)
    assert swapped["text_std_mean"] == pytest.approx(math.sqrt(2) / 2, abs=1e-6)


def test_a_batch_below_two_rows_has_no_figures():
    figures = diagnostics.embedding_diagnostics(SPREAD[:1], SPREAD)
    assert math.isnan(figures["image_cos_mean"]) and math.isnan(figures["image_std_mean"])
    assert figures["text_cos_mean"] == pytest.approx(SPREAD_COS, abs=1e-6)
    figures = diagnostics.embedding_diagnostics(SPREAD, SPREAD[:1])
    assert math.isnan(figures["text_cos_mean"]) and math.isnan(figures["text_std_mean"])
    assert figures["image_std_mean"] == pytest.approx(SPREAD_STD, abs=1e-6)


def test_spread_and_cosine_agree_with_the_identity_that_links_them():
    # for n unit rows, the per-dimension sample variances sum to 1 - mean off-diagonal cosine, so the mean of
    # the D standard deviations is at most sqrt((1 - cosine) / D) (Jensen), with equality when all are equal
    rows = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    figures = diagnostics.embedding_diagnostics(rows, rows + 3.0)  # shifted: more alike
    unit = rows / rows.norm(dim=1, keepdim=True)
    assert unit.var(dim=0).sum().item() == pytest.approx(1 - figures["image_cos_mean"], abs=1e-5)
    for tower in ("image", "text"):
        assert figures[f"{tower}_std_mean"] <= math.sqrt((1 - figures[f"{tower}_cos_mean"]) / 8) + 1e-6
    assert figures["text_cos_mean"] > figures["image_cos_mean"]


def test_weight_norm_counts_matrices_not_biases_or_norm_scales():
    assert diagnostics.weight_norm(linear_with_known_norm()) == pytest.approx(3.0)
    assert diagnostics.weight_norm(nn.LayerNorm(4)) == 0.0  # nothing weight decay shrinks


def test_step_diagnostics_reads_the_kept_embeddings_and_the_weights_now():
    run = SimpleNamespace(model=linear_with_known_norm(), last_embeddings=(COLLAPSED, SPREAD))
    figures = diagnostics.step_diagnostics(run)
    assert figures == pytest.approx(
        {
            "weight_norm": 3.0,
            "image_cos_mean": 1.0,
            "text_cos_mean": SPREAD_COS,
            "image_std_mean": 0.0,
            "text_std_mean": SPREAD_STD,
        },
        abs=1e-6,
    )
    assert all(type(v) is float for v in figures.values())
    # the same figures as embedding_diagnostics and weight_norm, in one copy to the host
    run = SimpleNamespace(model=linear_with_known_norm(), last_embeddings=(OPPOSITE, COLLAPSED))
    assert diagnostics.step_diagnostics(run) == pytest.approx(
        {"weight_norm": 3.0, **diagnostics.embedding_diagnostics(OPPOSITE, COLLAPSED)}
    )


def test_step_diagnostics_without_embeddings_matrices_or_rows():
    assert diagnostics.step_diagnostics(SimpleNamespace(model=linear_with_known_norm(), last_embeddings=None)) == {
        "weight_norm": pytest.approx(3.0)
    }
    assert diagnostics.step_diagnostics(SimpleNamespace(model=nn.LayerNorm(2), last_embeddings=None)) == {
        "weight_norm": 0.0
    }
    figures = diagnostics.step_diagnostics(SimpleNamespace(model=nn.LayerNorm(3), last_embeddings=(SPREAD, COLLAPSED)))
    assert figures["weight_norm"] == 0.0
    assert figures["image_cos_mean"] == pytest.approx(SPREAD_COS, abs=1e-6)
    assert figures["text_cos_mean"] == pytest.approx(1.0, abs=1e-6)
    # one image row: NaN for the image figures, the text figures still read, in their own places
    figures = diagnostics.step_diagnostics(
        SimpleNamespace(model=linear_with_known_norm(), last_embeddings=(SPREAD[:1], OPPOSITE))
    )
    assert math.isnan(figures["image_cos_mean"]) and math.isnan(figures["image_std_mean"])
    assert figures["text_cos_mean"] == pytest.approx(-1.0, abs=1e-6)
    assert figures["text_std_mean"] == pytest.approx(math.sqrt(2) / 2, abs=1e-6)
    assert figures["weight_norm"] == pytest.approx(3.0)
    figures = diagnostics.step_diagnostics(SimpleNamespace(model=nn.LayerNorm(2), last_embeddings=(OPPOSITE[:1],) * 2))
    assert figures["weight_norm"] == 0.0 and all(math.isnan(figures[n]) for n in diagnostics.EMBEDDING_FIGURES)


def test_start_end_summary_takes_first_and_last_logged_values():
    history = [
        {"step": 1, "text_cos_mean": 0.9, "weight_norm": 10.0},
        {"step": 2, "loss": 1.0, "text_cos_mean": 0.5},
        {"step": 3, "text_cos_mean": 0.2, "weight_norm": 8.0},
    ]
    summary = diagnostics.start_end_summary(history)
    assert summary == {
        "text_cos_mean_start": 0.9,
        "text_cos_mean_end": 0.2,
        "weight_norm_start": 10.0,
        "weight_norm_end": 8.0,
    }
    assert diagnostics.start_end_summary([]) == {}


def test_start_end_summary_includes_the_gradient_norm():
    history = [{"step": 1, "grad_norm": 60.0, "weight_norm": 10.0}, {"step": 2, "grad_norm": 5.0, "weight_norm": 9.0}]
    assert diagnostics.start_end_summary(history) == {
        "weight_norm_start": 10.0,
        "weight_norm_end": 9.0,
        "grad_norm_start": 60.0,
        "grad_norm_end": 5.0,
    }


def test_init_diagnostics_measures_the_initial_model_without_training(demo_data_dir, tmp_path):
    # the function behind the initialisation table of docs/results.md, on the smoke profile (random towers)
    from clipstudy.engine.build import build_model_for
    from clipstudy.engine.config import make_config
    from clipstudy.engine.initial_state import init_diagnostics
    from clipstudy.engine.runstate import seed_everything

    config = make_config("smoke", data=str(demo_data_dir), out=str(tmp_path), threads=1)
    figures = init_diagnostics(config, n=16)
    assert set(figures) == set(diagnostics.DIAGNOSTICS)
    # the weights are the seed's initial ones: the norm of every matrix of a model built from that seed
    seed_everything(config.seed)
    model, _ = build_model_for(config)
    matrices = torch.cat([p.detach().flatten() for p in model.parameters() if p.ndim >= 2])
    assert figures["weight_norm"] == pytest.approx(torch.linalg.vector_norm(matrices.double()).item(), rel=1e-6)
    for tower in ("image", "text"):
        cos, std = figures[f"{tower}_cos_mean"], figures[f"{tower}_std_mean"]
        assert -1 / 15 - 1e-6 <= cos <= 1 + 1e-6  # 16 unit rows: the mean pair cosine is at least -1/(n - 1)
        assert 0 <= std <= math.sqrt((1 - cos) / config.embed_dim) + 1e-6
    # deterministic, and ``n`` picks how many training pairs are embedded
    assert init_diagnostics(config, n=16) == figures
    assert init_diagnostics(config, n=4)["text_cos_mean"] != figures["text_cos_mean"]
