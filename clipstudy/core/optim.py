"""Optimizers, weight-decay parameter groups and the learning-rate schedule.

The study compares three optimizers under the original code base's settings:

* ``adamw``: ``torch.optim.AdamW``; weight decay is decoupled (the weights are
  shrunk by ``lr * weight_decay * w`` each step, apart from the Adam update).
* ``sgd``: ``torch.optim.SGD`` with momentum 0.9 and Nesterov momentum.
* ``adam``: ``torch.optim.Adam``; weight decay is an L2 term added to the
  gradient (``g + weight_decay * w``), so it goes through Adam's normalisation.

Every optimizer's default learning rate is 2e-4 (the original study used one
rate for all three); pass ``lr`` to override it. A new optimizer is one
``@register_optimizer("name", default_lr=...)`` factory.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "register_optimizer",
    "available_optimizers",
    "default_lr",
    "optimizers_in_order",
    "default_grid_optimizers",
    "check_optimizer_options",
    "param_groups",
    "build_optimizer",
    "make_scheduler",
    "WarmupCosineLR",
    "StaircaseEpochCosineLR",
]

#: Modules whose parameters (scale and shift) never get weight decay.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: ``build(groups, lr, **kwargs)``, its default learning rate, the torch
    class whose constructor options ``build`` accepts (used to name unknown options), and what the
    study shows of it: its name in tables, its place there and whether the default grid runs it."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    default_lr: float
    description: str
    torch_class: type[torch.optim.Optimizer] | None = None
    display_name: str = ""
    order: int = 100
    in_default_grid: bool = False
    search_lr: tuple[float, float] = (1e-4, 1e-2)  # `tune`'s learning-rate search space (log-spaced, both ends in)


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(
    name: str,
    *,
    default_lr: float = 2e-4,
    torch_class: type[torch.optim.Optimizer] | None = None,
    display_name: str = "",
    order: int = 100,
    in_default_grid: bool = False,
    search_lr: tuple[float, float] = (1e-4, 1e-2),
):
    """Decorator: register ``factory(param_groups, lr, **kwargs) -> Optimizer`` as ``name``.

    The factory's docstring becomes the description (``--help``); ``default_lr`` is used when
    :func:`build_optimizer` gets ``lr=None`` (default 2e-4, the original study's
    rate); ``torch_class`` (optional) lets unknown options be reported by name;
    ``display_name`` (default ``name``), ``order`` and ``in_default_grid`` are
    what tables, reports and ``sweep`` read; ``search_lr`` is the learning-rate range
    ``tune`` searches (the same number of trials for every optimizer).
    """

    def add(factory):
        if name in OPTIMIZERS:
            raise ValueError(f"an optimizer named {name!r} is already registered")
        description = inspect.getdoc(factory) or ""
        OPTIMIZERS[name] = OptimizerSpec(
            name,
            factory,
            float(default_lr),
            description,
            torch_class,
            display_name or name,
            order,
            in_default_grid,
            (float(search_lr[0]), float(search_lr[1])),
        )
        return factory

    return add


def available_optimizers() -> list[str]:
    """Names accepted by :func:`build_optimizer`, sorted."""
    return sorted(OPTIMIZERS)


def optimizers_in_order() -> list[str]:
    """Every registered optimizer in its table order (the original study's first)."""
    return sorted(OPTIMIZERS, key=lambda name: (OPTIMIZERS[name].order, name))


def default_grid_optimizers() -> list[str]:
    """The optimizers ``sweep`` runs unless told otherwise, in table order."""
    return [name for name in optimizers_in_order() if OPTIMIZERS[name].in_default_grid]


def check_optimizer_options(name: str, *, lr: float | None, weight_decay: float, **options) -> None:
    """Raise ValueError naming the first option that optimizer ``name`` rejects (each option alone first).

    Called at start-up, before any data is read, by building the optimizer on a
    one-weight stand-in model, so torch itself judges every option.
    """
    stand_in = nn.Linear(1, 1)
    for key, value in [*options.items(), (None, None)]:
        chosen = options if key is None else {key: value}
        try:
            build_optimizer(name, stand_in, lr=lr, weight_decay=weight_decay, **chosen)
        except (TypeError, ValueError, KeyError) as err:
            what = f"option {key!r}={value!r}" if key else "these options"
            raise ValueError(f"{what} rejected by optimizer {name!r} ({type(err).__name__}: {err})") from None


def default_lr(name: str) -> float:
    """The documented default learning rate of optimizer ``name``."""
    return _spec(name).default_lr


def _spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {available_optimizers()}")
    return OPTIMIZERS[name]


@register_optimizer(
    "adamw", torch_class=torch.optim.AdamW, display_name="AdamW", order=0, in_default_grid=True, search_lr=(1e-4, 1e-2)
)
def _adamw(groups, lr, **kwargs):
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay (torch defaults betas (0.9, 0.999), eps 1e-8)."""
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


@register_optimizer(
    "sgd", torch_class=torch.optim.SGD, display_name="SGD", order=1, in_default_grid=True, search_lr=(1e-3, 1e-1)
)
def _sgd(groups, lr, momentum=0.9, nesterov=True, **kwargs):
    """SGD with momentum 0.9 and Nesterov momentum; weight decay is the L2 term of torch's SGD."""
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kwargs)


@register_optimizer(
    "adam", torch_class=torch.optim.Adam, display_name="Adam", order=2, in_default_grid=True, search_lr=(1e-4, 1e-2)
)
def _adam(groups, lr, **kwargs):
    """Adam (Kingma & Ba) with weight decay as an L2 term added to the gradient (torch's Adam)."""
    return torch.optim.Adam(groups, lr=lr, **kwargs)


def param_groups(model: nn.Module, loss_module: nn.Module | None = None, weight_decay: float = 0.02) -> list[dict]:
    """Split the trainable parameters into weight-decay groups.

    * ``"decay"`` (``weight_decay``): model parameters with ``ndim >= 2`` (linear,
      convolution and embedding weights) outside normalisation layers.
    * ``"no_decay"`` (0): biases and every other 1-d or scalar model parameter,
      and all parameters of normalisation layers (BatchNorm, LayerNorm,
      GroupNorm, RMSNorm, ...).
    * ``"loss"`` (0): the loss's parameters (e.g. SigLIP's scale and bias):
      decaying a temperature or a bias towards 0 has no meaning.

    Each group carries ``"name"`` and ``"param_names"`` (model names as
    ``model.named_parameters()`` gives them; loss names prefixed ``loss.``).
    Empty groups are left out; frozen parameters (``requires_grad=False``) too.
    """
    if weight_decay < 0 or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay={weight_decay!r}: must be a finite number >= 0")
    norm_params = {
        id(p) for module in model.modules() if isinstance(module, NORM_TYPES) for p in module.parameters(recurse=False)
    }
    groups = {"decay": ([], []), "no_decay": ([], []), "loss": ([], [])}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "decay" if p.ndim >= 2 and id(p) not in norm_params else "no_decay"
        groups[key][0].append(p)
        groups[key][1].append(name)
    seen = {id(p) for params, _ in groups.values() for p in params}
    if loss_module is not None:
        for name, p in loss_module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                groups["loss"][0].append(p)
                groups["loss"][1].append(f"loss.{name}")
    decay = {"decay": weight_decay, "no_decay": 0.0, "loss": 0.0}
    return [
        {"name": key, "params": params, "param_names": names, "weight_decay": decay[key]}
        for key, (params, names) in groups.items()
        if params
    ]


def build_optimizer(
    name: str,
    model: nn.Module,
    loss_module: nn.Module | None = None,
    *,
    lr: float | None = None,
    weight_decay: float = 0.02,
    **kwargs,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over :func:`param_groups` of the model and the loss.

    Args:
        name: one of :func:`available_optimizers`.
        model: the model to train.
        loss_module: the loss, whose parameters (if any) are trained too, without decay.
        lr: base learning rate; None takes :func:`default_lr` (2e-4).
        weight_decay: decay of the ``"decay"`` group (default 0.02): decoupled for
            AdamW, an L2 gradient term for Adam and SGD.
        **kwargs: passed to the torch optimizer (e.g. ``betas``, ``eps``, ``momentum``).
            Unless ``fused`` or ``foreach`` is given, torch's fused implementation is
            used wherever it applies (all parameters floating point on a supported device).
    """
    spec = _spec(name)
    lr = spec.default_lr if lr is None else lr
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr={lr!r}: the learning rate must be a finite number >= 0")
    reserved = {"params", "lr", "weight_decay"} & set(kwargs)
    if reserved:
        raise ValueError(f"optimizer option {sorted(reserved)[0]!r} is set by build_optimizer, not passed through")
    if spec.torch_class is not None:
        accepted = set(inspect.signature(spec.torch_class.__init__).parameters) - {"self", "params"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"optimizer {name!r} has no option {unknown[0]!r}; "
                f"its options are {sorted(accepted - {'lr', 'weight_decay'})}"
            )
    groups = param_groups(model, loss_module, weight_decay)
    if not groups:
        raise ValueError("the model and the loss have no trainable parameters")
    if _can_fuse(spec, groups, kwargs):
        # torch's fused kernel: one pass over all parameters instead of several ops per
        # tensor (on CPU about 5x faster than torch's default per-tensor loop; the same
        # update up to float rounding). Pass fused=False or foreach=... to choose otherwise.
        kwargs["fused"] = True
    return spec.build(groups, float(lr), **kwargs)


def _can_fuse(spec: OptimizerSpec, groups: list[dict], kwargs: dict) -> bool:
    """Whether torch's fused implementation applies: the class has one, the caller chose no
    implementation, and every parameter is a floating-point tensor on a device it supports."""
    if spec.torch_class is None or "fused" not in inspect.signature(spec.torch_class.__init__).parameters:
        return False
    if "fused" in kwargs or "foreach" in kwargs or kwargs.get("differentiable"):
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older or newer torch without the helper: the two devices that have it
        devices = {"cpu", "cuda"}
    return all(torch.is_floating_point(p) and p.device.type in devices for g in groups for p in g["params"])


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up then cosine decay, stepped once per iteration.

    For a group with base rate ``base`` and ``t`` the number of ``step()`` calls made so far:

    * ``t < warmup_steps``: ``start + (base - start) * t / warmup_steps`` with
      ``start = min(warmup_lr, base)``;
    * ``warmup_steps <= t <= total_steps``: ``end + (base - end) * (1 + cos(pi * p)) / 2``
      with ``p = (t - warmup_steps) / (total_steps - warmup_steps)`` and
      ``end = min(min_lr, base)``;
    * ``t > total_steps``: ``end``.

    So the first iteration runs at ``warmup_lr``, iteration ``warmup_steps`` at
    ``base`` and the rate reaches ``min_lr`` at ``total_steps`` (the last of
    ``total_steps`` iterations runs just above it). ``warmup_lr`` and ``min_lr``
    are capped at each group's base rate: a "warm-up" that would start above the
    target rate, or a decay that would end above it, is not meant (this keeps
    tiny learning rates in a sweep from being overridden).
    ``warmup_steps = 0`` starts the cosine at once; ``warmup_steps =
    total_steps`` warms up for the whole run.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        warmup_steps: int,
        warmup_lr: float = 1e-5,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
    ):
        for key, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key}={value!r}: must be an integer")
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: must be >= 1")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps}: must be in [0, total_steps={total_steps}]")
        for key, value in (("warmup_lr", warmup_lr), ("min_lr", min_lr)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}={value!r}: must be a finite number >= 0")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)
        bases = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        super().__init__(optimizer, [self._factor(base) for base in bases], last_epoch=last_epoch)

    # The schedule is defined by the constructor; the saved state is the step counter and base rates.
    _SETTINGS = ("total_steps", "warmup_steps", "warmup_lr", "min_lr")

    def state_dict(self) -> dict:
        state = super().state_dict()
        for key in self._SETTINGS:
            state.pop(key, None)
        return state

    def lr_at(self, step: int, base: float) -> float:
        """The learning rate of a group with base rate ``base`` at iteration ``step``."""
        start, end = min(self.warmup_lr, base), min(self.min_lr, base)
        if step < self.warmup_steps:
            return start + (base - start) * step / self.warmup_steps
        if step >= self.total_steps:
            return end
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * progress))

    def _factor(self, base: float) -> Callable[[int], float]:
        # LambdaLR multiplies the base rate by this factor; a zero base rate stays zero.
        return lambda step: self.lr_at(step, base) / base if base > 0 else 0.0


class StaircaseEpochCosineLR(WarmupCosineLR):
    """The original code base's schedule, stepped once per iteration like :class:`WarmupCosineLR`.

    For a group with base rate ``base``, iteration ``t`` (0-based), epoch ``e =
    t // steps_per_epoch``:

    * epoch 0, ``t < warmup_steps``: a staircase from ``start = min(warmup_lr,
      base)``: ``start + (base - start) * k * warmup_every / warmup_steps`` with
      ``k = t // warmup_every`` (the code base stepped its warm-up every 100
      iterations, 5 times: 500 iterations);
    * the rest of epoch 0: ``base``;
    * epoch ``e >= 1``: ``end + (base - end) * (1 + cos(pi * e / epochs)) / 2``,
      constant within the epoch (timm's cosine, stepped once per epoch), with
      ``end = min(min_lr, base)``.

    A warm-up longer than epoch 0 is cut at the end of epoch 0, as in the code
    base.
    """

    _SETTINGS = WarmupCosineLR._SETTINGS + ("steps_per_epoch", "epochs", "warmup_every")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        warmup_steps: int,
        steps_per_epoch: int,
        epochs: int,
        warmup_every: int = 100,
        warmup_lr: float = 1e-5,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
    ):
        for key, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs), ("warmup_every", warmup_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r}: must be an integer >= 1")
        self.steps_per_epoch, self.epochs, self.warmup_every = steps_per_epoch, epochs, warmup_every
        super().__init__(
            optimizer,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            warmup_lr=warmup_lr,
            min_lr=min_lr,
            last_epoch=last_epoch,
        )

    def lr_at(self, step: int, base: float) -> float:
        start, end = min(self.warmup_lr, base), min(self.min_lr, base)
        epoch = step // self.steps_per_epoch
        if epoch == 0:
            if step < self.warmup_steps:
                return start + (base - start) * (step // self.warmup_every) * self.warmup_every / self.warmup_steps
            return base
        if epoch >= self.epochs:
            return end
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))


LR_SCHEDULES = ("smooth", "original")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float = 1e-5,
    min_lr: float = 1e-6,
    kind: str = "smooth",
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
) -> WarmupCosineLR:
    """The learning-rate schedule, stepped after every optimizer step (``state_dict`` resumes it).

    ``kind="smooth"`` (default): warm-up from ``warmup_lr`` to each group's base
    rate over ``warmup_steps`` iterations, then cosine decay to ``min_lr`` at
    ``total_steps`` (:class:`WarmupCosineLR`). ``kind="original"``: the code
    base's staircase warm-up and per-epoch cosine
    (:class:`StaircaseEpochCosineLR`; needs ``steps_per_epoch`` and ``epochs``).
    """
    if kind == "original":
        if steps_per_epoch is None or epochs is None:
            raise ValueError("the original schedule needs steps_per_epoch and epochs")
        return StaircaseEpochCosineLR(
            optimizer,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            warmup_lr=warmup_lr,
            min_lr=min_lr,
        )
    if kind != "smooth":
        raise ValueError(f"lr_schedule={kind!r}; choose one of {LR_SCHEDULES}")
    return WarmupCosineLR(
        optimizer, total_steps=total_steps, warmup_steps=warmup_steps, warmup_lr=warmup_lr, min_lr=min_lr
    )
