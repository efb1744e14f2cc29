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


@torch.no_grad()
def mean_offdiagonal_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs i != j of the rows of ``embeddings`` (B x D, B >= 2)."""
    if embeddings.shape[0] < 2:
        return float("nan")
    return _offdiagonal_cosine_of_unit(F.normalize(embeddings.float(), dim=1))


def _offdiagonal_cosine_of_unit(unit: torch.Tensor) -> float:
    n = unit.shape[0]
    # sum over all pairs = |sum of rows|^2; minus the diagonal (each row's |u|^2 = 1, or 0 for a zero row)
    total = unit.sum(0).square().sum() - unit.square().sum()
    return float(total / (n * (n - 1)))


@torch.no_grad()
def mean_dimension_std(embeddings: torch.Tensor) -> float:
    """Per-dimension standard deviation over the batch of the L2-normalised rows, averaged over dimensions."""
    if embeddings.shape[0] < 2:
        return float("nan")
    return float(F.normalize(embeddings.float(), dim=1).std(dim=0).mean())


@torch.no_grad()
def _unit_diagnostics(embeddings: torch.Tensor, prefix: str) -> dict[str, float]:
    """Both figures of one tower's batch, normalising it once."""
    if embeddings.shape[0] < 2:
        return {f"{prefix}_cos_mean": float("nan"), f"{prefix}_std_mean": float("nan")}
    unit = F.normalize(embeddings.float(), dim=1)
    return {f"{prefix}_cos_mean": _offdiagonal_cosine_of_unit(unit), f"{prefix}_std_mean": float(unit.std(dim=0).mean())}


@torch.no_grad()
def weight_norm(model: torch.nn.Module) -> float:
    """sqrt of the summed squares of every parameter with two or more dimensions."""
    squares = [p.detach().float().square().sum() for p in model.parameters() if p.ndim >= 2]
    # one device-to-host copy per logged step (not one per tensor); summed in Python as float64, in order
    return math.sqrt(sum(torch.stack(squares).tolist())) if squares else 0.0


def embedding_diagnostics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    both = {**_unit_diagnostics(image_emb, "image"), **_unit_diagnostics(text_emb, "text")}
    return {name: both[name] for name in ("image_cos_mean", "text_cos_mean", "image_std_mean", "text_std_mean")}


def step_diagnostics(run) -> dict[str, float]:
    """The diagnostics of the step just taken: the embeddings train_step kept, and the weights now."""
    from clipstudy.distributed import unwrap_model

    out = {"weight_norm": weight_norm(unwrap_model(run.model))}
    embeddings = run.last_embeddings
    if embeddings is not None:
        out.update(embedding_diagnostics(*embeddings))
    return out


def start_end_summary(history: list[dict]) -> dict[str, float]:
    """``<name>_start`` / ``<name>_end``: the first and last logged value of each diagnostic and the gradient norm."""
    out = {}
    for name in SUMMARISED:
        values = [row[name] for row in history if name in row]
        if values:
            out[f"{name}_start"], out[f"{name}_end"] = float(values[0]), float(values[-1])
    return out


def is_collapsed(cos_mean: float | None) -> bool:
    return cos_mean is not None and cos_mean == cos_mean and cos_mean >= COLLAPSED_COS


@torch.no_grad()
def init_diagnostics(config, n: int = 64, progress: bool = False) -> dict[str, float]:
    """The diagnostics of a run's initial model on its first ``n`` training pairs (no training).

    Builds the model exactly as a run would (seed, towers, pretrained weights)
    and embeds the pairs with the evaluation transform.
    """
    from clipstudy.data import eval_transform, make_collate
    from clipstudy.runstate import seed_everything
    from clipstudy.train import build_datasets, build_model_for
    from clipstudy.pretrain import load_pretrained_towers

    train_set, _, _ = build_datasets(config)
    seed_everything(config.seed)
    model, tokenizer = build_model_for(config)
    load_pretrained_towers(model, config, progress=progress)
    model.eval()
    base = train_set.dataset if isinstance(train_set, torch.utils.data.Subset) else train_set
    base.transform = eval_transform(config.image_size)
    items = [base[i] for i in range(min(n, len(base)))]
    batch = make_collate(tokenizer, max_length=config.max_length)(items)
    image_emb, text_emb = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return {**embedding_diagnostics(image_emb, text_emb), "weight_norm": weight_norm(model)}
