"""Helpers shared by the benchmarks: timing, tables, JSON output, thread control.

Every benchmark compares its variants side by side in one run (interleaved
repeats, medians), so that drifts in machine load hit all of them alike, and
reports ratios rather than absolute times.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "reports" / "benchmarks"


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so wall times include it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device=None) -> float:
    """Wall time of one call of ``fn`` in seconds (CUDA work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device=None
) -> dict[str, list[float]]:
    """Time every function once per repeat, in a rotating order; returns name -> list of seconds.

    The first ``warmup`` rounds are run but not recorded.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(fns[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Set torch's intra-op threads for the block (None: leave as is), restoring them afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine() -> dict:
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(results: dict, out: str | Path | None) -> Path | None:
    """Write ``results`` as indented JSON to ``out`` (None: don't write); returns the path."""
    if out is None:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return out


def table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header, format)`` with format like ``"{:.1f}"``."""
    rows = list(rows)
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and value != value):
                line.append("-")
            else:
                line.append(fmt.format(value) if not isinstance(value, str) else value)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
