"""The report's conclusions: computed sentences, never typed by hand, each resting on a test or a count.

Per protocol (``[shared]``, ``[tuned]``; untagged for a runs folder without
protocol folders), every sentence that says one setting beats another quotes
its paired comparison over seeds (:mod:`clipstudy.study.verdicts`): the mean
difference, its 95% interval and the verdict after Holm's correction and the
machine-spread floor. Sentences that describe (a mean, a count, a gradient
ratio) say so.
"""

from __future__ import annotations

import pandas as pd

from clipstudy.study import findings, stats, verdicts
from clipstudy.study.report import cell_label, collapse_conclusions
from clipstudy.study.results import LOSS_NAMES, OPTIMIZER_NAMES, PROTOCOLS, cell_summary


def protocols_in(df: pd.DataFrame) -> list[str]:
    """The protocols with runs, in report order ("" for runs outside protocol folders)."""
    present = set(df["protocol"].fillna(""))
    return [p for p in ("", *PROTOCOLS) if p in present]


def conclusions(df: pd.DataFrame, chance: dict | None = None) -> list[str]:
    """Every protocol's conclusions (tagged with it when there are protocol folders), then the runs that failed.

    With ``chance`` (from :func:`clipstudy.study.report.chance_levels_for`), cells not above twice the
    chance Average are named as not having learned.
    """
    df = df.assign(protocol=df["protocol"].fillna(""))
    out = []
    for protocol in protocols_in(df):
        tag = f"[{protocol}] " if protocol else ""
        out += [tag + line for line in protocol_conclusions(df[df["protocol"] == protocol], protocol, chance)]
    return out + _status_conclusions(df)


def protocol_conclusions(df: pd.DataFrame, protocol: str, chance: dict | None) -> list[str]:
    done = cell_summary(df).dropna(subset=["average_mean"])
    if done.empty:
        return ["No cell completed, so there is nothing to conclude."]
    table = verdicts.tested(df, protocol)
    out = [_best_cell_line(done)] + _loss_conclusions(done, table)
    for f in verdicts.findings(table).itertuples():
        out.append(f"Paper finding '{f.finding}': {f.outcome} ({f.evidence}).")
    rho = verdicts.rank_agreement(df, protocol)
    if rho.n >= 3:
        out.append(
            f"Spearman's rho against the published ranking of the {rho.n} cells: {rho.rho:.2f} "
            f"[{rho.low:.2f}, {rho.high:.2f}], permutation p = {rho.p_value:.3f}."
        )
    chance_avg = _chance_average(chance)
    out += _variant_conclusions(df)
    out += findings.optimizer_conclusions(df, chance_avg) + collapse_conclusions(df, chance_avg)
    out += findings.initialisation_conclusions(df)
    return out + _chance_conclusions(done, chance_avg)


def _best_cell_line(done: pd.DataFrame) -> str:
    best = done.loc[done["average_mean"].idxmax()]
    return (
        f"Best cell (highest mean): {OPTIMIZER_NAMES.get(best.optimizer, best.optimizer)} + "
        f"{LOSS_NAMES.get(best.loss, best.loss)}, Average {best.average_mean:.2f}"
        + (f" ± {best.average_std:.2f} over {int(best.average_count)} seeds" if best.average_count > 1 else "")
        + "."
    )


def _loss_conclusions(done: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Per loss: the optimizer with the highest mean, and its tested comparison with each other optimizer."""
    rows = {r["name"]: r for r in table.to_dict("records")}
    out = []
    for loss, group in done.groupby("loss", sort=False):
        first = group.sort_values("average_mean", ascending=False).iloc[0]
        best, loss_name = OPTIMIZER_NAMES.get(first.optimizer, first.optimizer), LOSS_NAMES.get(loss, loss)
        line = f"{loss_name}: best optimizer {best} ({first.average_mean:.2f})"
        clauses = []
        for other in group["optimizer"]:
            name = OPTIMIZER_NAMES.get(other, other)
            row = rows.get(f"{best} > {name} | {loss_name}") or rows.get(f"{name} > {best} | {loss_name}")
            if other != first.optimizer and row is not None:
                seen = verdicts.from_side(row, best)
                clauses.append(f"vs {name} {verdicts.interval(seen)}, {seen['verdict']}")
        if clauses:
            line += "; " + "; ".join(clauses)
        elif len(group) > 1:
            line += " (fewer than two seeds in common: nothing to test)"
        out.append(line + ".")
    return out


def _chance_average(chance: dict | None) -> float | None:
    if chance and all(k in chance for k in ("txt_r1", "img_r1", "zeroshot_top1")):
        return (chance["txt_r1"] + chance["img_r1"] + chance["zeroshot_top1"]) / 3
    return None


def _variant_conclusions(df: pd.DataFrame) -> list[str]:
    """Each optimizer variant against the optimizer its runs say it modifies (base_optimizer), paired by
    seed on the mean Average over the losses both ran (scratch variants: see the initialisation lines)."""
    done = df[df["status"] == "completed"]
    bases = done.dropna(subset=["base_optimizer"]).groupby("optimizer")["base_optimizer"].first()
    out = []
    for label, base in bases.items():
        if label == base or base not in set(done["optimizer"]) or str(label).endswith("-scratch"):
            continue
        ours, theirs = (
            done[done["optimizer"] == o].pivot_table(index="seed", columns="loss", values="average")
            for o in (label, base)
        )
        losses = ours.columns.intersection(theirs.columns)
        seeds = ours.index.intersection(theirs.index)
        a, b = ours.loc[seeds, losses].mean(axis=1), theirs.loc[seeds, losses].mean(axis=1)
        keep = a.notna() & b.notna()
        comparison = stats.paired_difference(a[keep].to_numpy(), b[keep].to_numpy())
        verdict = stats.verdict_reason(comparison, comparison.p_value, noise_floor=verdicts.MACHINE_SPREAD)
        row = {"mean": comparison.mean, "low": comparison.low, "high": comparison.high}
        out.append(
            f"{OPTIMIZER_NAMES.get(label, label)} against {OPTIMIZER_NAMES.get(base, base)} (mean over "
            f"{len(losses)} losses, {comparison.n} seeds): {verdicts.interval(row)}, {verdict.label} "
            f"({verdict.reason})."
        )
    return out


def _chance_conclusions(done: pd.DataFrame, chance_avg: float | None) -> list[str]:
    if chance_avg is None:
        return []
    learned = done[done["average_mean"] > 2 * chance_avg]
    out = [f"{len(learned)} of {len(done)} cells reach more than twice the chance Average ({chance_avg:.2f})."]
    below = done[done["average_mean"] < chance_avg]
    if len(below):
        out.append("Below chance: " + ", ".join(cell_label(r) for r in below.itertuples()) + ".")
    return out


def _status_conclusions(df: pd.DataFrame) -> list[str]:
    """The runs that diverged (and at which step) or failed."""
    out = []
    for status, what in (("diverged", "diverged"), ("failed", "failed")):
        runs = df[df["status"] == status]
        if len(runs):
            names = [
                f"{r.protocol + '/' if r.protocol else ''}{r.optimizer}-{r.loss}-s{r.seed}"
                + (f" at step {_step(r.diverged_at_step)}" if status == "diverged" else "")
                for r in runs.itertuples()
            ]
            out.append(f"{len(runs)} run(s) {what}: " + ", ".join(names) + ".")
    return out


def _step(value) -> str:
    return str(int(value)) if value == value else "?"  # NaN: not recorded


def marked_study_table(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """:func:`~clipstudy.study.results.study_table` of one protocol with ``vs best``: for each loss, ``best``
    on its best optimizer (highest mean) and, on the others, the paired verdict of that cell against the best
    (``worse``: behind beyond the noise; ``not distinguishable``)."""
    from clipstudy.study.results import study_table

    df = df.assign(protocol=df["protocol"].fillna(""))  # runs outside protocol folders: "" (NaN read back)
    part = df[df["protocol"] == protocol]
    table = study_table(part)
    if table.empty:
        return table
    rows = {r["name"]: r for r in verdicts.tested(part, protocol).to_dict("records")}
    summary = cell_summary(part).dropna(subset=["average_mean"])
    best = {loss: g.loc[g["average_mean"].idxmax(), "optimizer"] for loss, g in summary.groupby("loss")}
    best_name = {LOSS_NAMES.get(loss, loss): OPTIMIZER_NAMES.get(o, o) for loss, o in best.items()}

    def mark(row) -> str:
        leader = best_name.get(row["Method"])
        if leader is None:
            return "–"
        if row["Optimizer"] == leader:
            return "best"
        found = rows.get(f"{leader} > {row['Optimizer']} | {row['Method']}") or rows.get(
            f"{row['Optimizer']} > {leader} | {row['Method']}"
        )
        return verdicts.from_side(found, row["Optimizer"])["verdict"] if found else "–"

    table["vs best"] = table.apply(mark, axis=1)  # study_table has a Protocol column for a named protocol
    return table
