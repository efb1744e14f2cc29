"""The README's results are the committed data's: its table equals ``reports/demo/study_table.csv``, both equal
what :mod:`clipstudy.study.report` computes from ``reports/demo/results.csv``, and every conclusion sentence, the
chance line and Spearman's rho are the report's own output, not typed text."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from clipstudy.study import findings, report
from clipstudy.study.results import study_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO = ROOT / "reports" / "demo"


def between_markers(name: str) -> list[str]:
    """The lines of README.md between ``<!-- name: ... -->`` and ``<!-- /name -->``."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"^<!-- {name}:.*?-->\n(.*?)^<!-- /{name} -->$", text, re.M | re.S)
    assert found, f"README.md: no <!-- {name}: ... --> ... <!-- /{name} --> block"
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
def demo_chance(tmp_path_factory) -> dict:
    """Chance levels of the default demo benchmark, from its generator (they depend on the retrieval and class
    counts only, so a set with few, tiny training images has the same)."""
    from clipstudy.data.demo import make_demo_data

    manifest = make_demo_data(tmp_path_factory.mktemp("demo_chance"), image_size=8, train_size=16, zeroshot_per_class=1)
    return manifest["chance"]


def test_readme_table_and_study_table_csv_equal_the_report_of_results_csv(results):
    computed = study_table(results).astype(str)
    committed = pd.read_csv(DEMO / "study_table.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(committed, computed)
    readme = markdown_table(between_markers("results-table"))  # the README shows every column but the last two
    pd.testing.assert_frame_equal(readme, computed.drop(columns=["Seeds", "Status"]))


def test_readme_conclusions_are_the_reports_sentences(results, demo_chance):
    lines = between_markers("conclusions")
    assert all(line.startswith("- ") for line in lines), lines
    assert [line[2:] for line in lines] == report.conclusions(results, demo_chance)


def test_readme_chance_and_spearman_lines_are_computed(results, demo_chance):
    text = README.read_text(encoding="utf-8")
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
