"""TensorBoard event files beside a run's ``history.csv``, fed the same rows.

The training loop hands each history row (loss, learning rate, gradient
norm, throughput and every diagnostics column a loss reports, e.g. its
temperatures) and each epoch's evaluation row to :class:`TensorBoardLog`; every
numeric column becomes a scalar, so a new diagnostics column shows up without
touching this module. ``history.csv`` stays the record the report reads; the
event files are for watching runs live (``make tensorboard``).

On resume the writer is opened with ``purge_step`` at the resumed step, so
the curve of an interrupted run is the curve of an uninterrupted one (events
a killed run wrote after its last checkpoint are discarded by TensorBoard).
"""

from __future__ import annotations

import math
from pathlib import Path

# Columns that are coordinates, not measurements.
NOT_SCALARS = ("step", "epoch")


class TensorBoardLog:
    """Scalars of one run: ``train/<column>`` per history row, ``eval/<column>`` per evaluation.

    ``enabled=False`` (config ``tensorboard: false``, or a rank other than 0)
    makes every method a no-op, so the training loop calls it unconditionally.
    """

    def __init__(self, out: Path, *, enabled: bool = True, resume_step: int = 0):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step=None on a fresh run; at a resume it drops stale events from that step on
            self.writer = SummaryWriter(log_dir=str(out), purge_step=resume_step or None, flush_secs=10)

    def history_row(self, row: dict) -> None:
        self._scalars("train", row, int(row["step"]))

    def epoch_row(self, row: dict) -> None:
        self._scalars("eval", row, int(row["step"]))
        if self.writer is not None:
            self.writer.flush()  # an epoch is worth seeing at once

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _scalars(self, group: str, row: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, step)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value), ...] of every event file in ``folder``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
