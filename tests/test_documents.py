"""The documents' results are the committed data's, computed, never typed: every block between
``<!-- name: ... -->`` and ``<!-- /name -->`` in README.md and docs/results.md is what the report's code computes
from ``reports/demo/results.csv`` (and ``tuning.csv``), and the committed report files say the same.

``python tests/test_documents.py --write`` rewrites the blocks from the committed data (after ``make study``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from clipstudy.core.metrics import chance_levels
from clipstudy.study import conclusions as study_conclusions
from clipstudy.study import verdicts
from clipstudy.study.results import LOSS_NAMES, OPTIMIZER_NAMES, average_grid, order_key

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
DEMO = ROOT / "reports" / "demo"
LONG = ROOT / "reports" / "demo-long"
ORIGINAL_OPTIMIZERS = ("adamw", "sgd", "adam")
ORIGINAL_LOSSES = ("clip", "sogclr", "cyclip", "vicreg", "onlineclr")
BLOCK = r"^<!-- {name}:.*?-->\n(.*?)^<!-- /{name} -->$"
BLOCKS = [
    (README, "answer"),
    (README, "average-grid"),
    (RESULTS, "results-table"),
    (RESULTS, "conclusions"),
    (RESULTS, "tuning"),
    (RESULTS, "long-run"),
]


def between_markers(path: Path, name: str) -> list[str]:
    """The lines of ``path`` between ``<!-- name: ... -->`` and ``<!-- /name -->``."""
    found = re.search(BLOCK.format(name=name), path.read_text(encoding="utf-8"), re.M | re.S)
    assert found, f"{path.relative_to(ROOT)}: no <!-- {name}: ... --> ... <!-- /{name} --> block"
    return found.group(1).strip("\n").splitlines()


def markdown(table: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]


def read_results(folder: Path = DEMO) -> pd.DataFrame:
    df = pd.read_csv(folder / "results.csv", keep_default_na=True)
    df["seed"] = df["seed"].astype("Int64")  # as collect_runs types it
    df["protocol"] = df["protocol"].astype(object).fillna("")  # all empty (runs outside protocol folders): float
    return df


def stated_chance() -> dict:
    """Chance levels of the benchmark, from the set sizes the results page states."""
    text = RESULTS.read_text(encoding="utf-8")
    found = re.search(r"retrieval on (\d+)\s+images x (\d+) captions,\s+zero-shot on (\d+) classes", text)
    assert found, "docs/results.md: no 'retrieval on N images x K captions, zero-shot on C classes'"
    n_images, captions, n_classes = map(int, found.groups())
    chance = chance_levels([i for i in range(n_images) for _ in range(captions)], n_images, n_classes)
    chance["average"] = (chance["txt_r1"] + chance["img_r1"] + chance["zeroshot_top1"]) / 3
    return chance


def study_tables(df: pd.DataFrame) -> pd.DataFrame:
    tables = [study_conclusions.marked_study_table(df, p) for p in study_conclusions.protocols_in(df)]
    return pd.concat(tables, ignore_index=True).astype(str)


def tuning_choices() -> pd.DataFrame:
    trials = pd.read_csv(DEMO / "tuning.csv")
    chosen = trials[trials["tuned"]].groupby("group", sort=False)
    rows = [
        [
            group,
            f"{rows['lr'].iloc[0]:g}",
            f"{rows['val_average'].mean():.2f}",
            str(len(trials[trials["group"] == group])),
        ]
        for group, rows in chosen
    ]
    return pd.DataFrame(rows, columns=["optimizer:loss", "lr", "validation Average", "trials"])


def grid_block(df: pd.DataFrame) -> list[str]:
    protocol = study_conclusions.protocols_in(df)[-1]
    grid = average_grid(df[df["protocol"] == protocol]).loc[list(ORIGINAL_OPTIMIZERS), list(ORIGINAL_LOSSES)]
    table = pd.DataFrame(
        [[OPTIMIZER_NAMES[o], *(f"{v:.2f}" for v in row)] for o, row in grid.iterrows()],
        columns=["Optimizer", *(LOSS_NAMES[loss] for loss in ORIGINAL_LOSSES)],
    )
    return markdown(table)


def long_run_block() -> list[str]:
    """``make demo-long`` (4x the steps at the shared rate) against the study's shared cells on the same seeds:
    test Averages, the paired difference and its verdict, and the long runs' weight norm at each evaluation."""
    long, short = read_results(LONG), read_results()
    short = short[(short["protocol"] == "shared") & short["seed"].isin(long["seed"])]
    effect = verdicts.length_effect(long, short)
    norms = pd.read_csv(LONG / "trajectory.csv").sort_values(["optimizer", "loss", "step"], key=order_key)
    means = {
        which: df[df["status"] == "completed"].groupby(["optimizer", "loss"])["average"].mean()
        for which, df in (("short", short), ("long", long))
    }
    rows = []
    for (optimizer, loss), trajectory in norms.groupby(["optimizer", "loss"], sort=False):
        name = f"{verdicts.name(optimizer)} + {verdicts.name(loss)}"
        row = effect[effect["name"].str.endswith(f"| {name}")].iloc[0]
        rows.append(
            [
                OPTIMIZER_NAMES[optimizer],
                LOSS_NAMES[loss],
                f"{means['short'][(optimizer, loss)]:.2f}",
                f"{means['long'][(optimizer, loss)]:.2f}",
                f"{row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]",
                row["verdict"],
                " / ".join(f"{v:.1f}" for v in trajectory["weight_norm"]),
            ]
        )
    steps = " / ".join(str(s) for s in sorted(set(norms["step"])))
    columns = ["Optimizer", "Method", "Average, short", "Average, long", "long - short [95% CI]", "verdict"]
    return markdown(pd.DataFrame(rows, columns=[*columns, f"weight norm at steps {steps}"]))


def blocks() -> dict[tuple[Path, str], list[str]]:
    """Every computed block of :data:`BLOCKS`: (document, name) -> its lines."""
    df = read_results()
    sentences = study_conclusions.conclusions(df, stated_chance())
    return {
        (README, "answer"): [f"- {line}" for line in verdicts.answer(df)],
        (README, "average-grid"): grid_block(df),
        (RESULTS, "results-table"): markdown(study_tables(df).drop(columns=["Seeds", "Status"])),
        (RESULTS, "conclusions"): [f"- {line}" for line in sentences],
        (RESULTS, "tuning"): markdown(tuning_choices()),
        (RESULTS, "long-run"): long_run_block(),
    }


@pytest.mark.parametrize("where", BLOCKS, ids=lambda key: f"{key[0].name}:{key[1]}")
def test_every_block_is_computed_from_the_committed_data(where):
    path, name = where
    assert between_markers(path, name) == blocks()[where], "regenerate: python tests/test_documents.py --write"


def test_the_committed_report_files_say_the_same():
    df = read_results()
    committed = pd.read_csv(DEMO / "study_table.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(committed, study_tables(df))
    report = (DEMO / "conclusions.md").read_text(encoding="utf-8")
    assert all(line in report for line in study_conclusions.conclusions(df, stated_chance()))


def test_the_stated_chance_line_is_computed():
    chance = stated_chance()
    line = (
        f"Chance: TR@1 {chance['txt_r1']:.2f}, IR@1 {chance['img_r1']:.2f}, "
        f"ACC@1 {chance['zeroshot_top1']:.2f} (Average {chance['average']:.2f})."
    )
    assert line in RESULTS.read_text(encoding="utf-8")
    assert f"(chance {chance['average']:.2f})" in README.read_text(encoding="utf-8")


def write() -> None:
    for (path, name), lines in blocks().items():
        text = path.read_text(encoding="utf-8")
        pattern = re.compile(BLOCK.format(name=name), re.M | re.S)
        found = pattern.search(text)
        assert found, f"{path}: add a <!-- {name}: ... --> ... <!-- /{name} --> block first"
        start, end = found.span(1)
        path.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}: {name} ({len(lines)} lines)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
