"""clipstudy.study.findings on constructed results tables whose answers are worked by hand (no training, no files).

The published Averages (docs/protocol.md), per optimizer, and their means over the five losses:

    AdamW: SogCLR 16.68, CLIP 14.81, CyCLIP 16.90, VICReg 3.60, OnlineCLR 13.37 -> 65.36 / 5 = 13.072
    SGD:   SogCLR 1.81,  CLIP 11.44, CyCLIP 11.52, VICReg 2.01, OnlineCLR 0.93  -> 27.71 / 5 = 5.542
    Adam:  SogCLR 0.14,  CLIP 3.69,  CyCLIP 3.74,  VICReg 0.86, OnlineCLR 0.05  -> 8.48 / 5 = 1.696
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from clipstudy.study import findings

CLAIMS = [
    "AdamW is the best optimizer for every loss",
    "CyCLIP and SogCLR are the best losses (with AdamW)",
    "Adam is poor everywhere (last of the three optimizers for every loss)",
    "SGD is second (mean Average over losses: AdamW > SGD > Adam)",
]


def runs(cells: dict[tuple[str, str], list[float]], status: str = "completed") -> pd.DataFrame:
    """A results table: one completed run per seed of each cell, with the given Averages (every metric alike)."""
    rows = [
        {"optimizer": o, "loss": loss, "seed": s, "status": status, "average": v}
        | dict.fromkeys(("txt_r1", "img_r1", "zeroshot_top1"), v)
        for (o, loss), values in cells.items()
        for s, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def published_grid() -> pd.DataFrame:
    return findings.published_table().pivot(index="optimizer", columns="loss", values="average")


def published_cells(transform=lambda o, loss, v: v) -> dict:
    return {
        (r.optimizer, r.loss): [transform(r.optimizer, r.loss, r.average)]
        for r in findings.published_table().itertuples()
    }


def test_the_published_table_is_the_original_grid():
    pub = findings.published_table()
    assert list(pub.columns) == ["optimizer", "loss", "txt_r1", "img_r1", "zeroshot_top1", "average"]
    assert len(pub) == 15 and set(pub["optimizer"]) == {"adamw", "sgd", "adam"}
    row = pub.set_index(["optimizer", "loss"]).loc[("adamw", "cyclip")]
    assert row.tolist() == [14.10, 10.68, 25.91, 16.90]
    assert pub.set_index(["optimizer", "loss"]).loc[("adam", "onlineclr")].tolist() == [0.02, 0.02, 0.10, 0.05]


def test_with_published_puts_this_studys_mean_beside_each_published_cell():
    df = runs({("adamw", "clip"): [10.0, 14.0], ("sgd", "clip"): [3.0, 5.0], ("lion", "clip"): [1.0, 1.0]})
    table = findings.with_published(df)
    assert list(table.columns) == [
        "optimizer",
        "loss",
        "published_txt_r1",
        "published_img_r1",
        "published_zeroshot_top1",
        "published_average",
        "average_mean",
        "average_std",
    ]
    assert len(table) == 15  # every published cell, run or not; runs outside the grid (lion) left out
    cell = table.set_index(["optimizer", "loss"])
    assert cell.loc[("adamw", "clip"), "average_mean"] == 12.0
    assert cell.loc[("adamw", "clip"), "average_std"] == pytest.approx(math.sqrt(8))  # sample std of 10, 14
    assert cell.loc[("adamw", "clip"), "published_average"] == 14.81
    assert cell.loc[("sgd", "clip"), "average_mean"] == 4.0
    assert math.isnan(cell.loc[("adam", "clip"), "average_mean"])
    # one seed per cell: no spread to show
    single = findings.with_published(runs({("adamw", "clip"): [10.0]}))
    assert "average_std" not in single and single["average_mean"].notna().sum() == 1


def test_spearman_vs_published_against_scipy():
    # this study's cell means: the published Averages with CLIP and SogCLR of AdamW swapped, on two seeds
    cells = published_cells(lambda o, loss, v: {("adamw", "clip"): 16.68, ("adamw", "sogclr"): 14.81}.get((o, loss), v))
    cells = {k: [v[0] - 1, v[0] + 1] for k, v in cells.items()}
    result = findings.spearman_vs_published(runs(cells))
    ours = [np.mean(cells[(r.optimizer, r.loss)]) for r in findings.published_table().itertuples()]
    ref = sps.spearmanr(ours, findings.published_table()["average"])
    assert result == {"rho": pytest.approx(ref.statistic), "p_value": pytest.approx(ref.pvalue), "n_cells": 15}
    assert 0.9 < result["rho"] < 1  # two neighbours swapped out of 15
    # a cell with one seed (no spread) among cells with two still counts: the same ranking
    mixed = {k: [float(np.mean(v))] if k[0] == "sgd" else v for k, v in cells.items()}
    assert findings.spearman_vs_published(runs(mixed)) == result
    # three cells are enough; two are not
    three = {k: cells[k] for k in [("adamw", "clip"), ("sgd", "clip"), ("adam", "clip")]}
    assert findings.spearman_vs_published(runs(three)) == {
        "rho": pytest.approx(1.0),
        "p_value": pytest.approx(0.0),
        "n_cells": 3,
    }
    two = findings.spearman_vs_published(runs(dict(list(three.items())[:2])))
    assert math.isnan(two["rho"]) and math.isnan(two["p_value"]) and two["n_cells"] == 2


def test_spearman_by_optimizer_scopes_and_degenerate_rows():
    # AdamW's row in the published order, SGD's reversed, Adam's constant (no ranking), and the overall ranking
    cells = {}
    for r in findings.published_table().itertuples():
        cells[(r.optimizer, r.loss)] = [{"adamw": r.average, "sgd": 100 - r.average, "adam": 7.0}[r.optimizer]]
    table = findings.spearman_by_optimizer(runs(cells))
    assert table["scope"].tolist() == ["all", "adamw", "sgd", "adam"]
    assert list(table.columns) == ["scope", "rho", "p_value", "n_cells"]
    rows = table.set_index("scope")
    assert rows.loc["adamw", "rho"] == pytest.approx(1.0) and rows.loc["sgd", "rho"] == pytest.approx(-1.0)
    assert math.isnan(rows.loc["adam", "rho"]) and math.isnan(rows.loc["adam", "p_value"])
    assert rows["n_cells"].tolist() == [15, 5, 5, 5]
    pub = findings.published_table()
    ours = [cells[(r.optimizer, r.loss)][0] for r in pub.itertuples()]
    ref = sps.spearmanr(ours, pub["average"])
    assert (rows.loc["all", "rho"], rows.loc["all", "p_value"]) == pytest.approx((ref.statistic, ref.pvalue))
    sgd = pub[pub["optimizer"] == "sgd"]
    assert rows.loc["sgd", "p_value"] == pytest.approx(sps.spearmanr(100 - sgd["average"], sgd["average"]).pvalue)
    # two cells of a row cannot be ranked: NaN, with the count
    two = findings.spearman_by_optimizer(
        runs({("sgd", "clip"): [1.0], ("sgd", "cyclip"): [2.0], ("adamw", "clip"): [3.0]})
    )
    rows = two.set_index("scope")
    assert math.isnan(rows.loc["sgd", "rho"]) and rows.loc["sgd", "n_cells"] == 2
    assert rows.loc["all", "rho"] == pytest.approx(sps.spearmanr([3.0, 1.0, 2.0], [14.81, 11.44, 11.52]).statistic)
    assert rows.loc["adam", "n_cells"] == 0
    # three cells with two distinct means are enough to rank: Adam's CLIP 3.69, CyCLIP 3.74, VICReg 0.86
    three = runs({("adam", "clip"): [1.0], ("adam", "cyclip"): [2.0], ("adam", "vicreg"): [1.0]})
    rows = findings.spearman_by_optimizer(three).set_index("scope")
    ref = sps.spearmanr([1.0, 2.0, 1.0], [3.69, 3.74, 0.86])
    assert (rows.loc["adam", "rho"], rows.loc["adam", "p_value"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert rows.loc["adam", "rho"] == pytest.approx(0.8660254)  # ranks (1.5, 3, 1.5) against (2, 3, 1)
    # cells of one seed (no spread) beside cells of two: every cell counts
    mixed = {k: ([v[0] - 1, v[0] + 1] if k[0] == "adamw" else v) for k, v in cells.items()}
    rows = findings.spearman_by_optimizer(runs(mixed)).set_index("scope")
    assert rows["n_cells"].tolist() == [15, 5, 5, 5] and rows.loc["sgd", "rho"] == pytest.approx(-1.0)


def test_findings_from_the_published_grid_with_their_evidence():
    assert findings.findings_from_grid(published_grid()) == [
        {"finding": CLAIMS[0], "reproduced": True, "evidence": "AdamW is best for 5 of 5 losses"},
        {
            "finding": CLAIMS[1],
            "reproduced": True,
            "evidence": "with AdamW the two best losses are CyCLIP (16.90) and SogCLR (16.68)",
        },
        {"finding": CLAIMS[2], "reproduced": True, "evidence": "Adam is last for 5 of 5 losses"},
        {
            "finding": CLAIMS[3],
            "reproduced": True,
            "evidence": "mean Average over losses: AdamW 13.07, SGD 5.54, Adam 1.70",
        },
    ]


def test_findings_from_a_grid_that_breaks_each_claim():
    grid = published_grid()
    grid.loc["sgd", "clip"] = 20.0  # SGD best for CLIP, Adam best for VICReg
    grid.loc["adam", "vicreg"] = 9.0
    grid.loc["adamw", "onlineclr"] = 17.0  # OnlineCLR AdamW's best loss, CyCLIP second
    grid.loc["sgd", "sogclr"] = 0.01  # SGD last for SogCLR and OnlineCLR
    grid.loc["sgd", "onlineclr"] = 0.0
    result = findings.findings_from_grid(grid)
    assert result[0] == {
        "finding": CLAIMS[0],
        "reproduced": False,
        "evidence": "AdamW is best for 3 of 5 losses; not for CLIP (best: SGD), VICReg (best: Adam)",
    }
    assert result[1] == {
        "finding": CLAIMS[1],
        "reproduced": False,
        "evidence": "with AdamW the two best losses are OnlineCLR (17.00) and CyCLIP (16.90)",
    }
    assert result[2]["finding"] == CLAIMS[2] and result[2]["reproduced"] is False
    # by hand, the last optimizer per loss: SogCLR SGD (0.01), CLIP Adam (3.69), CyCLIP Adam, VICReg SGD (2.01 <
    # AdamW 3.60 < Adam 9), OnlineCLR SGD (0.0)
    assert result[2]["evidence"] == (
        "Adam is last for 2 of 5 losses; not for SogCLR (last: SGD), VICReg (last: SGD), OnlineCLR (last: SGD)"
    )
    # means: AdamW (16.68 + 14.81 + 16.90 + 3.60 + 17) / 5 = 13.798; SGD (0.01 + 20 + 11.52 + 2.01 + 0) / 5 =
    # 6.708; Adam (0.14 + 3.69 + 3.74 + 9 + 0.05) / 5 = 3.324: the order holds
    assert result[3] == {
        "finding": CLAIMS[3],
        "reproduced": True,
        "evidence": "mean Average over losses: AdamW 13.80, SGD 6.71, Adam 3.32",
    }
    grid.loc["adam", :] = 30.0  # Adam first: AdamW > SGD > Adam no longer holds
    assert findings.findings_from_grid(grid)[3]["reproduced"] is False


def test_findings_need_the_whole_grid_and_ignore_what_is_outside_it():
    def untestable(grid):
        return [(f["reproduced"], f["evidence"]) for f in findings.findings_from_grid(grid)] == [
            (None, "not every cell of the 3 x 5 grid completed")
        ] * 4

    grid = published_grid()
    assert untestable(grid.drop(index="adam"))
    assert untestable(grid.drop(columns="onlineclr"))
    with_hole = grid.copy()
    with_hole.loc["sgd", "cyclip"] = np.nan
    assert untestable(with_hole)
    assert [f["finding"] for f in findings.findings_from_grid(with_hole)] == CLAIMS
    # an optimizer and a loss outside the original grid change nothing, even when they would win
    wider = grid.copy()
    wider["siglip"] = 99.0
    wider.loc["lion"] = 99.0
    assert findings.findings_from_grid(wider) == findings.findings_from_grid(grid)


def test_paper_findings_on_runs():
    cells = published_cells(lambda o, loss, v: v + (5.0 if (o, loss) == ("adam", "clip") else 0.0))
    cells = {k: [v[0] - 0.5, v[0] + 0.5] for k, v in cells.items()}  # two seeds: the mean is what counts
    table = findings.paper_findings(runs(cells))
    assert list(table.columns) == ["finding", "reproduced", "evidence"]
    # Adam's CLIP 8.69 is above none of AdamW's 14.81 nor SGD's 11.44: still last; the claims all hold
    assert table["reproduced"].tolist() == [True, True, True, True]
    assert table["evidence"].iloc[3] == "mean Average over losses: AdamW 13.07, SGD 5.54, Adam 2.70"


def test_optimizer_conclusions_by_hand():
    df = runs(
        {
            ("adamw", "clip"): [9.0, 11.0],
            ("adamw", "sogclr"): [20.0],
            ("sgd", "clip"): [8.0],
            ("sgd", "sogclr"): [2.0],
            ("sgd", "vicreg"): [5.0],  # AdamW did not run VICReg: no gap to it
            ("adam", "clip"): [1.0],
        }
    )
    # means over the losses each ran: AdamW (10 + 20) / 2 = 15, SGD (8 + 2 + 5) / 3 = 5, Adam 1
    assert findings.optimizer_conclusions(df) == [
        "AdamW: mean Average over 2 losses 15.00 (rank 1 of 3); best with SogCLR (20.00).",
        "SGD: mean Average over 3 losses 5.00 (rank 2 of 3); best with CLIP (8.00); against AdamW: CLIP -2.00, "
        "SogCLR -18.00.",
        "Adam: mean Average over 1 losses 1.00 (rank 3 of 3); best with CLIP (1.00); against AdamW: CLIP -9.00.",
    ]
    # twice a chance Average of 2.5 is 5: a cell at exactly 5 has not learned
    lines = findings.optimizer_conclusions(df, chance_avg=2.5)
    assert lines[0].endswith("best with SogCLR (20.00); learns (above twice chance) with 2 of 2 losses.")
    assert "; learns (above twice chance) with 1 of 3 losses; against AdamW" in lines[1]
    assert lines[2].endswith("; learns (above twice chance) with 0 of 1 losses; against AdamW: CLIP -9.00.")
    # chance 3: SGD + CLIP (8) is above twice (6), not three times (9)
    assert "; learns (above twice chance) with 1 of 3 losses" in findings.optimizer_conclusions(df, chance_avg=3.0)[1]
    # without AdamW there is nothing to compare with; other optimizers are not the original grid's
    no_adamw = findings.optimizer_conclusions(df[df["optimizer"] != "adamw"])
    assert no_adamw == [
        "SGD: mean Average over 3 losses 5.00 (rank 1 of 2); best with CLIP (8.00).",
        "Adam: mean Average over 1 losses 1.00 (rank 2 of 2); best with CLIP (1.00).",
    ]
    assert findings.optimizer_conclusions(
        pd.concat([df, runs({("lion", "clip"): [50.0]})])
    ) == findings.optimizer_conclusions(df)
    # a loss without a display name is named by its key
    assert findings.optimizer_conclusions(runs({("adamw", "hinge"): [4.0], ("sgd", "hinge"): [6.0]})) == [
        "SGD: mean Average over 1 losses 6.00 (rank 1 of 2); best with hinge (6.00); against AdamW: hinge +2.00.",
        "AdamW: mean Average over 1 losses 4.00 (rank 2 of 2); best with hinge (4.00).",
    ]


def test_initialisation_conclusions_compare_scratch_cells_with_pretrained_ones():
    assert findings.initialisation_conclusions(runs(published_cells())) == []  # no scratch cells
    pretrained = published_cells()
    # from scratch: AdamW and SGD only, every cell at a third of its published Average, AdamW + VICReg 3 points
    # above that (1.2 + 3 = 4.2, still below AdamW + CLIP's 4.94)
    scratch = {
        (f"{o}-scratch", loss): [v[0] / 3 + (3.0 if (o, loss) == ("adamw", "vicreg") else 0.0)]
        for (o, loss), v in pretrained.items()
        if o != "adam"
    }
    lines = findings.initialisation_conclusions(runs(pretrained | scratch))
    adamw = (65.36 / 3 + 3.0) / 5
    sgd = 27.71 / 3 / 5
    assert lines[0] == (
        "From scratch (random towers, otherwise identical): mean Average over losses "
        f"AdamW {adamw:.2f} (pretrained 13.07), SGD {sgd:.2f} (pretrained 5.54)."
    )
    pub = findings.published_table()
    both = pub[pub["optimizer"] != "adam"]
    ours = [scratch[(f"{r.optimizer}-scratch", r.loss)][0] for r in both.itertuples()]
    assert lines[1] == (
        "From scratch, Spearman's rho against the published ranking: "
        f"{sps.spearmanr(ours, both['average']).statistic:.2f} overall."
    )
    # the grid from scratch lacks Adam: each finding is not testable
    assert lines[2:] == [
        f"From scratch, '{claim}': not testable (not every cell of the 3 x 5 grid completed)." for claim in CLAIMS
    ]
    # with Adam from scratch too, each finding is judged on the scratch grid, whose order is the published one
    scratch |= {("adam-scratch", loss): [v[0] / 3] for (o, loss), v in pretrained.items() if o == "adam"}
    lines = findings.initialisation_conclusions(runs(pretrained | scratch))
    assert lines[2:] == [
        f"From scratch, '{CLAIMS[0]}': reproduced (AdamW is best for 5 of 5 losses).",
        f"From scratch, '{CLAIMS[1]}': reproduced (with AdamW the two best losses are CyCLIP (5.63) and SogCLR "
        "(5.56)).",
        f"From scratch, '{CLAIMS[2]}': reproduced (Adam is last for 5 of 5 losses).",
        f"From scratch, '{CLAIMS[3]}': reproduced (mean Average over losses: AdamW {adamw:.2f}, SGD {sgd:.2f}, "
        f"Adam {8.48 / 3 / 5:.2f}).",
    ]
    assert lines[0].endswith(f"Adam {8.48 / 3 / 5:.2f} (pretrained 1.70).")
    # a scratch optimizer without pretrained runs is not compared
    only = {k: v for k, v in pretrained.items() if k[0] != "sgd"} | scratch
    assert "SGD" not in findings.initialisation_conclusions(runs(only))[0]
    # a finding that fails from scratch says so
    broken = scratch | {("sgd-scratch", "clip"): [50.0]}
    assert findings.initialisation_conclusions(runs(pretrained | broken))[2] == (
        f"From scratch, '{CLAIMS[0]}': not reproduced (AdamW is best for 4 of 5 losses; not for CLIP (best: SGD))."
    )
