"""The image-text losses of the study, behind one registry.

Every loss is an ``nn.Module`` built by :func:`make_loss` and called as
``loss(image_emb, text_emb, index)``:

* ``image_emb``, ``text_emb``: the raw projections ``[B, D]`` of this
  process's rows. Each loss L2-normalises them when its method calls for it
  (VICReg uses them as they are).
* ``index``: a ``LongTensor [B]`` of the rows' dataset indices; losses with
  per-sample state address their state with it (stateless losses ignore it and
  accept ``None``).
* returns a scalar tensor to back-propagate.

Common behaviour (the base class :class:`PairLoss`):

* Distributed: embeddings and indices are gathered from all ranks
  (:mod:`clipstudy.core.distributed`) and the loss is computed on the global batch,
  identically on every rank, so ``W`` ranks x ``B/W`` rows give the loss, the
  gradients and the state of one process x ``B`` rows.
* Precision: autocast is switched off inside the loss and the embeddings are
  cast to float32 (float64 inputs stay float64), and every exponential is
  shifted, so temperature 0.01 under float16/bfloat16 autocast gives finite
  values and gradients.
* State lives in registered buffers (and SigLIP's learned scale and bias in
  parameters): it is saved by ``state_dict()`` and moved by ``.to(device)``.
  ``stateful`` says whether a forward call advances the state.
* ``extra_metrics()`` returns values worth logging each step (default ``{}``).

Adding a loss is one decorated class: ``@register_loss("name")`` on a
:class:`PairLoss` subclass that implements ``compute``.

Layout: this module is the public entry (:func:`make_loss` and the stateless
losses CLIP, CyCLIP, VICReg, SigLIP); the registry and :class:`PairLoss` live in
:mod:`clipstudy.core.losses_base`, the stateful global-contrastive losses (SogCLR,
iSogCLR, OnlineCLR) in :mod:`clipstudy.core.losses_global`. Every name is importable
from here.

The definitions follow the study's protocol (``docs/protocol.md``) and the official code
of each method; each class says where it departs from that code and why.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from clipstudy.core.losses_base import LOSSES, PairLoss, _check, _non_negative, _normalize, register_loss

# the stateful losses live in their own module; importing them here registers them and keeps
# ``from clipstudy.core.losses import SogClrLoss`` working
from clipstudy.core.losses_global import ISogClrLoss, OnlineClrLoss, SogClrLoss

__all__ = [
    "LOSSES",
    "register_loss",
    "available_losses",
    "make_loss",
    "PairLoss",
    "ClipLoss",
    "SogClrLoss",
    "ISogClrLoss",
    "CyClipLoss",
    "VicRegLoss",
    "OnlineClrLoss",
    "SigLipLoss",
]


def available_losses() -> list[str]:
    """Names accepted by :func:`make_loss`, sorted."""
    return sorted(LOSSES)


def losses_in_order() -> list[str]:
    """Every registered loss in its table order (the original study's first)."""
    return sorted(LOSSES, key=lambda name: (LOSSES[name].order, name))


def default_grid_losses() -> list[str]:
    """The losses ``sweep`` runs unless told otherwise, in table order."""
    return [name for name in losses_in_order() if LOSSES[name].in_default_grid]


def loss_help(name: str, width: int = 90) -> str:
    """The first paragraph of the loss's docstring, on one line of at most ``width`` characters."""
    paragraph = " ".join((inspect.getdoc(LOSSES[name]) or name).split("\n\n")[0].split())
    return paragraph if len(paragraph) <= width else paragraph[: width - 3].rstrip() + "..."


def check_loss_params(name: str, *, temperature: float, params: dict) -> None:
    """Raise ValueError (naming the parameter) unless ``params`` are what loss ``name`` accepts.

    Called at start-up, before any data is read; builds the loss once for a
    one-sample set, which checks every parameter the constructor checks.
    """
    make_loss(name, temperature=temperature, num_samples=1, **params)


def make_loss(name: str, *, temperature: float = 0.01, num_samples: int | None = None, **params) -> PairLoss:
    """Build the loss registered as ``name``.

    Args:
        name: one of :func:`available_losses`.
        temperature: the contrastive temperature tau (default 0.01); the initial
            temperature for iSogCLR; ignored by VICReg and SigLIP.
        num_samples: size of the training set; required by losses with
            per-sample state (``sogclr``, ``isogclr``), ignored by the others.
        **params: the loss's own parameters (see each class), e.g. ``gamma=0.8``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {available_losses()}")
    cls = LOSSES[name]
    accepted = cls.parameter_names()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are {accepted or 'none besides temperature'}"
        )
    return cls(temperature=temperature, num_samples=num_samples, **params)


# ------------------------------------------------------------------- CLIP
@register_loss("clip", display_name="CLIP", order=0, in_default_grid=True)
class ClipLoss(PairLoss):
    """CLIP (Radford et al., 2021): mean of the image->text and text->image
    cross-entropies of ``s / tau`` with the matching pair as the target.

    Args:
        temperature: tau (default 0.01).
    """

    def compute(self, image_emb, text_emb, index):
        logits = _normalize(image_emb) @ _normalize(text_emb).T / self.temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------- CyCLIP
@register_loss("cyclip", display_name="CyCLIP", order=2, in_default_grid=True)
class CyClipLoss(PairLoss):
    """CyCLIP (Goel et al., NeurIPS 2022): the CLIP loss plus two cycle-consistency terms,

        lambda_inmodal    * (1/B) sum_{i,j} (u_i.u_j - v_i.v_j)^2
        lambda_crossmodal * (1/B) sum_{i,j} (u_i.v_j - u_j.v_i)^2

    which is the official code's ``(logit difference)^2.mean() * tau^2 * B``
    (sum over j, mean over i).

    Args:
        temperature: tau of the CLIP term (default 0.01).
        lambda_inmodal: weight of the in-modal term (default 0.25).
        lambda_crossmodal: weight of the cross-modal term (default 0.25).
    """

    def __init__(
        self,
        temperature: float = 0.01,
        num_samples: int | None = None,
        lambda_inmodal: float = 0.25,
        lambda_crossmodal: float = 0.25,
    ):
        super().__init__(temperature, num_samples)
        self.lambda_inmodal = _non_negative("lambda_inmodal", lambda_inmodal)
        self.lambda_crossmodal = _non_negative("lambda_crossmodal", lambda_crossmodal)

    def compute(self, image_emb, text_emb, index):
        u, v = _normalize(image_emb), _normalize(text_emb)
        batch = u.shape[0]
        sim = u @ v.T
        labels = torch.arange(batch, device=sim.device)
        logits = sim / self.temperature
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        inmodal = (u @ u.T - v @ v.T).square().sum() / batch
        crossmodal = (sim - sim.T).square().sum() / batch
        return contrastive + self.lambda_inmodal * inmodal + self.lambda_crossmodal * crossmodal


# ----------------------------------------------------------------- VICReg
@register_loss("vicreg", display_name="VICReg", order=3, in_default_grid=True)
class VicRegLoss(PairLoss):
    """VICReg (Bardes et al., ICLR 2022) across modalities, on the unnormalised embeddings x (image), y (text):

        sim_coeff * MSE(x, y)
        + std_coeff * (mean_d relu(1 - std_d(x)) + mean_d relu(1 - std_d(y))) / 2
        + cov_coeff * (sum_{d != e} C(x)_de^2 + sum_{d != e} C(y)_de^2) / D

    with ``std = sqrt(var + 1e-4)`` (unbiased variance) and ``C`` the unbiased
    covariance, as in the official ``main_vicreg.py``. ``temperature`` is unused.

    Args:
        sim_coeff: invariance weight (default 25.0).
        std_coeff: variance weight (default 25.0).
        cov_coeff: covariance weight (default 1.0).
    """

    min_batch = 2  # the variance needs two rows

    def __init__(
        self,
        temperature: float = 0.01,
        num_samples: int | None = None,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
    ):
        super().__init__(temperature, num_samples)
        self.sim_coeff = _non_negative("sim_coeff", sim_coeff)
        self.std_coeff = _non_negative("std_coeff", std_coeff)
        self.cov_coeff = _non_negative("cov_coeff", cov_coeff)

    def compute(self, image_emb, text_emb, index):
        batch, dim = image_emb.shape
        invariance = F.mse_loss(image_emb, text_emb)
        x = image_emb - image_emb.mean(dim=0)
        y = text_emb - text_emb.mean(dim=0)
        std_x = torch.sqrt(x.var(dim=0) + 1e-4)
        std_y = torch.sqrt(y.var(dim=0) + 1e-4)
        variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
        cov_x = (x.T @ x) / (batch - 1)
        cov_y = (y.T @ y) / (batch - 1)
        # off-diagonal sum of squares as total minus diagonal: no D x D mask to gather and scatter
        covariance = sum(c.square().sum() - c.diagonal().square().sum() for c in (cov_x, cov_y)) / dim
        return self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance


# ----------------------------------------------------------------- SigLIP
@register_loss("siglip", display_name="SigLIP", order=6)
class SigLipLoss(PairLoss):
    """SigLIP (Zhai et al., ICCV 2023), as open_clip's ``SigLipLoss``: with
    logits ``exp(t) * u_i.v_j + b`` and labels +1 for matching pairs, -1 otherwise,

        -(1/B) sum_{i,j} log sigmoid(label_ij * logit_ij)

    ``t`` (``logit_scale``) and ``b`` (``logit_bias``) are learned parameters
    (the optimizer applies no weight decay to them). ``temperature`` is unused.

    Args:
        init_logit_scale: initial t (default log 10).
        init_logit_bias: initial b (default -10).
    """

    def __init__(
        self,
        temperature: float = 0.01,
        num_samples: int | None = None,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
    ):
        super().__init__(temperature, num_samples)
        for name, value in (("init_logit_scale", init_logit_scale), ("init_logit_bias", init_logit_bias)):
            _check(name, value, isinstance(value, (int, float)) and math.isfinite(value), "must be a finite number")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def compute(self, image_emb, text_emb, index):
        sim = _normalize(image_emb) @ _normalize(text_emb).T
        logits = self.logit_scale.exp() * sim + self.logit_bias
        labels = 2 * torch.eye(sim.shape[0], dtype=sim.dtype, device=sim.device) - 1
        return -F.logsigmoid(labels * logits).sum() / sim.shape[0]

    def extra_metrics(self) -> dict[str, float]:
        """The learned scale exp(t), its inverse (a temperature) and the bias b."""
        scale = float(self.logit_scale.detach().exp())
        bias = float(self.logit_bias.detach())
        return {"siglip_scale": scale, "siglip_temperature": 1.0 / scale, "siglip_bias": bias}
