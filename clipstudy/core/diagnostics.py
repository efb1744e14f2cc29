"""Collapse diagnostics: how alike a batch's embeddings are, and how large the weights are.

A dual encoder has collapsed when every input maps to (nearly) the same
embedding: contrastive losses then sit at ln B and the gradient vanishes.
These figures make that a measurement instead of a guess:

* ``image_cos_mean`` / ``text_cos_mean``: the mean off-diagonal cosine
  similarity of the batch's L2-normalised embeddings (1.0 = collapsed,
  about 0 = spread out);
* ``image_std_mean`` / ``text_std_mean``: the per-dimension standard
  deviation over the batch of the L2-normalised embeddings, averaged over
  dimensions (VICReg's variance criterion; 0 = collapsed, at most
  ``1/sqrt(dim)`` for embeddings spread evenly over the sphere);
* ``weight_norm``: the Euclidean norm of all weight matrices and kernels
  (parameters with two or more dimensions, i.e. what weight decay shrinks;
  biases and norm scales excluded).

Training logs them at every history row (:func:`step_diagnostics`) and
``metrics.json`` holds the first and last logged values
(:func:`start_end_summary`), together with those of the gradient norm (a
history column of its own): a loss whose gradient is far smaller than
another's gets far shorter steps from SGD, whose step is the learning rate
times the gradient, but not from Adam or AdamW, which divide by a running
gradient scale. The first row's figures come from the forward pass of
step 1, i.e. from the initial weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIAGNOSTICS = ("image_cos_mean", "text_cos_mean", "image_std_mean", "text_std_mean", "weight_norm")
# Summarised as <name>_start / <name>_end in metrics.json: the diagnostics and the gradient norm before clipping.
SUMMARISED = (*DIAGNOSTICS, "grad_norm")
# Mean off-diagonal cosine at or above this: the embeddings barely depend on the input.
COLLAPSED_COS = 0.95


EMBEDDING_FIGURES = ("image_cos_mean", "text_cos_mean", "image_std_mean", "text_std_mean")


@torch.no_grad()
def _unit_figures(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean off-diagonal cosine, mean per-dimension std) of a batch's L2-normalised rows, as 0-d tensors on
    the batch's device, normalising once; None below two rows."""
    if embeddings.shape[0] < 2:
        return None
    unit = F.normalize(embeddings.float(), dim=1)
    n = unit.shape[0]
    # sum over all pairs = |sum of rows|^2; minus the diagonal (each row's |u|^2 = 1, or 0 for a zero row)
    total = unit.sum(0).square().sum() - unit.square().sum()
    return total / (n * (n - 1)), unit.std(dim=0).mean()


@torch.no_grad()
def _weight_squares(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().square().sum() for p in model.parameters() if p.ndim >= 2]


def weight_norm(model: torch.nn.Module) -> float:
    """sqrt of the summed squares of every parameter with two or more dimensions."""
    squares = _weight_squares(model)
    # summed in Python as float64, in order
    return math.sqrt(sum(torch.stack(squares).tolist())) if squares else 0.0


def _embedding_figures(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict:
    """EMBEDDING_FIGURES of both towers: 0-d tensors, or NaN for a batch below two rows."""
    out = {}
    for prefix, embeddings in (("image", image_emb), ("text", text_emb)):
        figures = _unit_figures(embeddings)
        out[f"{prefix}_cos_mean"], out[f"{prefix}_std_mean"] = figures if figures is not None else (math.nan,) * 2
    return {name: out[name] for name in EMBEDDING_FIGURES}


def embedding_diagnostics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """EMBEDDING_FIGURES of a batch's image and text embeddings (B x D each) as floats; NaN below two rows."""
    return {name: float(value) for name, value in _embedding_figures(image_emb, text_emb).items()}


def step_diagnostics(run) -> dict[str, float]:
    """The diagnostics of the step just taken: the embeddings train_step kept, and the weights now.

    Everything is reduced on the device and copied to the host at once: one copy per logged step.
    """
    from clipstudy.core.distributed import unwrap_model

    squares = _weight_squares(unwrap_model(run.model))
    figures = _embedding_figures(*run.last_embeddings) if run.last_embeddings is not None else {}
    tensors = [value for value in figures.values() if isinstance(value, torch.Tensor)]
    host = torch.stack(squares + tensors).tolist() if squares or tensors else []
    out = {"weight_norm": math.sqrt(sum(host[: len(squares)])) if squares else 0.0}
    copied = iter(host[len(squares) :])
    out.update({name: next(copied) if isinstance(value, torch.Tensor) else value for name, value in figures.items()})
    return out


def start_end_summary(history: list[dict]) -> dict[str, float]:
    """``<name>_start`` / ``<name>_end``: the first and last logged value of each diagnostic and the gradient norm."""
    out = {}
    for name in SUMMARISED:
        values = [row[name] for row in history if name in row]
        if values:
            out[f"{name}_start"], out[f"{name}_end"] = float(values[0]), float(values[-1])
    return out
