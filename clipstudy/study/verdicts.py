"""Every conclusion of the report as a tested comparison: paired over seeds, Holm-corrected, with a verdict.

A run's seed fixes its initial weights and data order, so two cells run on the
same seeds are compared seed by seed (:func:`clipstudy.study.stats.paired_difference`).
Per protocol, the family is every comparison a conclusion rests on:

* optimizers by their mean Average over the five losses (each pair);
* losses by their mean over the three optimizers (the best against each other);
* for each loss, the best optimizer against each other one;
* the original study's four findings, each as the comparisons it claims;

and, across protocols, each optimizer tuned against the shared rate. Holm's
correction runs over the whole family, and a difference smaller than the
spread between two machines running the same command (:data:`MACHINE_SPREAD`)
is "not distinguishable" even when its interval excludes 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clipstudy.study import stats
from clipstudy.study.results import LOSS_NAMES, OPTIMIZER_NAMES

# The largest change between two CPU types (AMD EPYC families 26 and 25) running the same `make study`, of the
# difference between two cells' 5-seed mean Averages, over all 105 pairs of the shared protocol's cells
# (docs/results.md, "Reproducibility"; a single cell on an earlier demo moved as much): a gap below it is no finding.
MACHINE_SPREAD = 2.07
OPTIMIZERS = ("adamw", "sgd", "adam")
LOSSES = ("clip", "sogclr", "cyclip", "vicreg", "onlineclr")
METRIC = "average"
FINDINGS = {
    "F1": "AdamW is the best optimizer for every loss",
    "F2": "CyCLIP and SogCLR are the best losses (with AdamW)",
    "F3": "Adam is poor everywhere (last of the three optimizers for every loss)",
    "F4": "SGD is second (mean Average over losses: AdamW > SGD > Adam)",
}


def name(key: str) -> str:
    return OPTIMIZER_NAMES.get(key, LOSS_NAMES.get(key, key))


def cell_scores(df: pd.DataFrame, protocol: str | None) -> pd.DataFrame:
    """Average per seed (rows) and (optimizer, loss) (columns) of one protocol's completed runs (every run's
    with ``protocol=None``)."""
    done = df[df["status"] == "completed"]
    done = done if protocol is None else done[done["protocol"] == protocol]
    return done.pivot_table(index="seed", columns=["optimizer", "loss"], values=METRIC, aggfunc="first")


def _cell(scores: pd.DataFrame, optimizer: str, loss: str) -> pd.Series:
    return scores[(optimizer, loss)] if (optimizer, loss) in scores.columns else pd.Series(dtype=float)


def _mean_over(scores: pd.DataFrame, *, optimizer: str | None = None, loss: str | None = None) -> pd.Series:
    """Per seed, the mean over the losses of ``optimizer`` (or over the optimizers of ``loss``); a seed with a
    cell missing (diverged, failed, not run) is left out."""
    keys = [(optimizer, x) for x in LOSSES] if optimizer else [(o, loss) for o in OPTIMIZERS]
    if not all(k in scores.columns for k in keys):
        return pd.Series(dtype=float)
    return scores[keys].dropna().mean(axis=1)


def _pair(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    seeds = a.dropna().index.intersection(b.dropna().index)
    return a[seeds].to_numpy(float), b[seeds].to_numpy(float)


def family(df: pd.DataFrame, protocol: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every comparison the conclusions of ``protocol`` rest on: name -> (scores of a, scores of b), by seed.

    Names read ``A > B | context``; a positive difference means A scored higher.
    """
    scores = cell_scores(df, protocol)
    pairs: dict[str, tuple] = {}
    by_optimizer = {o: _mean_over(scores, optimizer=o) for o in OPTIMIZERS}
    for i, a in enumerate(OPTIMIZERS):
        for b in OPTIMIZERS[i + 1 :]:
            pairs[f"{name(a)} > {name(b)} | mean over losses"] = _pair(by_optimizer[a], by_optimizer[b])
    by_loss = {x: _mean_over(scores, loss=x) for x in LOSSES}
    means = {x: s.mean() for x, s in by_loss.items() if len(s)}
    if means:
        best = max(means, key=means.get)
        for other in LOSSES:
            if other != best:
                pairs[f"{name(best)} > {name(other)} | mean over optimizers"] = _pair(by_loss[best], by_loss[other])
    for loss in LOSSES:  # each pair once, in the original study's order (AdamW, SGD, Adam)
        for i, a in enumerate(OPTIMIZERS):
            for b in OPTIMIZERS[i + 1 :]:
                pairs[f"{name(a)} > {name(b)} | {name(loss)}"] = _pair(_cell(scores, a, loss), _cell(scores, b, loss))
    for a in ("cyclip", "sogclr"):
        for b in ("clip", "vicreg", "onlineclr"):
            pairs[f"{name(a)} > {name(b)} | AdamW"] = _pair(_cell(scores, "adamw", a), _cell(scores, "adamw", b))
    return {key: pair for key, pair in pairs.items() if len(pair[0])}


def tested(df: pd.DataFrame, protocol: str, *, noise_floor: float = MACHINE_SPREAD) -> pd.DataFrame:
    """:func:`family` with intervals, Holm-adjusted p-values and verdicts (one row per comparison)."""
    table = stats.compare_family(family(df, protocol), noise_floor=noise_floor)
    return table.assign(protocol=protocol)


def protocol_effect(df: pd.DataFrame, *, noise_floor: float = MACHINE_SPREAD) -> pd.DataFrame:
    """Each optimizer tuned against the shared rate: mean Average over losses, paired by seed (Holm over three)."""
    tuned, shared = cell_scores(df, "tuned"), cell_scores(df, "shared")
    pairs = {
        f"{name(o)} tuned > shared | mean over losses": _pair(
            _mean_over(tuned, optimizer=o), _mean_over(shared, optimizer=o)
        )
        for o in OPTIMIZERS
    }
    pairs = {key: pair for key, pair in pairs.items() if len(pair[0])}
    return stats.compare_family(pairs, noise_floor=noise_floor) if pairs else pd.DataFrame()


def length_effect(long: pd.DataFrame, short: pd.DataFrame, *, noise_floor: float = MACHINE_SPREAD) -> pd.DataFrame:
    """Each cell of a longer run against the same cell of a shorter one, paired by seed, Holm over the cells.

    ``long`` and ``short`` are two sets of runs (each one protocol's rows: the same learning rates, only the
    length differs). Names read ``1500 > 375 steps | AdamW + CLIP`` from the runs' ``global_step``."""
    a, b = cell_scores(long, None), cell_scores(short, None)
    a_steps, b_steps = (
        df[df["status"] == "completed"].groupby(["optimizer", "loss"])["global_step"].max() for df in (long, short)
    )
    pairs = {}
    rank = {key: i for i, key in enumerate(OPTIMIZERS + LOSSES)}  # the study's order; others after, by name
    for optimizer, loss in sorted(
        a.columns.intersection(b.columns),
        key=lambda c: (rank.get(c[0], len(rank)), c[0], rank.get(c[1], len(rank)), c[1]),
    ):
        label = f"{a_steps[(optimizer, loss)]:.0f} > {b_steps[(optimizer, loss)]:.0f} steps"
        pairs[f"{label} | {name(optimizer)} + {name(loss)}"] = _pair(a[(optimizer, loss)], b[(optimizer, loss)])
    pairs = {key: pair for key, pair in pairs.items() if len(pair[0])}
    return stats.compare_family(pairs, noise_floor=noise_floor) if pairs else pd.DataFrame(columns=stats.FAMILY_COLUMNS)


def _verdicts(table: pd.DataFrame, names: list[str]) -> list[str]:
    rows = table.set_index("name")
    return [rows.loc[n, "verdict"] if n in rows.index else "missing" for n in names]


def findings(table: pd.DataFrame) -> pd.DataFrame:
    """The original study's four findings judged by the tested comparisons of one protocol.

    ``reproduced`` when every comparison the finding claims is "better"; ``contradicted`` when one is the
    opposite ("worse"); otherwise ``not distinguishable`` (or ``not testable`` with cells missing).
    """
    claims = {
        "F1": [f"AdamW > {name(b)} | {name(loss)}" for loss in LOSSES for b in ("sgd", "adam")],
        "F2": [f"{name(a)} > {name(b)} | AdamW" for a in ("cyclip", "sogclr") for b in ("clip", "vicreg", "onlineclr")],
        "F3": [f"{name(a)} > Adam | {name(loss)}" for loss in LOSSES for a in ("adamw", "sgd")],
        "F4": ["AdamW > SGD | mean over losses", "SGD > Adam | mean over losses"],
    }
    rows = []
    for key, names in claims.items():
        verdicts = _verdicts(table, names)
        if "missing" in verdicts:
            outcome = "not testable"
        elif all(v == stats.BETTER for v in verdicts):
            outcome = "reproduced"
        elif any(v == stats.WORSE for v in verdicts):
            outcome = "contradicted"
        else:
            outcome = "not distinguishable"
        counts = {v: verdicts.count(v) for v in (stats.BETTER, stats.WORSE, stats.NOT_DISTINGUISHABLE)}
        evidence = (
            f"{counts[stats.BETTER]} of {len(names)} claimed comparisons hold, {counts[stats.WORSE]} reversed, "
            f"{counts[stats.NOT_DISTINGUISHABLE]} not distinguishable"
        )
        rows.append({"finding": FINDINGS[key], "outcome": outcome, "evidence": evidence})
    return pd.DataFrame(rows)


SWAPPED = {stats.BETTER: stats.WORSE, stats.WORSE: stats.BETTER}


def from_side(row: dict, side: str) -> dict:
    """A comparison row ``A > B`` as seen from ``side`` (A or B): B's view negates the difference and
    its interval and swaps better and worse."""
    a, b = row["name"].split(" | ")[0].split(" > ")
    if side == a:
        return {**row, "other": b}
    verdict = SWAPPED.get(row["verdict"], row["verdict"])
    return {**row, "other": a, "mean": -row["mean"], "low": -row["high"], "high": -row["low"], "verdict": verdict}


def best_and_rivals(table: pd.DataFrame, scope: str) -> tuple[str, list[dict]] | None:
    """The leader of ``scope`` ("mean over losses" or "mean over optimizers"), by the sum of its mean
    differences, and its comparisons with each rival, seen from the leader's side."""
    rows = table[table["name"].str.endswith(f"| {scope}")].to_dict("records")
    if not rows:
        return None
    margin: dict[str, float] = {}
    for r in rows:
        a, b = r["name"].split(" | ")[0].split(" > ")
        margin[a] = margin.get(a, 0.0) + r["mean"]
        margin[b] = margin.get(b, 0.0) - r["mean"]
    best = max(margin, key=margin.get)
    return best, [from_side(r, best) for r in rows if best in r["name"].split(" | ")[0].split(" > ")]


def interval(row: dict) -> str:
    return f"{row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"


def rates_used(df: pd.DataFrame, protocol: str) -> dict[str, list[float]]:
    """The learning rates each optimizer ran with under ``protocol`` (as its runs recorded them), sorted."""
    runs = df[(df["protocol"] == protocol) & df["optimizer"].isin(OPTIMIZERS)]
    rates = runs.groupby("optimizer")["lr"].unique()
    return {o: sorted(float(r) for r in rates[o]) for o in OPTIMIZERS if o in rates.index}


def _rates_text(rates: dict[str, list[float]]) -> str:
    return ", ".join(
        f"{name(o)} {lrs[0]:g}" if len(lrs) == 1 else f"{name(o)} {lrs[0]:g} to {lrs[-1]:g} by loss"
        for o, lrs in rates.items()
    )


def rank_agreement(df: pd.DataFrame, protocol: str, *, seed: int = 0):
    """Spearman's rho between this protocol's 15 cell means and the published Averages, with a bootstrap
    interval and a permutation p-value (:func:`clipstudy.study.stats.spearman_with_interval`)."""
    from clipstudy.study.findings import published_table

    means = cell_scores(df, protocol).mean().rename("ours").reset_index()
    both = published_table().merge(means, on=["optimizer", "loss"])
    return stats.spearman_with_interval(both["ours"], both[METRIC], seed=seed)


def _leader_sentence(table: pd.DataFrame, scope: str, what: str) -> str:
    found = best_and_rivals(table, scope)
    if found is None:
        return f"no {what} could be compared"
    best, rivals = found
    return (
        f"the best {what} is {best} ("
        + "; ".join(f"vs {r['other']} {interval(r)}, {r['verdict']}" for r in rivals)
        + ")"
    )


def answer(df: pd.DataFrame) -> list[str]:
    """The report's opening answer, at most six computed sentences: the best optimizer and loss under each
    protocol with paired intervals and verdicts, what tuning changes, the published findings, the rank
    agreement, and the noise floor every verdict respects."""
    protocols = [p for p in ("shared", "tuned") if (df["protocol"] == p).any()]
    out, outcomes = [], []
    for protocol in protocols:
        table = tested(df, protocol)
        rates = _rates_text(rates_used(df, protocol))
        out.append(
            f"Under the {protocol} protocol (learning rates: {rates}), "
            f"{_leader_sentence(table, 'mean over losses', 'optimizer over the five losses')}, and "
            f"{_leader_sentence(table, 'mean over optimizers', 'loss over the three optimizers')}."
        )
        outcomes.append(f"{protocol}: " + ", ".join(f"{f.finding!r} {f.outcome}" for f in findings(table).itertuples()))
    if set(protocols) == {"shared", "tuned"}:
        effect = protocol_effect(df)
        if len(effect):
            out.append(
                "Tuning each optimizer's rate with the same budget changes its mean Average over the losses by "
                + "; ".join(
                    f"{r['name'].split(' tuned')[0]} {interval(r)}, {r['verdict']}" for r in effect.to_dict("records")
                )
                + "."
            )
    if outcomes:
        out.append(
            "The original study's four findings, each tested comparison by comparison: " + "; ".join(outcomes) + "."
        )
    agreements = []
    for protocol in protocols:
        rho = rank_agreement(df, protocol)
        if rho.n >= 3:
            agreements.append(
                f"{protocol} {rho.rho:.2f} [{rho.low:.2f}, {rho.high:.2f}], permutation p = {rho.p_value:.3f}"
            )
    if agreements:
        out.append(
            "Spearman's rho between this study's 15 cells and the published ones: " + "; ".join(agreements) + "."
        )
    out.append(
        f"Each interval is a 95% paired t-interval over the seeds; verdicts use Holm-adjusted p-values within each "
        f"protocol, and a difference smaller than {MACHINE_SPREAD:g} points, the spread between two machines "
        "running the same command, is not distinguishable even when its interval excludes 0."
    )
    return out
