"""One precision policy for training, per-epoch evaluation and the ``evaluate`` command.

``amp`` (a configuration field) picks the autocast dtype: on a CPU always
none (autocast there is slow and changes the numbers); on CUDA ``auto`` is
bf16 where supported, else fp16. Every forward pass of a run, training or
evaluation, runs under :func:`autocast` with that dtype.
"""

from __future__ import annotations

import contextlib

import torch


def choose_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for config field ``amp`` on ``device``; None = full precision."""
    device = torch.device(device)
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
