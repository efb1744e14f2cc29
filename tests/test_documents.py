"""The documents' results are the committed data's: docs/results.md's table equals ``reports/demo/study_table.csv``,
both equal what :mod:`clipstudy.study.results` computes from ``reports/demo/results.csv``, and every conclusion
sentence, the chance line and Spearman's rho are the report's own output, not typed text; the learning-rate table is
``reports/demo/lr_search.csv``; the README's headline grid and sentences are the same computations."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from clipstudy.study import conclusions as study_conclusions
from clipstudy.study import findings
from clipstudy.study.results import LOSS_NAMES, OPTIMIZER_NAMES, average_grid, study_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
DEMO = ROOT / "reports" / "demo"
# the original study's grid, in table order: the rows and columns of the README's headline grid
ORIGINAL_OPTIMIZERS = ("adamw", "sgd", "adam")
ORIGINAL_LOSSES = ("clip", "sogclr", "cyclip", "vicreg", "onlineclr")


def between_markers(path: Path, name: str) -> list[str]:
    """The lines of ``path`` between ``<!-- name: ... -->`` and ``<!-- /name -->``."""
    text = path.read_text(encoding="utf-8")
    found = re.search(rf"^<!-- {name}:.*?-->\n(.*?)^<!-- /{name} -->$", text, re.M | re.S)
    assert found, f"{path.relative_to(ROOT)}: no <!-- {name}: ... --> ... <!-- /{name} --> block"
    return found.group(1).strip("\n").splitlines()


def markdown_table(lines: list[str]) -> pd.DataFrame:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    assert all(set(cell) <= set("-: ") for cell in rows[1]), "second line of a markdown table is its rule"
    return pd.DataFrame(rows[2:], columns=rows[0])


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    df = pd.read_csv(DEMO / "results.csv")
    df["seed"] = df["seed"].astype("Int64")  # as collect_runs types it
    return df


@pytest.fixture(scope="module")
def demo_chance() -> dict:
    """Chance levels of the benchmark the committed runs were trained on, from the set sizes the results page
    states (the generator may have changed since; chance depends on the retrieval and class counts only)."""
    from clipstudy.core.metrics import chance_levels

    text = RESULTS.read_text(encoding="utf-8")
    found = re.search(r"retrieval on (\d+)\s+images x (\d+) captions,\s+zero-shot on (\d+) classes", text)
    assert found, "docs/results.md: no 'retrieval on N images x K captions, zero-shot on C classes'"
    n_images, captions, n_classes = map(int, found.groups())
    chance = chance_levels([i for i in range(n_images) for _ in range(captions)], n_images, n_classes)
    chance["average"] = (chance["txt_r1"] + chance["img_r1"] + chance["zeroshot_top1"]) / 3
    return chance


@pytest.fixture(scope="module")
def conclusions(results, demo_chance) -> list[str]:
    return study_conclusions.conclusions(results, demo_chance)


def test_results_table_and_study_table_csv_equal_the_report_of_results_csv(results):
    computed = study_table(results).astype(str)
    committed = pd.read_csv(DEMO / "study_table.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(committed, computed)
    shown = markdown_table(between_markers(RESULTS, "results-table"))  # every column but the last two
    pd.testing.assert_frame_equal(shown, computed.drop(columns=["Seeds", "Status"]))


def test_results_conclusions_are_the_reports_sentences(conclusions):
    lines = between_markers(RESULTS, "conclusions")
    assert all(line.startswith("- ") for line in lines), lines
    assert [line[2:] for line in lines] == conclusions
    committed = (DEMO / "conclusions.md").read_text(encoding="utf-8")
    assert all(line in committed for line in conclusions)  # and the committed report says the same


def test_results_chance_and_spearman_lines_are_computed(results, demo_chance):
    text = RESULTS.read_text(encoding="utf-8")
    chance_line = (
        f"Chance: TR@1 {demo_chance['txt_r1']:.2f}, IR@1 {demo_chance['img_r1']:.2f}, "
        f"ACC@1 {demo_chance['zeroshot_top1']:.2f} (Average {demo_chance['average']:.2f})."
    )
    assert chance_line in text
    rho = findings.spearman_vs_published(results)
    found = re.search(
        r"published\s+paper-scale ranking \(`clipstudy.study.findings.spearman_vs_published`\): (-?\d+\.\d\d)\.", text
    )
    assert found and found.group(1) == f"{rho['rho']:.2f}" and rho["n_cells"] == 15


def test_results_lr_search_table_is_lr_search_csv():
    committed = pd.read_csv(DEMO / "lr_search.csv")
    shown = markdown_table(between_markers(RESULTS, "lr-search"))
    best = committed["mean"].idxmax()
    expected = pd.DataFrame(
        [
            [f"{row.lr:.0e}".replace("e-0", "e-"), *(f"{row[c]:.2f}" for c in ("adamw", "sgd", "adam", "mean"))]
            for _, row in committed.iterrows()
        ],
        columns=["lr", "AdamW", "SGD", "Adam", "mean"],
    )
    for column in ("lr", "mean"):  # the winning rate and its mean are in bold
        expected.loc[best, column] = f"**{expected.loc[best, column]}**"
    pd.testing.assert_frame_equal(shown, expected)


def test_readme_headline_grid_is_the_average_grid_of_results_csv(results):
    grid = average_grid(results).loc[list(ORIGINAL_OPTIMIZERS), list(ORIGINAL_LOSSES)]
    expected = pd.DataFrame(
        [[OPTIMIZER_NAMES[o], *(f"{v:.2f}" for v in row)] for o, row in grid.iterrows()],
        columns=["Optimizer", *(LOSS_NAMES[loss] for loss in ORIGINAL_LOSSES)],
    )
    pd.testing.assert_frame_equal(markdown_table(between_markers(README, "average-grid")), expected)


def test_readme_headline_sentences_are_the_reports(conclusions, demo_chance):
    lines = between_markers(README, "headline")
    assert lines and all(line.startswith("- ") for line in lines), lines
    assert [line[2:] for line in lines if line[2:] not in conclusions] == []
    assert f"(chance {demo_chance['average']:.2f})" in README.read_text(encoding="utf-8")
