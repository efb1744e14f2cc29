"""The base of every loss: the registry, the parameter checks and :class:`PairLoss`.

The losses themselves and :func:`~clipstudy.core.losses.make_loss` live in
:mod:`clipstudy.core.losses` (the public entry, which also re-exports these names)
and :mod:`clipstudy.core.losses_global`; this module imports neither, so both can
import it without a cycle.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipstudy.core.distributed import gather_no_grad, gather_with_grad

__all__ = ["LOSSES", "register_loss", "PairLoss"]

LOSSES: dict[str, type[PairLoss]] = {}


def register_loss(
    name: str, *, display_name: str = "", order: int = 100, in_default_grid: bool = False
) -> Callable[[type[PairLoss]], type[PairLoss]]:
    """Class decorator: make a :class:`PairLoss` subclass available to :func:`make_loss` as ``name``.

    The entry carries what the rest of the study shows of the loss: ``display_name``
    (tables and reports; default ``name``), ``order`` (its place in tables and in
    the default grid) and ``in_default_grid`` (whether ``sweep`` runs it unless
    told otherwise). Its help text is the first line of the class docstring.
    """

    def add(cls: type[PairLoss]) -> type[PairLoss]:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name].__name__})")
        cls.name = name
        cls.display_name = display_name or name
        cls.order = order
        cls.in_default_grid = in_default_grid
        LOSSES[name] = cls
        return cls

    return add


# ------------------------------------------------------------------ checks
def _check(name: str, value, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"loss parameter {name!r}={value!r}: {requirement}")


def _positive(name: str, value) -> float:
    _check(
        name,
        value,
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value),
        "must be a finite number > 0",
    )
    return float(value)


def _non_negative(name: str, value) -> float:
    _check(
        name,
        value,
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value),
        "must be a finite number >= 0",
    )
    return float(value)


def _rate(name: str, value) -> float:
    _check(
        name,
        value,
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1,
        "must be in (0, 1]",
    )
    return float(value)


# ------------------------------------------------------------- base class
class PairLoss(nn.Module):
    """Base of every loss: validates, gathers across ranks, casts, then calls :meth:`compute`.

    Args:
        temperature: contrastive temperature tau (default 0.01).
        num_samples: training set size (default None); required when
            ``per_sample_state`` is True.
    """

    name: str = ""
    #: set by :func:`register_loss`: the name in tables, the place in tables, whether the default grid runs it
    display_name: str = ""
    order: int = 100
    in_default_grid: bool = False
    #: True when a forward call advances state that must be checkpointed.
    stateful: bool = False
    #: True when the state is per training sample (buffers of size num_samples addressed by index).
    per_sample_state: bool = False
    #: Smallest global batch the method is defined for.
    min_batch: int = 1

    def __init__(self, temperature: float = 0.01, num_samples: int | None = None):
        super().__init__()
        self.temperature = _positive("temperature", temperature)
        if num_samples is not None:
            _check(
                "num_samples",
                num_samples,
                isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1,
                "must be an integer >= 1 (the training set size)",
            )
        elif self.per_sample_state:
            raise ValueError(f"loss {self.name!r} keeps per-sample state: pass num_samples=<training set size>")
        self.num_samples = num_samples

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The keyword parameters of this loss besides temperature and num_samples."""
        signature = inspect.signature(cls.__init__)
        return [p for p in signature.parameters if p not in ("self", "temperature", "num_samples")]

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_inputs(image_emb, text_emb, index)
        # Work outside autocast and at least in float32: tau = 0.01 makes logits up to 100-400.
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            dtype = torch.promote_types(image_emb.dtype, torch.float32)
            image_emb = gather_with_grad(image_emb.to(dtype))
            text_emb = gather_with_grad(text_emb.to(dtype))
            if index is not None:
                index = gather_no_grad(index)
                if self.per_sample_state:
                    self._check_index_range(index)
            if image_emb.shape[0] < self.min_batch:
                raise ValueError(
                    f"loss {self.name!r} needs a (global) batch of at least {self.min_batch} pairs, "
                    f"got {image_emb.shape[0]}"
                )
            return self.compute(image_emb, text_emb, index)

    def compute(self, image_emb: torch.Tensor, text_emb: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The loss on the global batch (float32 or float64 inputs, autocast off)."""
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        """Values worth logging each step (none by default)."""
        return {}

    def _check_inputs(self, image_emb, text_emb, index) -> None:
        if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape != text_emb.shape:
            raise ValueError(
                f"loss {self.name!r}: image_emb and text_emb must both be [B, D] with the same shape, "
                f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if not (image_emb.is_floating_point() and text_emb.is_floating_point()):
            raise TypeError(
                f"loss {self.name!r}: embeddings must be floating point, got {image_emb.dtype} and {text_emb.dtype}"
            )
        if index is None:
            if self.per_sample_state:
                raise ValueError(
                    f"loss {self.name!r} keeps per-sample state: pass index, the LongTensor [B] "
                    "of the rows' dataset indices"
                )
            return
        if index.shape != image_emb.shape[:1]:
            raise ValueError(
                f"loss {self.name!r}: index must have shape [B]={tuple(image_emb.shape[:1])}, got {tuple(index.shape)}"
            )
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"loss {self.name!r}: index must be an integer tensor, got {index.dtype}")

    def _check_index_range(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(
                f"loss {self.name!r}: dataset indices must be in [0, num_samples={self.num_samples}), "
                f"got values in [{int(index.min())}, {int(index.max())}]; build the loss with "
                "num_samples=len(training set)"
            )


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
