"""Every run's records gathered into tidy tables: one row per run, summaries per cell.

:func:`collect_runs` reads each run directory's ``metrics.json`` and
``config.json`` (records only; no model code); :func:`cell_summary`,
:func:`study_table` and :func:`average_grid` summarise over seeds. The report
(:mod:`clipstudy.study.report`) and the comparison with the published study
(:mod:`clipstudy.study.findings`) both read these.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from clipstudy.core.diagnostics import SUMMARISED, start_end_summary
from clipstudy.core.losses import LOSSES, losses_in_order
from clipstudy.engine import records
from clipstudy.paths import PROTOCOLS
from clipstudy.study.variants import optimizer_display_names

METRICS = list(records.HEADLINE)
METRIC_NAMES = {"txt_r1": "TR@1", "img_r1": "IR@1", "zeroshot_top1": "ACC@1", "average": "Average"}
# Display names, read from the registries and the named variants; a label not named there shows itself.
OPTIMIZER_NAMES = optimizer_display_names()
LOSS_NAMES = {name: LOSSES[name].display_name for name in losses_in_order()}
VALIDATION_METRICS = list(records.VALIDATION_HEADLINE)
RESULT_COLUMNS = [
    "protocol",
    "optimizer",
    "base_optimizer",
    "loss",
    "seed",
    "status",
    "txt_r1",
    "img_r1",
    "zeroshot_top1",
    "average",
    *VALIDATION_METRICS,
    "txt_r5",
    "txt_r10",
    "img_r5",
    "img_r10",
    "zeroshot_top5",
    "diverged_at_step",
    "global_step",
    "wall_time_s",
    "train_samples_per_s",
    "peak_memory_mb",
    "skipped_images",
    *[f"{name}_{when}" for name in SUMMARISED for when in ("start", "end")],
    "lr",
    "grad_clip",
    "error",
    "run_dir",
]
TEXT_COLUMNS = ("protocol", "optimizer", "base_optimizer", "loss", "status", "error", "run_dir")


def run_files(runs_root: str | Path, name: str) -> list[tuple[str, Path]]:
    """``(protocol, path)`` of every run's file ``name`` under ``runs_root``: the runs directly in it (protocol
    "") and those of each protocol folder (``runs_root/shared``, ``runs_root/tuned``), each group sorted."""
    root = Path(runs_root)
    return [("", path) for path in sorted(root.glob(f"*/{name}"))] + [
        (protocol, path) for protocol in PROTOCOLS for path in sorted(root.glob(f"{protocol}/*/{name}"))
    ]


def collect_runs(runs_root: str | Path) -> pd.DataFrame:
    """One row per run directory under ``runs_root`` that has a ``metrics.json``: the runs directly in it
    (``protocol`` empty) and those of each protocol folder (``runs_root/shared``, ``runs_root/tuned``)."""
    rows = []
    for protocol, metrics_file in run_files(runs_root, records.METRICS_FILE):
        m = records.read_metrics(metrics_file.parent) or {}
        row = {col: m.get(col) for col in RESULT_COLUMNS}
        row["protocol"] = protocol
        row["run_dir"] = str(metrics_file.parent)
        if row["optimizer"] is None or row["loss"] is None:  # fall back to the directory name
            parts = metrics_file.parent.name.rsplit("-", 2)
            if len(parts) == 3:
                row["optimizer"], row["loss"], row["seed"] = parts[0], parts[1], int(parts[2].lstrip("s") or 0)
        row["base_optimizer"] = row["base_optimizer"] or row["optimizer"]  # runs from before the field
        settings = (records.read_run_config(metrics_file.parent) or {}).get("config") or {}
        row["lr"], row["grad_clip"] = settings.get("lr"), settings.get("grad_clip")  # what the step size needs
        if any(row[f"{name}_start"] is None for name in SUMMARISED):  # a run from before a summarised figure
            row.update({k: v for k, v in _history_summary(metrics_file.parent).items() if row.get(k) is None})
        rows.append(row)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    for col in RESULT_COLUMNS:
        if col not in TEXT_COLUMNS:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["seed"] = df["seed"].astype("Int64")
    return df.sort_values(["protocol", "optimizer", "loss", "seed"], key=order_key).reset_index(drop=True)


def _history_summary(run_dir: Path) -> dict[str, float]:
    """:func:`start_end_summary` of a run's ``history.csv`` (empty cells skipped); {} without one."""
    path = run_dir / "history.csv"
    if not path.is_file() or not path.stat().st_size:
        return {}
    rows = pd.read_csv(path).to_dict("records")
    return start_end_summary([{k: v for k, v in row.items() if v == v} for row in rows])


def load_logs(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Every run's ``history.csv`` or ``epochs.csv`` (``name``) in one table, each row tagged with its run's
    ``optimizer``, ``loss_name`` (``loss`` is a history column) and ``seed``; runs without rows are left out."""
    if name not in ("history.csv", "epochs.csv"):
        raise ValueError(f"name={name!r}: choose history.csv or epochs.csv")
    frames = []
    for row in df.itertuples():
        path = Path(row.run_dir) / name
        if not path.is_file() or not path.stat().st_size:
            continue
        frame = pd.read_csv(path)
        if frame.empty:  # a header only: the run stopped before its first row
            continue
        frames.append(frame.assign(optimizer=row.optimizer, loss_name=row.loss, seed=row.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def order_key(col: pd.Series) -> pd.Series:
    order = {**{k: i for i, k in enumerate(OPTIMIZER_NAMES)}, **{k: i for i, k in enumerate(LOSS_NAMES)}}
    if col.name in ("optimizer", "loss"):
        return col.map(lambda v: (order.get(v, 99), str(v)))
    return col


def cell_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds per (protocol, optimizer, loss), completed runs only; plus status counts."""
    keys = (["protocol"] if "protocol" in df else []) + ["optimizer", "loss"]
    df = df.assign(protocol=df["protocol"].fillna("")) if "protocol" in df else df
    done = df[df["status"] == "completed"]
    agg = done.groupby(keys, sort=False)[METRICS].agg(["mean", "std", "count"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    status = df.assign(n=1).pivot_table(index=keys, columns="status", values="n", aggfunc="count", fill_value=0)
    out = status.join(agg, how="left")
    for s in ("completed", "diverged", "failed"):
        if s not in out:
            out[s] = 0
    return out.reset_index().sort_values(keys, key=order_key).reset_index(drop=True)


def _fmt(mean, std, n) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n and n > 1 and std == std:
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.2f}"


def study_table(df: pd.DataFrame) -> pd.DataFrame:
    """The original format: Optimizer, Method, TR@1, IR@1, ACC@1, Average (mean ± std over seeds).

    A cell with no completed seed shows its status (diverged / failed) instead of numbers.
    """
    summary = cell_summary(df)
    with_protocol = "protocol" in summary and (summary["protocol"] != "").any()
    rows = []
    for _, r in summary.iterrows():
        row = {"Protocol": r["protocol"]} if with_protocol else {}
        row |= {
            "Optimizer": OPTIMIZER_NAMES.get(r["optimizer"], r["optimizer"]),
            "Method": LOSS_NAMES.get(r["loss"], r["loss"]),
        }
        n = r.get("average_count", 0)
        n = 0 if n != n else int(n)
        for m in METRICS:
            row[METRIC_NAMES[m]] = _fmt(r.get(f"{m}_mean"), r.get(f"{m}_std"), n) if n else "–"
        notes = [f"{int(r[s])} {s}" for s in ("diverged", "failed") if r.get(s, 0)]
        row["Seeds"] = n
        row["Status"] = ", ".join(notes) if notes else "ok"
        rows.append(row)
    return pd.DataFrame(rows)


def average_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Mean Average per optimizer (rows) and loss (columns), completed runs only."""
    summary = cell_summary(df).dropna(subset=["average_mean"])
    grid = summary.pivot(index="optimizer", columns="loss", values="average_mean")

    def place(names: dict):  # table order: the registries', then anything else by name
        return lambda key: (list(names).index(key) if key in names else 99, key)

    return grid.reindex(
        index=sorted(grid.index, key=place(OPTIMIZER_NAMES)), columns=sorted(grid.columns, key=place(LOSS_NAMES))
    )
