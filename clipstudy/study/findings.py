"""This study's results against the original study's published ones.

The published table of the original 3 optimizers x 5 losses grid, Spearman's
rho between its ranking of cells and this study's (overall and within each
optimizer's row), and the original study's four findings, each tested on the
runs. :mod:`clipstudy.study.results` builds the per-cell summaries these read.
"""

from __future__ import annotations

import pandas as pd

from clipstudy.study.results import LOSS_NAMES, METRICS, OPTIMIZER_NAMES, average_grid, cell_summary

PAPER_OPTIMIZERS = ("adamw", "sgd", "adam")
PAPER_LOSSES = ("clip", "sogclr", "cyclip", "vicreg", "onlineclr")

# The original study's published numbers (docs/protocol.md): optimizer, loss, TR@1, IR@1, ACC@1, Average.
PUBLISHED_ROWS = [
    ("adamw", "sogclr", 13.18, 10.30, 24.55, 16.68),
    ("adamw", "clip", 11.62, 9.16, 21.66, 14.81),
    ("adamw", "cyclip", 14.10, 10.68, 25.91, 16.90),
    ("adamw", "vicreg", 2.86, 2.16, 5.79, 3.60),
    ("adamw", "onlineclr", 10.96, 8.64, 20.52, 13.37),
    ("sgd", "sogclr", 1.56, 1.00, 2.87, 1.81),
    ("sgd", "clip", 10.30, 7.00, 17.01, 11.44),
    ("sgd", "cyclip", 10.38, 7.31, 16.86, 11.52),
    ("sgd", "vicreg", 2.00, 1.60, 2.43, 2.01),
    ("sgd", "onlineclr", 0.74, 0.56, 1.50, 0.93),
    ("adam", "sogclr", 0.10, 0.10, 0.23, 0.14),
    ("adam", "clip", 3.34, 3.03, 4.71, 3.69),
    ("adam", "cyclip", 3.92, 3.25, 4.04, 3.74),
    ("adam", "vicreg", 0.66, 0.63, 1.28, 0.86),
    ("adam", "onlineclr", 0.02, 0.02, 0.10, 0.05),
]


def published_table() -> pd.DataFrame:
    return pd.DataFrame(PUBLISHED_ROWS, columns=["optimizer", "loss", *METRICS])


def with_published(df: pd.DataFrame) -> pd.DataFrame:
    """This study's mean Average beside the original published one, per cell of the original grid."""
    summary = cell_summary(df)
    columns = ["optimizer", "loss", "average_mean"]
    if (summary["average_count"] > 1).any():  # a spread exists only with several seeds
        columns.append("average_std")
    pub = published_table().rename(columns={m: f"published_{m}" for m in METRICS})
    return pub.merge(summary[columns], on=["optimizer", "loss"], how="left")


def spearman_vs_published(df: pd.DataFrame) -> dict:
    """Spearman's rho between this study's cell ranking (mean Average) and the published one."""
    from scipy.stats import spearmanr

    both = with_published(df).dropna(subset=["average_mean"])
    if len(both) < 3:
        return {"rho": float("nan"), "p_value": float("nan"), "n_cells": len(both)}
    rho, p = spearmanr(both["average_mean"], both["published_average"])
    return {"rho": float(rho), "p_value": float(p), "n_cells": int(len(both))}


def spearman_by_optimizer(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho against the published Averages over all cells and within each optimizer's row.

    A row's rho says whether the demo orders the *losses* of that optimizer as
    the paper did; the overall rho is dominated by the split between optimizers.
    """
    from scipy.stats import spearmanr

    both = with_published(df).dropna(subset=["average_mean"])
    scopes = [("all", both)] + [(o, both[both["optimizer"] == o]) for o in PAPER_OPTIMIZERS]
    rows = []
    for scope, part in scopes:
        rho = p = float("nan")
        if len(part) >= 3 and part["average_mean"].nunique() > 1:
            rho, p = (float(v) for v in spearmanr(part["average_mean"], part["published_average"]))
        rows.append({"scope": scope, "rho": rho, "p_value": p, "n_cells": int(len(part))})
    return pd.DataFrame(rows)


def findings_from_grid(grid: pd.DataFrame) -> list[dict]:
    """The original study's four conclusions, each tested on a grid of mean Averages (optimizer x loss).

    Returns one ``{"finding", "reproduced", "evidence"}`` per conclusion;
    ``reproduced`` is None when cells are missing.
    """
    name = lambda k: OPTIMIZER_NAMES.get(k, LOSS_NAMES.get(k, k))  # noqa: E731
    losses = [loss for loss in PAPER_LOSSES if loss in grid.columns]
    complete = all(o in grid.index for o in PAPER_OPTIMIZERS) and len(losses) == len(PAPER_LOSSES)
    complete = complete and not grid.loc[list(PAPER_OPTIMIZERS), losses].isna().any().any()
    claims = [
        "AdamW is the best optimizer for every loss",
        "CyCLIP and SogCLR are the best losses (with AdamW)",
        "Adam is poor everywhere (last of the three optimizers for every loss)",
        "SGD is second (mean Average over losses: AdamW > SGD > Adam)",
    ]
    if not complete:
        return [
            {"finding": c, "reproduced": None, "evidence": "not every cell of the 3 x 5 grid completed"} for c in claims
        ]
    grid = grid.loc[list(PAPER_OPTIMIZERS), losses]
    best = grid.idxmax(axis=0)
    worst = grid.idxmin(axis=0)
    top2 = grid.loc["adamw"].sort_values(ascending=False).index[:2].tolist()
    order = grid.mean(axis=1).sort_values(ascending=False)
    not_adamw = [f"{name(loss)} (best: {name(best[loss])})" for loss in losses if best[loss] != "adamw"]
    not_adam = [f"{name(loss)} (last: {name(worst[loss])})" for loss in losses if worst[loss] != "adam"]
    return [
        {
            "finding": claims[0],
            "reproduced": not not_adamw,
            "evidence": f"AdamW is best for {len(losses) - len(not_adamw)} of {len(losses)} losses"
            + (f"; not for {', '.join(not_adamw)}" if not_adamw else ""),
        },
        {
            "finding": claims[1],
            "reproduced": set(top2) == {"cyclip", "sogclr"},
            "evidence": f"with AdamW the two best losses are {name(top2[0])} ({grid.loc['adamw', top2[0]]:.2f}) and "
            f"{name(top2[1])} ({grid.loc['adamw', top2[1]]:.2f})",
        },
        {
            "finding": claims[2],
            "reproduced": not not_adam,
            "evidence": f"Adam is last for {len(losses) - len(not_adam)} of {len(losses)} losses"
            + (f"; not for {', '.join(not_adam)}" if not_adam else ""),
        },
        {
            "finding": claims[3],
            "reproduced": list(order.index) == ["adamw", "sgd", "adam"],
            "evidence": "mean Average over losses: " + ", ".join(f"{name(k)} {v:.2f}" for k, v in order.items()),
        },
    ]


def paper_findings(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`findings_from_grid` on these runs (pretrained-init cells of the original grid)."""
    return pd.DataFrame(findings_from_grid(average_grid(df)))


def optimizer_conclusions(df: pd.DataFrame, chance_avg: float | None = None) -> list[str]:
    """Per optimizer of the original grid: its rank, where it learns, its best loss (e.g. the SGD conclusion)."""
    grid = average_grid(df)
    rows = [o for o in PAPER_OPTIMIZERS if o in grid.index]
    means = grid.loc[rows].mean(axis=1).sort_values(ascending=False)
    out = []
    for rank, (o, mean) in enumerate(means.items(), start=1):
        row = grid.loc[o].dropna()
        line = (
            f"{OPTIMIZER_NAMES[o]}: mean Average over {len(row)} losses {mean:.2f} (rank {rank} of {len(means)}); "
            f"best with {LOSS_NAMES.get(row.idxmax(), row.idxmax())} ({row.max():.2f})"
        )
        if chance_avg is not None:
            line += f"; learns (above twice chance) with {int((row > 2 * chance_avg).sum())} of {len(row)} losses"
        if o != "adamw" and "adamw" in grid.index:
            line += "; against AdamW: " + ", ".join(
                f"{LOSS_NAMES.get(loss, loss)} {row[loss] - grid.loc['adamw', loss]:+.2f}"
                for loss in row.index
                if grid.loc["adamw", loss] == grid.loc["adamw", loss]
            )
        out.append(line + ".")
    return out


def initialisation_conclusions(df: pd.DataFrame) -> list[str]:
    """How the conclusions change from pretrained towers to random ones (the ``<optimizer>-scratch`` cells)."""
    scratch = df[df["optimizer"].astype(str).str.endswith("-scratch")].copy()
    if scratch.empty:
        return []
    scratch["optimizer"] = scratch["optimizer"].str.removesuffix("-scratch")
    grid, base = average_grid(scratch), average_grid(df[df["optimizer"].isin(PAPER_OPTIMIZERS)])
    out = [
        "From scratch (random towers, otherwise identical): mean Average over losses "
        + ", ".join(
            f"{OPTIMIZER_NAMES.get(o, o)} {grid.loc[o].mean():.2f} (pretrained {base.loc[o].mean():.2f})"
            for o in grid.index
            if o in base.index
        )
        + "."
    ]
    rho = spearman_by_optimizer(scratch).set_index("scope")["rho"]
    out.append(f"From scratch, Spearman's rho against the published ranking: {rho['all']:.2f} overall.")
    for f in findings_from_grid(grid):
        verdict = {True: "reproduced", False: "not reproduced", None: "not testable"}[f["reproduced"]]
        out.append(f"From scratch, '{f['finding']}': {verdict} ({f['evidence']}).")
    return out
