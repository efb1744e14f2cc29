"""Gather every run's outputs into tidy tables, figures and computed conclusions.

The analysis notebook calls these functions; ``python -m clipstudy report``
executes that notebook with papermill and renders it to
``reports/<profile>/report.html`` (code hidden), beside
``reports/<profile>/results.csv``. Nothing in the conclusions is typed in by
hand: every sentence is computed from the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from clipstudy import paths
from clipstudy.core.diagnostics import COLLAPSED_COS
from clipstudy.core.metrics import chance_levels
from clipstudy.data.layout import resolve_paths
from clipstudy.errors import StartupError
from clipstudy.study.results import (
    LOSS_NAMES,
    OPTIMIZER_NAMES,
    PROTOCOLS,
    RESULT_COLUMNS,
    cell_summary,
    load_logs,
    order_key,
    run_files,
)


# ------------------------------------------------------------------ gathering
def collapse_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: mean over seeds of the diagnostics at the start and end, and how many seeds end collapsed."""
    cols = [c for c in RESULT_COLUMNS if c.endswith(("_start", "_end"))]
    done = df[df["status"] == "completed"].copy()
    done["collapsed"] = (done[["image_cos_mean_end", "text_cos_mean_end"]] >= COLLAPSED_COS).any(axis=1)
    out = done.groupby(["optimizer", "loss"], sort=False).agg(
        **{c: (c, "mean") for c in cols}, collapsed_seeds=("collapsed", "sum"), seeds=("collapsed", "size")
    )
    return out.reset_index().sort_values(["optimizer", "loss"], key=order_key).reset_index(drop=True)


def trajectory_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell and evaluation: the mean over seeds of the validation Average and of the weight norm at that
    step (from the last ``history.csv`` row at or before it), so that a shrinking norm shows beside the scores.
    Step 0 is the initial weights (``weight_norm_start``), without a score. Completed runs only."""
    done = df[df["status"] == "completed"]
    evals, steps = load_logs(done, "epochs.csv"), load_logs(done, "history.csv")
    keys = ["optimizer", "loss_name", "seed"]
    if evals.empty or steps.empty or "weight_norm" not in steps or "val_average" not in evals:
        return pd.DataFrame(columns=["optimizer", "loss", "epoch", "step", "val_average", "weight_norm", "seeds"])
    logged = steps.dropna(subset=["weight_norm"])[[*keys, "step", "weight_norm"]].sort_values("step")
    rows = pd.merge_asof(evals[[*keys, "epoch", "step", "val_average"]].sort_values("step"), logged, on="step", by=keys)
    start = done[["optimizer", "loss", "seed", "weight_norm_start"]].rename(
        columns={"loss": "loss_name", "weight_norm_start": "weight_norm"}
    )
    rows = pd.concat([start.assign(epoch=0, step=0, val_average=float("nan")), rows], ignore_index=True)
    out = (
        rows.rename(columns={"loss_name": "loss"})
        .groupby(["optimizer", "loss", "epoch", "step"], sort=False)
        .agg(val_average=("val_average", "mean"), weight_norm=("weight_norm", "mean"), seeds=("seed", "nunique"))
        .reset_index()
    )
    return out.sort_values(["optimizer", "loss", "step"], key=order_key).reset_index(drop=True)


def collapse_conclusions(df: pd.DataFrame, chance_avg: float | None = None) -> list[str]:
    """What the diagnostics say: collapsed cells, and the weights and embeddings of cells that did not learn."""
    table = collapse_table(df)
    if table.empty or table["text_cos_mean_end"].isna().all():
        return ["No collapse diagnostics in these runs (they predate them)."]
    out = []
    for when in ("start", "end"):
        hit = table[(table[[f"image_cos_mean_{when}", f"text_cos_mean_{when}"]] >= COLLAPSED_COS).any(axis=1)]
        out.append(
            f"Cells whose embeddings {when} collapsed (mean off-diagonal cosine >= {COLLAPSED_COS} in a "
            f"modality, mean over seeds): "
            + (
                ", ".join(
                    f"{cell_label(r)} (image {getattr(r, f'image_cos_mean_{when}'):.2f}, text "
                    f"{getattr(r, f'text_cos_mean_{when}'):.2f})"
                    for r in hit.itertuples()
                )
                or "none"
            )
            + "."
        )
    norms = table.groupby("optimizer", sort=False)[["weight_norm_start", "weight_norm_end"]].mean()
    out.append(
        "Norm of the weight matrices, start -> end, mean over losses: "
        + ", ".join(
            f"{OPTIMIZER_NAMES.get(o, o)} {r.weight_norm_start:.1f} -> {r.weight_norm_end:.1f}"
            for o, r in norms.iterrows()
        )
        + "."
    )
    summary = cell_summary(df)
    # the best Average per loss among cells of the same initialisation (pretrained or scratch)
    summary["scratch"] = summary["optimizer"].astype(str).str.endswith("-scratch")
    best = summary.groupby(["scratch", "loss"])["average_mean"].max()
    averages = summary.set_index(["optimizer", "loss"])["average_mean"]
    settings = _cell_settings(df)  # for the step-size lines: once, not per weak cell
    bases = df.dropna(subset=["base_optimizer"]).groupby("optimizer")["base_optimizer"].first()
    for r in table.itertuples():
        avg = averages.get((r.optimizer, r.loss), float("nan"))
        top = best.get((str(r.optimizer).endswith("-scratch"), r.loss), float("nan"))
        if avg != avg:
            continue
        if chance_avg is not None and avg <= 2 * chance_avg:
            why = f"did not learn (Average {avg:.2f})"
        elif avg < 0.5 * top:
            why = (
                f"reaches less than half the best Average for {LOSS_NAMES.get(r.loss, r.loss)} "
                f"({avg:.2f} against {top:.2f})"
            )
        else:
            continue
        gradient = (
            f", gradient norm {r.grad_norm_start:.2f} -> {r.grad_norm_end:.2f}"
            if r.grad_norm_start == r.grad_norm_start
            else ""
        )
        out.append(
            f"{cell_label(r)} {why}: image cosine {r.image_cos_mean_start:.2f} -> {r.image_cos_mean_end:.2f}, "
            f"text cosine {r.text_cos_mean_start:.2f} -> {r.text_cos_mean_end:.2f}, weight norm "
            f"{r.weight_norm_start:.1f} -> {r.weight_norm_end:.1f}{gradient}."
        )
        out += _step_size_conclusion(r, table, summary, settings, bases)
    return out


# Optimizers whose step is the learning rate times the gradient (plus momentum): a loss with a smaller
# gradient gets proportionally shorter steps. Adam and AdamW divide by a running gradient scale instead.
GRADIENT_PROPORTIONAL = {"sgd"}
# A first gradient this many times smaller than the optimizer's best loss's is named as the likely cause.
GRADIENT_RATIO = 10.0


def _cell_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Per (optimizer, loss): the lr and grad_clip all completed seeds share; NaN if unknown or if they differ."""
    done = df[df["status"] == "completed"]
    return done.groupby(["optimizer", "loss"])[["lr", "grad_clip"]].agg(
        lambda s: float(s.iloc[0]) if s.nunique(dropna=False) == 1 else float("nan")
    )


def _step_size_conclusion(
    r, table: pd.DataFrame, summary: pd.DataFrame, settings: pd.DataFrame, bases: pd.Series
) -> list[str]:
    """For a weak cell of a gradient-proportional optimizer: its first gradient against its optimizer's best
    loss's, said only when both ran at one learning rate without gradient clipping."""
    if bases.get(r.optimizer) not in GRADIENT_PROPORTIONAL or not r.grad_norm_start > 0:
        return []

    def setting(optimizer, loss, field):
        return settings[field].get((optimizer, loss), float("nan"))

    own = summary[summary["optimizer"] == r.optimizer].dropna(subset=["average_mean"])
    reference = own.loc[own["average_mean"].idxmax()]
    ref = table[(table["optimizer"] == r.optimizer) & (table["loss"] == reference.loss)].iloc[0]
    lr = setting(r.optimizer, r.loss, "lr")
    same_setting = (
        lr == setting(r.optimizer, ref.loss, "lr")
        and setting(r.optimizer, r.loss, "grad_clip") == 0
        and setting(r.optimizer, ref.loss, "grad_clip") == 0
    )
    ratio = ref.grad_norm_start / r.grad_norm_start
    if not (same_setting and ratio >= GRADIENT_RATIO):
        return []
    line = (
        f"{cell_label(r)}: its first gradient norm ({r.grad_norm_start:.2f}) is {ratio:.0f}x smaller than "
        f"{cell_label(ref)}'s ({ref.grad_norm_start:.2f}). SGD's step is the learning rate times the gradient, "
        f"so at the same learning rate ({lr:g}, no gradient clipping) its first steps are about {ratio:.0f}x "
        "shorter"
    )
    # the loss's best cell among optimizers that divide by a gradient scale, same initialisation, same rate
    others = summary[
        (summary["loss"] == r.loss)
        & summary["average_mean"].notna()
        & (summary["scratch"] == str(r.optimizer).endswith("-scratch"))
        & ~summary["optimizer"].map(bases).isin(GRADIENT_PROPORTIONAL)
    ]
    others = others[[setting(o, r.loss, "lr") == lr for o in others["optimizer"]]]
    if len(others):
        best = others.loc[others["average_mean"].idxmax()]
        first = table[(table["optimizer"] == best.optimizer) & (table["loss"] == r.loss)].iloc[0].grad_norm_start
        line += (
            f"; {cell_label(best)}, whose step is divided by a running gradient scale, reaches "
            f"{best.average_mean:.2f} at that rate" + (f" (first gradient norm {first:.2f})" if first == first else "")
        )
    return [line + "."]


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["wall_time_s", "train_samples_per_s", "peak_memory_mb"]
    return df.groupby(["optimizer", "loss"], sort=False)[cols].mean().reset_index()


def chance_levels_for(runs_root: str | Path) -> dict:
    """Chance levels of the evaluation sets used by the runs (from the first run's configuration)."""
    for _, cfg_file in run_files(runs_root, "config.json"):
        try:
            cfg = json.loads(cfg_file.read_text())["config"]
            data_paths = resolve_paths(cfg, needs_tokenizer=False)
            entries = json.loads(Path(data_paths["retrieval_ann"]).read_text())
            txt2img = [
                i
                for i, e in enumerate(entries)
                for _ in (e["caption"] if isinstance(e["caption"], list) else [e["caption"]])
            ]
            n_classes = sum(1 for p in Path(data_paths["zeroshot_images"]).iterdir() if p.is_dir())
            return chance_levels(txt2img, len(entries), n_classes)
        except Exception:  # a run from another machine may point to data that is not here
            continue
    return {}


# ---------------------------------------------------------------- environment
ENVIRONMENT_KEYS = ("python", "torch", "lock_sha256")


def environment_table(runs_root: str | Path) -> pd.DataFrame:
    """One row per run: the Python, torch and lock file digest its config.json recorded (None: not recorded)."""
    rows = []
    for _, cfg_file in run_files(runs_root, "config.json"):
        try:
            versions = json.loads(cfg_file.read_text()).get("versions") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            versions = {}
        rows.append(
            {
                "run": cfg_file.parent.name,
                **{k: versions.get(k) for k in ENVIRONMENT_KEYS},
                "lock_mismatches": versions.get("lock_mismatches") or [],
            }
        )
    return pd.DataFrame(rows, columns=["run", *ENVIRONMENT_KEYS, "lock_mismatches"])


def _known(value) -> str | None:
    return value if isinstance(value, str) and value else None  # pandas stores a gap as NaN


def _describe_environment(python, torch, lock) -> str:
    lock_text = f"lock sha256 {lock[:12]}" if _known(lock) else "no lock file recorded"
    return f"Python {_known(python) or '?'}, torch {_known(torch) or '?'}, {lock_text}"


def environment_notes(env: pd.DataFrame) -> list[str]:
    """The environment the runs were made in; runs made in different ones, or off their lock, are named."""
    if env.empty:
        return ["No run recorded its environment (no config.json found)."]
    groups: dict[str, list[str]] = {}
    for row in env.itertuples():
        groups.setdefault(_describe_environment(row.python, row.torch, row.lock_sha256), []).append(row.run)
    if len(groups) == 1:
        ((described, runs),) = groups.items()
        notes = [f"All {len(runs)} runs: {described}." if len(runs) > 1 else f"The run: {described}."]
    else:
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        notes = [
            "Runs made with different environments (compare their numbers with care): "
            + "; ".join(
                f"{len(runs)} run{'s' if len(runs) > 1 else ''}: {described} ({', '.join(runs)})"
                for described, runs in ordered
            )
            + "."
        ]
    drifted = env[env["lock_mismatches"].map(len) > 0]
    if len(drifted):
        notes.append(
            f"{len(drifted)} run{'s' if len(drifted) > 1 else ''} used packages other than {{}} lock file's: ".format(
                "their" if len(drifted) > 1 else "its"
            )
            + "; ".join(
                f"{r.run} ({', '.join(r.lock_mismatches[:3])}"
                + (f", {len(r.lock_mismatches) - 3} more" if len(r.lock_mismatches) > 3 else "")
                + ")"
                for r in drifted.itertuples()
            )
            + "."
        )
    unlocked = int(env["lock_sha256"].map(_known).isna().sum())
    if unlocked:
        notes.append(
            f"{'All' if unlocked == len(env) else unlocked} of the {len(env)} runs recorded no lock file: config.json "
            "holds the lock's digest since 2026-11-29, so runs made before (or outside a checkout holding "
            "requirements/lock.txt) cannot state theirs; a rerun records it."
        )
    return notes


# ---------------------------------------------------------------- conclusions
# ---------------------------------------------------- what the analysis notebook reads and writes
class NothingToReport(StartupError):
    """A runs folder without any run record: there is nothing to report, and nothing is written."""

    def _render_traceback_(self) -> list[str]:  # what IPython shows instead of a traceback: one line
        return [str(self)]


def runs_to_report(profile: str, runs: str | Path = "") -> Path:
    """The runs folder to report (``runs``, else the profile's); :class:`NothingToReport` when it holds no run."""
    folder = Path(runs) if runs else paths.runs_dir(profile)
    if not folder.is_dir() or not run_files(folder, "metrics.json"):
        raise NothingToReport(
            f"nothing to report: {folder} holds no runs (no */metrics.json); train one with notebooks/train.ipynb "
            f"or run `make sweep PROFILE={profile}`{' (or `make demo`)' if profile == 'demo' else ''}, or set "
            f"`runs` to a runs folder. Nothing was written: reports/{profile}/ is as it was."
        )
    return folder


def tuning_table(profile: str, tuning: str | Path = "", out_dir: str | Path = "") -> Path | None:
    """The tuning table to show: ``tuning``, else the report folder's ``tuning.csv`` (``out_dir``, else the
    profile's reports folder); None when there is no such folder (an installed clipstudy opened by hand)."""
    if tuning:
        return Path(tuning)
    if out_dir:
        return Path(out_dir) / "tuning.csv"
    try:
        return paths.reports_dir(profile) / "tuning.csv"
    except paths.ProjectRootNotFound:
        return None


def save(out_dir: str | Path, name: str, content: pd.DataFrame | str) -> Path | None:
    """Write a table (as CSV) or a text to ``out_dir/name``; nothing when ``out_dir`` is empty: the notebook
    opened by hand never writes over the committed results, ``report`` (:func:`render`) passes the folder."""
    if not out_dir:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def overview(profile: str, df: pd.DataFrame, out_dir: str | Path = "") -> str:
    """The report's first line: runs, cells, seeds and statuses (and, opened by hand, that it writes nothing)."""
    statuses = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    seeds = sorted(int(s) for s in df["seed"].dropna().unique())
    named = [p for p in PROTOCOLS if (df["protocol"] == p).any()]
    protocols = f" under the {' and the '.join(named)} protocol{'s' if len(named) > 1 else ''}" if named else ""
    where = "" if out_dir else f" Shown only: `python -m clipstudy report --profile {profile}` writes the tables."
    return (
        f"**Profile `{profile}`**: {len(df)} runs in {df.groupby(['optimizer', 'loss']).ngroups} optimizer x loss "
        f"cells{protocols}, seeds {seeds}; statuses: {statuses}.{where}"
    )


# ------------------------------------------------------------------ rendering
def render(profile: str, runs_root: Path, out_dir: Path, *, notebook: Path | None = None) -> Path:
    """Execute the analysis notebook and render it to HTML without code; return the HTML path."""
    import nbformat
    from nbconvert import HTMLExporter

    from clipstudy.study.notebooks import execute_notebook

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "analysis.ipynb"
    execute_notebook(
        notebook or paths.notebook("analysis.ipynb"),
        executed,
        {"profile": profile, "runs": str(runs_root.resolve()), "out_dir": str(out_dir.resolve())},
    )
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    html = out_dir / "report.html"
    html.write_text(body, encoding="utf-8")
    return html


def cell_label(r) -> str:
    """ "AdamW + CLIP": a cell (a row with ``optimizer`` and ``loss``) by its display names."""
    return f"{OPTIMIZER_NAMES.get(r.optimizer, r.optimizer)} + {LOSS_NAMES.get(r.loss, r.loss)}"
