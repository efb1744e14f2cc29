"""Gathering a batch across processes so that every loss sees the global batch.

Every loss in :mod:`clipstudy.core.losses` gathers the image embeddings, the text
embeddings and the dataset indices of all ranks and computes its value on the
*global* batch, identically on every rank. That makes ``W`` ranks with ``B/W``
rows each equivalent to one process with ``B`` rows, state included: per-sample
state is updated with the gathered indices, so every rank holds the same state.

Which gather, and why no extra scaling is needed
------------------------------------------------
Let ``L`` be the global-batch loss (the same number on every rank) and ``e_r``
the embeddings rank ``r`` produced. The single-process gradient of a model
weight ``w`` is ``dL/dw = sum_r dL/de_r * de_r/dw``.

* :func:`gather_with_grad` gathers in the forward pass and, in the backward
  pass, **sums** the incoming gradient of the whole gathered tensor over the
  ranks (an all-reduce) and keeps the rows of the local shard. Every rank
  back-propagates the same ``dL/de`` (same loss, same inputs), so each rank's
  local shard receives ``W * dL/de_r``, and the weight gradient on rank ``r``
  is ``W * dL/de_r * de_r/dw``. DistributedDataParallel then **averages** over
  the ranks: ``(1/W) * sum_r W * dL/de_r * de_r/dw = dL/dw``, exactly the
  single-process gradient. No loss scaling is needed.
* A gather whose backward keeps only the local slice (the ``GatherLayer`` of
  SimCLR-style code) would give rank ``r`` just ``dL/de_r``, and DDP's average
  would then be ``dL/dw / W``: such code must multiply the loss by ``W``. The
  summed backward is used here because it stays right even when ranks compute
  slightly different values (for example different reduction orders on
  different GPUs): it still adds up every rank's contribution.

Parameters that live in the loss (SigLIP's scale and bias) are not part of the
DDP model: each rank computes the global loss, so each rank gets the full
``dL/dparam`` directly, the same on every rank, and needs no averaging.

All ranks must pass tensors of the same shape (equal per-rank batches, as a
``DistributedSampler`` with ``drop_last=True`` gives). When
``torch.distributed`` is not initialised, or has one process, every function
here is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradients of all ranks and keeps the local rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        # all_reduce works on every backend (gloo has no reduce_scatter); the tensors are small.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the gradient path.

    Backward: the gradient of the gathered tensor is summed over ranks and the
    local rows are returned (see the module docstring for why this makes the
    DDP-averaged gradient equal the single-process one). Identity when not
    distributed.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, without gradient (e.g. indices)."""
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself when not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
