"""The stateful global-contrastive losses: SogCLR, iSogCLR and OnlineCLR.

They keep moving averages of summed exponentials across steps (per training
sample for SogCLR and iSogCLR, two scalars for OnlineCLR), all updated by the
one shifted moving average below. They register with the registry of
:mod:`clipstudy.core.losses_base`; build them with :func:`clipstudy.core.losses.make_loss`.
"""

from __future__ import annotations

import math

import torch

from clipstudy.core.losses_base import PairLoss, _check, _non_negative, _normalize, _positive, _rate, register_loss

__all__ = ["SogClrLoss", "ISogClrLoss", "OnlineClrLoss"]


@torch.no_grad()
def _shifted_moving_average(
    u_old: torch.Tensor,
    b_old: torch.Tensor,
    x: torch.Tensor,
    gamma: float,
    scale: float,
    first_visit: torch.Tensor | None = None,
):
    """One step of ``U <- (1 - gamma) U + gamma * scale * sum_j exp(x_j)`` (sum over the last dim).

    ``U`` is stored as ``u * exp(b)``, with the shift ``b`` chosen as the larger of
    this batch's ``max_j x_j`` and ``log((1 - gamma) U_old)``. Then every
    exponential computed is ``<= 1`` (no overflow) and ``u >= min(1, gamma *
    scale)`` (no underflow), whatever the temperature; ``u_old`` is rescaled by
    ``exp(b_old - b_new)`` so that ``u * exp(b)`` is exactly the moving
    average. (The SogCLR code keeps a pure running maximum, under which ``u``
    can underflow once the scores fall far below their historical maximum.)

    Args:
        x: scaled scores, ``-inf`` at excluded entries (the positive pair).
        first_visit: bool mask, same shape as ``u_old``; where True the average
            starts at the batch value (``U <- scale * sum exp(x)``).
    Returns:
        ``(u_new, b_new, exps)`` with ``exps = exp(x - b_new)``.
    """
    log_kept = torch.log(u_old * (1.0 - gamma)) + b_old  # -inf when u_old is 0 or gamma is 1
    rate = torch.full_like(u_old, gamma)
    if first_visit is not None:
        log_kept = log_kept.masked_fill(first_visit, -math.inf)
        rate = rate.masked_fill(first_visit, 1.0)
    b_new = torch.maximum(x.amax(dim=-1), log_kept)
    exps = torch.exp(x - b_new.unsqueeze(-1))
    u_new = torch.exp(log_kept - b_new) + rate * scale * exps.sum(dim=-1)
    return u_new, b_new, exps


# ----------------------------------------------------------------- SogCLR
@register_loss("sogclr", display_name="SogCLR", order=1, in_default_grid=True)
class SogClrLoss(PairLoss):
    """SogCLR (Yuan et al., ICML 2022): stochastic optimisation of the global
    contrastive loss

        (1/n) sum_i tau log( mean_{j != i} exp((s_ij - s_ii) / tau) )

    on the image side (anchor image i, negative texts j) plus the text side
    (anchor text i, negative images j). The inner mean ``g_i`` is tracked per
    sample by ``U_i <- (1 - gamma) U_i + gamma g_i(batch)`` and the gradient is
    the SogCLR estimator ``(1/B) sum_i sum_{j != i} exp((s_ij - s_ii)/tau) / U_i
    * grad(s_ij - s_ii) / (B - 1)`` per side. With ``gamma = 1`` it is exactly the
    gradient of the batch global contrastive loss.

    Returned value: the current estimate of the global contrastive loss,
    ``mean_i tau log(U_i)`` summed over the two sides (with ``gamma = 1``: the
    batch GCL itself); its gradient is the estimator above (a detached-weight
    surrogate carries the gradient).

    A sample's average starts at its first batch value (as in LibAUC's GCLoss),
    not at zero. Exponentials are shifted per sample (see
    :func:`_shifted_moving_average`). With duplicated indices in one batch the
    state keeps one of the rows' values.

    ``estimator="original"`` reproduces the study's code base instead: its
    shift ``b_i`` is a running maximum over every batch seen, taken over all
    pairs *including the positive* (so ``b_i >= 0``), and its weights are
    ``exp(x_ij - b_i) / (s_i + eps)`` with ``s_i = U_i exp(-b_i)`` and ``eps =
    1e-8``, i.e. ``exp(x_ij) / (U_i + eps exp(b_i))``. For an easy anchor
    (every negative far below the positive, so ``U_i`` is tiny at tau = 0.01)
    the ``eps`` term dominates and damps that anchor's gradient by orders of
    magnitude; ``s_i`` can also underflow to 0 (then the sample counts as not
    seen, where the code base would restart its average at ``gamma g_i``).

    Args:
        temperature: tau (default 0.01).
        num_samples: training set size (required).
        gamma: moving-average rate in (0, 1] (default 0.8).
        estimator: ``"exact"`` (default, above) or ``"original"`` (the code base's).
    """

    stateful = True
    per_sample_state = True
    min_batch = 2
    ESTIMATORS = ("exact", "original")
    #: the code base's stabiliser in the original estimator
    ORIGINAL_EPS = 1e-8

    def __init__(
        self, temperature: float = 0.01, num_samples: int | None = None, gamma: float = 0.8, estimator: str = "exact"
    ):
        super().__init__(temperature, num_samples)
        self.gamma = _rate("gamma", gamma)
        _check("estimator", estimator, estimator in self.ESTIMATORS, f"choose one of {self.ESTIMATORS}")
        self.estimator = estimator
        n = self.num_samples
        # U = u * exp(b) per sample and side; u == 0 marks a sample not seen yet.
        self.register_buffer("u_image", torch.zeros(n))
        self.register_buffer("b_image", torch.zeros(n))
        self.register_buffer("u_text", torch.zeros(n))
        self.register_buffer("b_text", torch.zeros(n))

    def compute(self, image_emb, text_emb, index):
        sim = _normalize(image_emb) @ _normalize(text_emb).T
        tau = torch.full((sim.shape[0],), self.temperature, dtype=sim.dtype, device=sim.device)
        img_surrogate, img_estimate, _ = self._side(sim, index, tau, self.u_image, self.b_image)
        txt_surrogate, txt_estimate, _ = self._side(sim.T, index, tau, self.u_text, self.b_text)
        surrogate = img_surrogate + txt_surrogate
        estimate = img_estimate + txt_estimate
        return surrogate + (estimate - surrogate).detach()

    def _side(self, sim, index, tau, u_buf, b_buf):
        """One side; row i of ``sim`` holds the anchor i's scores. Updates the buffers.

        Returns the surrogate (gradient carrier), the per-row estimates
        ``tau_i log U_i`` averaged, and a dict of detached terms for subclasses.
        """
        batch = sim.shape[0]
        diffs = sim - sim.diagonal().unsqueeze(1)
        positive = torch.eye(batch, dtype=torch.bool, device=sim.device)
        with torch.no_grad():
            x = (diffs / tau.unsqueeze(1)).masked_fill(positive, -math.inf)
            u_old, b_old = u_buf[index].to(sim.dtype), b_buf[index].to(sim.dtype)
            if self.estimator == "original":
                u_new, b_new, exps, denominator = self._original_average(u_old, b_old, x)
            else:
                u_new, b_new, exps = _shifted_moving_average(
                    u_old, b_old, x, self.gamma, 1.0 / (batch - 1), first_visit=u_old <= 0
                )
                denominator = u_new
            weights = exps / denominator.unsqueeze(1)  # exp(x_ij) / U_i, 0 on the diagonal
            u_buf[index] = u_new.to(u_buf.dtype)
            b_buf[index] = b_new.to(b_buf.dtype)
            log_u = torch.log(u_new.clamp_min(torch.finfo(u_new.dtype).tiny)) + b_new
        surrogate = (weights * diffs).sum(dim=1).mean() / (batch - 1)
        estimate = (tau * log_u).mean()
        return surrogate, estimate, dict(weights=weights, x=x.masked_fill(positive, 0.0), log_u=log_u)

    def _original_average(self, u_old, b_old, x):
        """The code base's update: running-max shift over all pairs (positive included), eps-damped weights.

        Returns ``(s_new, b_new, exp(x - b_new), s_new + eps)``; ``U = s exp(b)``.
        """
        # running max over this batch's x_ij and every earlier batch; the positive's x_ii = 0 belongs to
        # the max (b starts at 0 for an unseen sample, so b >= 0 holds from the first step)
        b_new = torch.maximum(b_old, x.amax(dim=-1).clamp_min(0.0))
        exps = torch.exp(x - b_new.unsqueeze(-1))
        batch_mean = exps.sum(dim=-1) / (x.shape[-1] - 1)
        kept = (1.0 - self.gamma) * u_old * torch.exp(b_old - b_new)
        s_new = torch.where(u_old <= 0, batch_mean, kept + self.gamma * batch_mean)
        return s_new, b_new, exps, s_new + self.ORIGINAL_EPS


# ---------------------------------------------------------------- iSogCLR
@register_loss("isogclr", display_name="iSogCLR", order=5)
class ISogClrLoss(SogClrLoss):
    """iSogCLR (Qiu et al., ICML 2023): SogCLR with an individual temperature
    per image and per text, learned by the distributionally robust objective

        (1/n) sum_i [ tau_i log( mean_{j != i} exp((s_ij - s_ii) / tau_i) ) + tau_i rho ]

    per side. As in the official bimodal code (``iSogCLR_Loss``, also LibAUC's
    ``GCLoss_v2``) the temperatures are buffers updated inside the forward pass
    (no gradient, not seen by the optimizer): with the estimate of
    ``dF/dtau_i = log U_i + rho - sum_j p_ij x_ij`` (``p_ij = exp(x_ij) /
    ((B-1) U_i)``, ``x_ij = (s_ij - s_ii) / tau_i``), clipped to
    ``[-tau_grad_clip, tau_grad_clip]``, a momentum average
    ``m_i <- (1 - tau_beta) m_i + tau_beta * grad`` and a step
    ``tau_i <- clamp(tau_i - tau_lr * m_i, tau_min, tau_max)``. The embeddings'
    gradient is SogCLR's with ``tau_i`` in place of tau.

    Direction: ``dF/dtau_i = rho - KL(p_i || uniform)`` and that KL is at most
    ``log(B - 1)``, so with ``gamma = 1`` and ``rho > log(B - 1)`` (the default
    rho = 8 for any batch below 2981) the temperatures decrease towards
    ``tau_min``; with ``rho = 0`` they increase. With ``gamma < 1`` the
    estimate uses the moving average ``U_i``, which mixes batches scored at the
    sample's earlier temperatures (as the official code does), so it can
    differ in sign from the batch gradient right after a large temperature
    change.

    Defaults: one consistent set, the study's code base (``iSogCLR_New_Loss``
    with per-sample temperatures): range [0.005, 0.05], rho 8, gamma 0.8,
    momentum rate 0.5, clip 5 and step 1e-5. Since ``|m_i| <= tau_grad_clip``,
    one update moves a temperature by at most ``tau_lr * tau_grad_clip =
    5e-5``, about 1/900 of the range. (The iSogCLR authors' step of 0.03 with
    this range and clip would allow 0.15 per update, more than the whole
    range, so the temperatures would jump between the bounds.)

    Returned value: the estimate of the objective above (``mean_i tau_i
    (log U_i + rho)`` summed over sides), at the temperatures of this step.

    Args:
        temperature: initial temperature of every sample (default 0.01).
        num_samples: training set size (required).
        gamma: moving-average rate of U in (0, 1] (default 0.8).
        rho: robustness parameter (default 8.0).
        tau_min, tau_max: temperature bounds (default 0.005, 0.05).
        tau_lr: step size of the temperature update (default 1e-5).
        tau_beta: momentum rate of the temperature gradient (default 0.5).
        tau_grad_clip: clip of the temperature gradient (default 5.0).
    """

    def __init__(
        self,
        temperature: float = 0.01,
        num_samples: int | None = None,
        gamma: float = 0.8,
        rho: float = 8.0,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        tau_lr: float = 1e-5,
        tau_beta: float = 0.5,
        tau_grad_clip: float = 5.0,
    ):
        super().__init__(temperature, num_samples, gamma)
        self.rho = _non_negative("rho", rho)
        self.tau_min = _positive("tau_min", tau_min)
        self.tau_max = _positive("tau_max", tau_max)
        _check("tau_max", tau_max, tau_max >= tau_min, f"must be >= tau_min={tau_min}")
        _check(
            "temperature",
            temperature,
            tau_min <= temperature <= tau_max,
            f"the initial temperature must lie in [tau_min, tau_max] = [{tau_min}, {tau_max}]",
        )
        self.tau_lr = _non_negative("tau_lr", tau_lr)
        self.tau_beta = _rate("tau_beta", tau_beta)
        self.tau_grad_clip = _positive("tau_grad_clip", tau_grad_clip)
        n = self.num_samples
        self.register_buffer("tau_image", torch.full((n,), float(temperature)))
        self.register_buffer("tau_text", torch.full((n,), float(temperature)))
        self.register_buffer("tau_grad_image", torch.zeros(n))
        self.register_buffer("tau_grad_text", torch.zeros(n))
        self._last_tau: tuple[torch.Tensor, torch.Tensor] | None = None

    def compute(self, image_emb, text_emb, index):
        sim = _normalize(image_emb) @ _normalize(text_emb).T
        tau_img = self.tau_image[index].to(sim.dtype)
        tau_txt = self.tau_text[index].to(sim.dtype)
        img_surrogate, img_estimate, img_terms = self._side(sim, index, tau_img, self.u_image, self.b_image)
        txt_surrogate, txt_estimate, txt_terms = self._side(sim.T, index, tau_txt, self.u_text, self.b_text)
        new_img = self._update_tau(index, tau_img, img_terms, self.tau_image, self.tau_grad_image)
        new_txt = self._update_tau(index, tau_txt, txt_terms, self.tau_text, self.tau_grad_text)
        self._last_tau = (new_img.mean().detach(), new_txt.mean().detach())
        surrogate = img_surrogate + txt_surrogate
        estimate = img_estimate + txt_estimate + self.rho * (tau_img.mean() + tau_txt.mean())
        return surrogate + (estimate - surrogate).detach()

    @torch.no_grad()
    def _update_tau(self, index, tau, terms, tau_buf, grad_buf) -> torch.Tensor:
        batch = tau.shape[0]
        expected_x = (terms["weights"] * terms["x"]).sum(dim=1) / (batch - 1)
        grad = (terms["log_u"] + self.rho - expected_x).clamp(-self.tau_grad_clip, self.tau_grad_clip)
        momentum = (1 - self.tau_beta) * grad_buf[index].to(grad.dtype) + self.tau_beta * grad
        new_tau = (tau - self.tau_lr * momentum).clamp(self.tau_min, self.tau_max)
        grad_buf[index] = momentum.to(grad_buf.dtype)
        tau_buf[index] = new_tau.to(tau_buf.dtype)
        return new_tau

    def extra_metrics(self) -> dict[str, float]:
        """Mean image and text temperature of the last batch (after its update)."""
        if self._last_tau is None:
            return {"isogclr_tau_image": float(self.tau_image.mean()), "isogclr_tau_text": float(self.tau_text.mean())}
        return {"isogclr_tau_image": float(self._last_tau[0]), "isogclr_tau_text": float(self._last_tau[1])}


# -------------------------------------------------------------- OnlineCLR
@register_loss("onlineclr", display_name="OnlineCLR", order=4, in_default_grid=True)
class OnlineClrLoss(PairLoss):
    """OnlineCLR, the study code base's variant: separate temperatures for
    positives (``pos_temperature_scale * tau``) and negatives (tau), and two
    scalar moving averages (rate gamma) of the summed exponentials over both
    directions (image->text and text->image),

        U_neg <- (1 - gamma) U_neg + gamma * sum_dirs sum_{i != j} exp(s_ij / tau)
        U_pos <- (1 - gamma) U_pos + gamma * sum_dirs sum_i exp(-s_ii / tau_pos)

    both starting at 0 as in the official code. The loss, with detached weights, is

        sum_dirs [ sum_{i != j} exp(s_ij/tau)/U_neg * s_ij - sum_i exp(-s_ii/tau_pos)/U_pos * s_ii ]

    (the two directions see the same pairs, so each sum is twice the one over
    ``s = u v^T``). Exponentials are shifted (see
    :func:`_shifted_moving_average`). The state is two scalars, so
    ``num_samples`` is not needed.

    Args:
        temperature: tau of the negatives (default 0.01).
        gamma: moving-average rate in (0, 1] (default 0.5).
        pos_temperature_scale: positives' temperature / tau (default 10).
    """

    stateful = True
    min_batch = 2  # negatives are needed

    def __init__(
        self,
        temperature: float = 0.01,
        num_samples: int | None = None,
        gamma: float = 0.5,
        pos_temperature_scale: float = 10.0,
    ):
        super().__init__(temperature, num_samples)
        self.gamma = _rate("gamma", gamma)
        self.pos_temperature = self.temperature * _positive("pos_temperature_scale", pos_temperature_scale)
        for name in ("u_neg", "b_neg", "u_pos", "b_pos"):
            self.register_buffer(name, torch.zeros(()))  # U = u * exp(b)

    def compute(self, image_emb, text_emb, index):
        sim = _normalize(image_emb) @ _normalize(text_emb).T
        positive = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        diagonal = sim.diagonal()
        with torch.no_grad():
            x_neg = (sim / self.temperature).masked_fill(positive, -math.inf).flatten()
            x_pos = -diagonal / self.pos_temperature
            u_neg, b_neg, exp_neg = _shifted_moving_average(
                self.u_neg.to(sim.dtype), self.b_neg.to(sim.dtype), x_neg, self.gamma, 2.0
            )
            u_pos, b_pos, exp_pos = _shifted_moving_average(
                self.u_pos.to(sim.dtype), self.b_pos.to(sim.dtype), x_pos, self.gamma, 2.0
            )
            weights_neg = (exp_neg / u_neg).view_as(sim)
            weights_pos = exp_pos / u_pos
            for name, value in (("u_neg", u_neg), ("b_neg", b_neg), ("u_pos", u_pos), ("b_pos", b_pos)):
                getattr(self, name).copy_(value)
        return 2 * ((weights_neg * sim).sum() - (weights_pos * diagonal).sum())
