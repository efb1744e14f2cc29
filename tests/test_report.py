"""The analysis notebook and report functions on fixture run directories (no training)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from clipstudy.study import conclusions, findings, report, results

# optimizer, loss, seed, status, TR@1, IR@1, ACC@1
FIXTURE = [
    ("adamw", "clip", 0, "completed", 10.0, 8.0, 20.0),
    ("adamw", "clip", 1, "completed", 12.0, 10.0, 23.0),
    ("adamw", "sogclr", 0, "completed", 14.0, 11.0, 26.0),
    ("adamw", "sogclr", 1, "completed", 13.0, 12.0, 24.0),
    ("sgd", "clip", 0, "completed", 9.0, 7.0, 15.0),
    ("sgd", "clip", 1, "diverged", None, None, None),
    ("sgd", "sogclr", 0, "failed", None, None, None),
    ("sgd", "sogclr", 1, "failed", None, None, None),
    ("adam", "clip", 0, "completed", 3.0, 3.0, 4.0),
]


def write_fixture_runs(root: Path):
    for opt, loss, seed, status, tr, ir, acc in FIXTURE:
        d = root / f"{opt}-{loss}-s{seed}"
        d.mkdir(parents=True)
        m = {
            "status": status,
            "optimizer": opt,
            "loss": loss,
            "seed": seed,
            "wall_time_s": 10.0 + seed,
            "train_samples_per_s": 100.0,
            "peak_memory_mb": 500.0,
        }
        if status == "completed":
            m.update(txt_r1=tr, img_r1=ir, zeroshot_top1=acc, average=(tr + ir + acc) / 3)
            (d / "history.csv").write_text("step,loss,lr\n1,4.0,0.001\n2,3.5,0.001\n")
            (d / "epochs.csv").write_text(
                f"epoch,step,txt_r1,img_r1,zeroshot_top1,average\n1,2,{tr},{ir},{acc},{(tr + ir + acc) / 3}\n"
            )
        elif status == "diverged":
            m.update(diverged_at_step=7)
        else:
            m.update(error="DataError: /data/coco.json is not valid JSON")
        (d / "metrics.json").write_text(json.dumps(m))


def test_tables_and_conclusions(tmp_path):
    write_fixture_runs(tmp_path)
    df = results.collect_runs(tmp_path)
    assert len(df) == len(FIXTURE)
    table = results.study_table(df).set_index(["Optimizer", "Method"])
    # mean ± sample std over the two seeds, by hand: TR (10, 12) -> 11.00 ± 1.41
    assert table.loc[("AdamW", "CLIP"), "TR@1"] == "11.00 ± 1.41"
    assert (
        table.loc[("AdamW", "SogCLR"), "Average"] == f"{((14 + 11 + 26) / 3 + (13 + 12 + 24) / 3) / 2:.2f} ± "
        f"{pd.Series([(14 + 11 + 26) / 3, (13 + 12 + 24) / 3]).std():.2f}"
    )
    assert table.loc[("SGD", "CLIP"), "TR@1"] == "9.00" and table.loc[("SGD", "CLIP"), "Status"] == "1 diverged"
    assert table.loc[("SGD", "SogCLR"), "Average"] == "–" and table.loc[("SGD", "SogCLR"), "Status"] == "2 failed"
    lines = conclusions.conclusions(df)
    assert lines[0].startswith("Best cell (highest mean): AdamW + SogCLR")
    assert any("diverged" in line and "sgd-clip-s1 at step 7" in line for line in lines)
    assert any("failed" in line and "sgd-sogclr-s0" in line for line in lines)
    # the paper's findings need the whole 3 x 5 grid (tested in test_paper_findings_*)
    assert any("'AdamW is the best optimizer for every loss': not testable" in line for line in lines)


def test_spearman_against_published(tmp_path):
    # Runs whose averages are the published ones reversed give rho = -1; the same order gives +1.
    pub = findings.published_table()
    for sign, name in ((1, "same"), (-1, "reversed")):
        root = tmp_path / name
        for r in pub.itertuples():
            d = root / f"{r.optimizer}-{r.loss}-s0"
            d.mkdir(parents=True)
            avg = sign * r.average
            (d / "metrics.json").write_text(
                json.dumps(
                    {
                        "status": "completed",
                        "optimizer": r.optimizer,
                        "loss": r.loss,
                        "seed": 0,
                        "txt_r1": avg,
                        "img_r1": avg,
                        "zeroshot_top1": avg,
                        "average": avg,
                    }
                )
            )
        rho = findings.spearman_vs_published(results.collect_runs(root))
        assert rho["n_cells"] == 15
        assert rho["rho"] == pytest.approx(sign * 1.0)


def test_runs_without_a_lock_digest_are_explained_not_just_listed(tmp_path):
    """The committed demo runs predate the lock digest: the report says why they have none, and the fix."""
    for seed, lock in enumerate((None, None, "a" * 64)):
        run = tmp_path / f"adamw-clip-s{seed}"
        run.mkdir()
        versions = {"python": "3.11.7", "torch": "2.14.1", "lock_sha256": lock}
        (run / "config.json").write_text(json.dumps({"config": {}, "versions": versions}))
    notes = report.environment_notes(report.environment_table(tmp_path))
    assert notes[-1].startswith("2 of the 3 runs recorded no lock file: config.json holds the lock's digest since")
    assert notes[-1].endswith("a rerun records it.")
    (tmp_path / "adamw-clip-s2" / "config.json").unlink()  # now every run lacks it
    assert report.environment_notes(report.environment_table(tmp_path))[-1].startswith("All of the 2 runs")


def test_analysis_notebook_renders_report(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_fixture_runs(runs)
    html = report.render("demo", runs, out)
    results = pd.read_csv(out / "results.csv")
    assert {"optimizer", "loss", "seed", "txt_r1", "img_r1", "zeroshot_top1", "average", "status"} <= set(
        results.columns
    )
    fixture = {(o, loss, s): (st, tr) for o, loss, s, st, tr, _, _ in FIXTURE}
    for row in results.itertuples():
        status, tr = fixture[(row.optimizer, row.loss, row.seed)]
        assert row.status == status
        if tr is not None:
            assert row.txt_r1 == tr
    study = pd.read_csv(out / "study_table.csv")
    assert study.set_index(["Optimizer", "Method"]).loc[("AdamW", "CLIP"), "IR@1"] == "9.00 ± 1.41"
    text = html.read_text()
    assert "11.00 ± 1.41" in text and "diverged" in text and "failed" in text
    assert "Best cell (highest mean): AdamW + SogCLR" in text and "## Answer" not in text and "Answer" in text
    assert "def " not in text and "import " not in text  # code hidden


def test_conclusions_against_chance(tmp_path):
    write_fixture_runs(tmp_path)
    df = results.collect_runs(tmp_path)
    # chance Average = (1 + 1 + 10) / 3 = 4; cell means: AdamW+CLIP 13.83, AdamW+SogCLR 16.67, SGD+CLIP 10.33,
    # Adam+CLIP 3.33 -> three cells above 2 x 4 = 8, Adam+CLIP below chance
    lines = conclusions.conclusions(df, {"txt_r1": 1.0, "img_r1": 1.0, "zeroshot_top1": 10.0})
    assert "3 of 4 cells reach more than twice the chance Average (4.00)." in lines
    below = [line for line in lines if line.startswith("Below chance")]
    assert below == ["Below chance: Adam + CLIP."]


def test_conclusions_compare_variants_with_their_base_optimizer(tmp_path):
    """The optimizer a variant modifies comes from its runs (base_optimizer), not from its name; the comparison
    is paired over seeds, with its interval and verdict."""

    def run(opt, base, seed, average):
        d = tmp_path / f"{opt}-clip-s{seed}"
        d.mkdir()
        fields = {"status": "completed", "optimizer": opt, "loss": "clip", "seed": seed, "average": average}
        fields.update(dict.fromkeys(("txt_r1", "img_r1", "zeroshot_top1"), average))
        if base:
            fields["base_optimizer"] = base
        (d / "metrics.json").write_text(json.dumps(fields))

    for seed, (adam, nol2, sgd, hot) in enumerate([(10, 20, 10, 10.5), (12, 23, 11, 11.6), (14, 24, 12, 12.4)]):
        run("adam", "adam", seed, adam)
        run("adam-nol2", "adam", seed, nol2)
        run("sgd", "sgd", seed, sgd)
        run("hot", "sgd", seed, hot)
    lines = conclusions.conclusions(results.collect_runs(tmp_path))
    # by hand: differences 10, 11, 10 -> mean 10.333, sd 0.5774, se 0.3333, t(0.975, 2) = 4.3027: +-1.434
    expected = "Adam (no L2) against Adam (mean over 1 losses, 3 seeds): +10.33 [+8.90, +11.77], better"
    assert any(line.startswith(expected) for line in lines), lines
    # differences 0.5, 0.6, 0.4: an interval above 0, but the whole gap is inside the 2.07-point machine spread
    hot = next(line for line in lines if line.startswith("hot against SGD"))
    assert "+0.50 [" in hot and "not distinguishable" in hot and "2.07-point machine spread" in hot
    # a variant whose runs do not say what it modifies is not compared with anything
    for seed in range(3):
        record = json.loads((tmp_path / f"hot-clip-s{seed}" / "metrics.json").read_text())
        del record["base_optimizer"]
        (tmp_path / f"hot-clip-s{seed}" / "metrics.json").write_text(json.dumps(record))
    assert not any(line.startswith("hot against") for line in conclusions.conclusions(results.collect_runs(tmp_path)))


def test_logs_are_loaded_and_tagged_per_run(tmp_path):
    write_fixture_runs(tmp_path)
    (tmp_path / "adam-clip-s0" / "epochs.csv").write_text(",".join(("epoch", "step", "txt_r1")) + "\n")  # header only
    df = results.collect_runs(tmp_path)
    history = results.load_logs(df, "history.csv")
    completed = [(o, loss, s) for o, loss, s, st, *_ in FIXTURE if st == "completed"]
    assert len(history) == 2 * len(completed)  # two rows per completed fixture run
    assert sorted(set(zip(history["optimizer"], history["loss_name"], history["seed"]))) == sorted(completed)
    assert list(history["loss"][:2]) == [4.0, 3.5]  # the history's own loss column is kept
    epochs = results.load_logs(df, "epochs.csv")
    assert len(epochs) == len(completed) - 1  # adam-clip-s0's file holds a header only
    row = epochs[(epochs["optimizer"] == "adamw") & (epochs["loss_name"] == "clip") & (epochs["seed"] == 1)]
    assert row["txt_r1"].tolist() == [12.0]
    assert results.load_logs(df.iloc[0:0], "epochs.csv").empty
    with pytest.raises(ValueError, match="history.csv or epochs.csv"):
        results.load_logs(df, "metrics.json")


def test_one_seed_shows_no_spread(tmp_path):
    write_fixture_runs(tmp_path)
    one_seed = results.collect_runs(tmp_path).query("seed == 0")
    assert "average_std" not in findings.with_published(one_seed).columns
    assert "nan" not in results.study_table(one_seed).to_string().lower()
    assert "average_std" in findings.with_published(results.collect_runs(tmp_path)).columns


def test_collapse_comes_from_the_diagnostics_not_the_scores(tmp_path):
    write_fixture_runs(tmp_path)
    cosines = {
        "adam-clip-s0": (0.99, 0.40),
        "adamw-clip-s0": (0.10, 0.20),
        "adamw-clip-s1": (0.12, 0.18),
        "sgd-clip-s0": (0.30, 0.97),
    }
    for run, (image_cos, text_cos) in cosines.items():
        path = tmp_path / run / "metrics.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "image_cos_mean_end": image_cos, "text_cos_mean_end": text_cos})
        )
    lines = conclusions.conclusions(
        results.collect_runs(tmp_path), {"txt_r1": 1.0, "img_r1": 1.0, "zeroshot_top1": 10.0}
    )
    # Adam + CLIP is below chance and collapsed; SGD + CLIP learned (10.33 > 8) yet its text embeddings collapsed
    assert "Below chance: Adam + CLIP." in lines
    collapsed = [line for line in lines if line.startswith("Cells whose embeddings end collapsed")]
    assert len(collapsed) == 1 and "SGD + CLIP (image 0.30, text 0.97)" in collapsed[0]
    assert "Adam + CLIP (image 0.99, text 0.40)" in collapsed[0] and "AdamW" not in collapsed[0]
    # without diagnostics, nothing is called collapsed
    bare = results.collect_runs(tmp_path).assign(image_cos_mean_end=float("nan"), text_cos_mean_end=float("nan"))
    lines = conclusions.conclusions(bare, {"txt_r1": 1.0, "img_r1": 1.0, "zeroshot_top1": 10.0})
    assert "Below chance: Adam + CLIP." in lines
    assert not any("collapsed" in line for line in lines if not line.startswith("No collapse diagnostics"))


def write_grid_runs(root: Path, averages: dict, extra=None):
    """One completed seed-0 run per (optimizer, loss) with every metric equal to the given Average."""
    for (opt, loss), avg in averages.items():
        d = root / f"{opt}-{loss}-s0"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "optimizer": opt,
                    "loss": loss,
                    "seed": 0,
                    "txt_r1": avg,
                    "img_r1": avg,
                    "zeroshot_top1": avg,
                    "average": avg,
                    **(extra or {}).get((opt, loss), {}),
                }
            )
        )


def test_spearman_per_optimizer_row_against_a_hand_computation(tmp_path):
    pub = findings.published_table()
    # AdamW row: the published order of its five losses, except the two best swapped
    # published AdamW ranks (1 = lowest): vicreg 1, onlineclr 2, clip 3, sogclr 4, cyclip 5
    ours = {"vicreg": 1.0, "onlineclr": 2.0, "clip": 3.0, "sogclr": 5.0, "cyclip": 4.0}
    averages = {("adamw", loss): 50 + v for loss, v in ours.items()}
    # SGD row reversed against the published one; Adam row identical to it
    for r in pub[pub["optimizer"] == "sgd"].itertuples():
        averages[("sgd", r.loss)] = 20 - r.average
    for r in pub[pub["optimizer"] == "adam"].itertuples():
        averages[("adam", r.loss)] = r.average
    write_grid_runs(tmp_path, averages)
    rho = findings.spearman_by_optimizer(results.collect_runs(tmp_path)).set_index("scope")
    # by hand: rank differences d = (0, 0, 0, 1, -1), rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert rho.loc["adamw", "rho"] == pytest.approx(0.9)
    assert rho.loc["sgd", "rho"] == pytest.approx(-1.0)
    assert rho.loc["adam", "rho"] == pytest.approx(1.0)
    assert rho.loc["all", "n_cells"] == 15 and rho.loc["adamw", "n_cells"] == 5


def test_paper_findings_hold_on_the_published_numbers_and_fail_when_broken(tmp_path):
    pub = findings.published_table()
    grid = pub.pivot(index="optimizer", columns="loss", values="average")
    published_verdicts = findings.findings_from_grid(grid)
    assert [f["reproduced"] for f in published_verdicts] == [True, True, True, True]

    def broken(**cells):
        changed = grid.copy()
        for key, value in cells.items():
            opt, loss = key.split("_")
            changed.loc[opt, loss] = value
        return [f["reproduced"] for f in findings.findings_from_grid(changed)], findings.findings_from_grid(changed)

    verdicts, f = broken(sgd_vicreg=3.7)  # SGD beats AdamW (3.60) on VICReg, nothing else changes
    assert verdicts == [False, True, True, True]
    assert f[0]["evidence"] == "AdamW is best for 4 of 5 losses; not for VICReg (best: SGD)"
    verdicts, _ = broken(adamw_clip=16.8)  # CLIP passes SogCLR (16.68) as AdamW's second-best loss
    assert verdicts == [True, False, True, True]
    verdicts, _ = broken(adam_clip=11.4)  # just below SGD's 11.44: Adam still last for CLIP
    assert verdicts == [True, True, True, True]
    verdicts, f = broken(adam_clip=11.5)  # just above it: SGD is last for CLIP
    assert verdicts == [True, True, False, True]
    assert f[2]["evidence"] == "Adam is last for 4 of 5 losses; not for CLIP (last: SGD)"
    # SGD last everywhere: Adam is no longer last and SGD no longer second
    verdicts, f = broken(**{f"sgd_{loss}": 0.01 for loss in grid.columns})
    assert verdicts == [True, True, False, False]
    assert f[3]["evidence"].startswith("mean Average over losses: AdamW 13.07, Adam 1.70, SGD 0.01")
    assert findings.findings_from_grid(grid.drop(columns="vicreg"))[0]["reproduced"] is None


def test_collapse_figures_flag_collapsed_cells(tmp_path):
    pub = findings.published_table()
    averages = {(r.optimizer, r.loss): r.average for r in pub.itertuples()}
    healthy = {
        "image_cos_mean_start": 0.5,
        "image_cos_mean_end": 0.2,
        "text_cos_mean_start": 0.5,
        "text_cos_mean_end": 0.3,
        "weight_norm_start": 27.0,
        "weight_norm_end": 27.0,
    }
    extra = {key: dict(healthy) for key in averages}
    extra[("adam", "sogclr")].update(text_cos_mean_end=0.99, weight_norm_end=3.0)
    write_grid_runs(tmp_path, averages, extra)
    df = results.collect_runs(tmp_path)
    table = report.collapse_table(df).set_index(["optimizer", "loss"])
    assert table.loc[("adam", "sogclr"), "collapsed_seeds"] == 1
    assert table["collapsed_seeds"].sum() == 1
    lines = report.collapse_conclusions(df, chance_avg=1.0)
    assert any(
        line.startswith("Cells whose embeddings end collapsed")
        and "Adam + SogCLR" in line
        and "text 0.99" in line
        and "AdamW" not in line
        for line in lines
    )
    assert any("start collapsed" in line and line.endswith("none.") for line in lines)
    # Adam's mean end norm: (3 + 4 * 27) / 5
    assert any(f"Adam 27.0 -> {(3 + 4 * 27) / 5:.1f}" in line for line in lines)
    assert any(line.startswith("Adam + SogCLR did not learn") for line in lines)
    # relative weakness: SGD + SogCLR (1.81, above twice a chance of 0.5) is below half of AdamW's 16.68;
    # SGD + CLIP (11.44 against 14.81) is not
    lines = report.collapse_conclusions(df, chance_avg=0.5)
    assert any(
        line.startswith("SGD + SogCLR reaches less than half the best Average for SogCLR (1.81 against 16.68)")
        for line in lines
    )
    assert not any(line.startswith("SGD + CLIP") for line in lines)
    sgd = next(line for line in findings.optimizer_conclusions(df) if line.startswith("SGD"))
    assert sgd.endswith("against AdamW: CLIP -3.37, SogCLR -14.87, CyCLIP -5.38, VICReg -1.59, OnlineCLR -12.44.")


def write_step_size_runs(root: Path, averages: dict, first: dict, *, lr=None, grad_clip=None, base=None):
    """Completed runs with healthy embeddings, a history.csv whose gradient norm starts at first[loss] and
    ends ten times lower (no summary in metrics.json, as in runs from before it), and config.json's lr."""
    healthy = {
        "image_cos_mean_start": 0.5,
        "image_cos_mean_end": 0.4,
        "text_cos_mean_start": 0.5,
        "text_cos_mean_end": 0.6,
        "weight_norm_start": 31.0,
        "weight_norm_end": 30.0,
    }
    write_grid_runs(
        root, averages, {key: {**healthy, "base_optimizer": (base or {}).get(key[0], key[0])} for key in averages}
    )
    for opt, loss in averages:
        run = root / f"{opt}-{loss}-s0"
        run.joinpath("history.csv").write_text(
            f"step,loss,grad_norm\n1,0.5,{first[loss]}\n2,0.4,\n3,0.3,{first[loss] / 10}\n"
        )
        config = {"lr": (lr or {}).get((opt, loss), 1e-3), "grad_clip": (grad_clip or {}).get((opt, loss), 0.0)}
        run.joinpath("config.json").write_text(json.dumps({"config": config}))


STEP_GRID = {
    ("adamw", "clip"): 60.0,
    ("adamw", "sogclr"): 62.0,
    ("adamw", "vicreg"): 27.0,
    ("sgd", "clip"): 56.0,
    ("sgd", "sogclr"): 5.0,
    ("sgd", "vicreg"): 6.0,
}
FIRST = {"clip": 60.0, "sogclr": 1.2, "vicreg": 30.0}


def step_lines(root: Path) -> list[str]:
    return [
        line
        for line in report.collapse_conclusions(results.collect_runs(root), chance_avg=0.5)
        if ": its first gradient norm" in line
    ]


def test_a_small_first_gradient_is_named_as_sgds_short_steps(tmp_path):
    # SGD + SogCLR is weak and starts with a gradient 50x smaller than SGD + CLIP's (its best loss);
    # AdamW + SogCLR, with the same first gradient, is the loss's best cell. SGD + VICReg is weak too,
    # but its gradient is only 2x smaller: no step-size line for it.
    write_step_size_runs(tmp_path, STEP_GRID, FIRST)
    df = results.collect_runs(tmp_path)
    sgd_sogclr = df[(df["optimizer"] == "sgd") & (df["loss"] == "sogclr")].iloc[0]
    assert (sgd_sogclr.grad_norm_start, sgd_sogclr.grad_norm_end, sgd_sogclr.lr) == (1.2, 0.12, 1e-3)
    lines = report.collapse_conclusions(df, chance_avg=0.5)
    assert (
        "SGD + SogCLR reaches less than half the best Average for SogCLR (5.00 against 62.00): image cosine "
        "0.50 -> 0.40, text cosine 0.50 -> 0.60, weight norm 31.0 -> 30.0, gradient norm 1.20 -> 0.12."
    ) in lines
    assert step_lines(tmp_path) == [
        "SGD + SogCLR: its first gradient norm (1.20) is 50x smaller than SGD + CLIP's (60.00). SGD's step is the "
        "learning rate times the gradient, so at the same learning rate (0.001, no gradient clipping) its first "
        "steps are about 50x shorter; AdamW + SogCLR, whose step is divided by a running gradient scale, reaches "
        "62.00 at that rate (first gradient norm 1.20)."
    ]
    assert any(line.startswith("SGD + VICReg reaches less than half") for line in lines)
    # a recorded figure wins over the history
    record = json.loads((tmp_path / "sgd-sogclr-s0" / "metrics.json").read_text())
    record.update(grad_norm_start=2.0, grad_norm_end=1.0)
    (tmp_path / "sgd-sogclr-s0" / "metrics.json").write_text(json.dumps(record))
    df = results.collect_runs(tmp_path)
    assert df[(df["optimizer"] == "sgd") & (df["loss"] == "sogclr")].iloc[0].grad_norm_start == 2.0


@pytest.mark.parametrize("case", ["other lr", "clipping", "reference clipped"])
def test_no_step_size_line_unless_both_cells_ran_at_one_rate_without_clipping(tmp_path, case):
    lr = {("sgd", "sogclr"): 5e-2} if case == "other lr" else None
    clip = {("sgd", "sogclr" if case == "clipping" else "clip"): 1.0} if case != "other lr" else None
    write_step_size_runs(tmp_path, STEP_GRID, FIRST, lr=lr, grad_clip=clip)
    assert step_lines(tmp_path) == []


def test_the_comparison_is_an_adam_type_cell_of_the_same_start_and_rate(tmp_path):
    # the loss's best cell is an SGD variant at a higher rate: not what "divided by a gradient scale" may name;
    # AdamW (scratch) is better still but starts from other weights; AdamW at another rate is left out too
    grid = {
        **STEP_GRID,
        ("sgd-hi", "sogclr"): 70.0,
        ("sgd-hi", "clip"): 50.0,
        ("adamw-scratch", "sogclr"): 80.0,
        ("adamw-scratch", "clip"): 10.0,
        ("adam", "sogclr"): 61.0,
        ("adam", "clip"): 59.0,
    }
    write_step_size_runs(
        tmp_path,
        grid,
        FIRST,
        lr={("sgd-hi", "sogclr"): 0.1, ("sgd-hi", "clip"): 0.1, ("adamw", "sogclr"): 2e-3},
        base={"sgd-hi": "sgd", "adamw-scratch": "adamw"},
    )
    (line,) = [line for line in step_lines(tmp_path) if line.startswith("SGD + SogCLR")]
    assert line.endswith(
        "; Adam + SogCLR, whose step is divided by a running gradient scale, reaches 61.00 at that "
        "rate (first gradient norm 1.20)."
    )


def test_without_an_adam_type_cell_the_step_size_line_names_no_comparison(tmp_path):
    grid = {("sgd", "clip"): 56.0, ("sgd", "sogclr"): 0.9, ("adamw", "clip"): 0.8, ("adamw", "sogclr"): float("nan")}
    write_step_size_runs(tmp_path, {k: v for k, v in grid.items() if v == v}, FIRST)
    assert step_lines(tmp_path) == [
        "SGD + SogCLR: its first gradient norm (1.20) is 50x smaller than SGD + CLIP's (60.00). SGD's step is the "
        "learning rate times the gradient, so at the same learning rate (0.001, no gradient clipping) its first "
        "steps are about 50x shorter."
    ]


def test_chance_levels_come_from_the_data_of_real_runs(demo_data_dir, tmp_path):
    """chance_levels_for reads a real run's config.json, finds its evaluation sets and gives the chance levels
    the data generator computed independently (and 100 / n by hand)."""
    from conftest import TINY_DEMO

    from clipstudy.engine.config import make_config
    from clipstudy.engine.train import train

    runs = tmp_path / "runs"
    (runs / "aaa-from-elsewhere").mkdir(parents=True)  # a run whose data is not on this machine: skipped
    (runs / "aaa-from-elsewhere" / "config.json").write_text(
        json.dumps({"config": {"profile": "smoke", "data": str(tmp_path / "not-here")}})
    )
    train(
        make_config("smoke", data=str(demo_data_dir), out=str(runs / "adamw-clip-s0"), max_steps=1, threads=1),
        progress=False,
    )
    chance = report.chance_levels_for(runs)
    manifest = json.loads((demo_data_dir / "manifest.json").read_text())["chance"]
    for key in ("txt_r1", "img_r1", "zeroshot_top1", "zeroshot_top5"):
        assert chance[key] == pytest.approx(manifest[key]), key
    assert chance["img_r1"] == pytest.approx(100 / TINY_DEMO["retrieval_size"])
    assert chance["zeroshot_top1"] == pytest.approx(100 / TINY_DEMO["zeroshot_classes"])
    assert report.chance_levels_for(tmp_path / "no-runs") == {}


def test_the_weight_norm_trajectory_sits_beside_the_validation_scores(tmp_path):
    """Per cell and evaluation: mean over seeds of val_average and of the weight norm logged at or before that
    step; step 0 is the initial norm; a failed run counts nowhere."""
    runs = {  # run: (status, weight_norm_start, history (step, weight_norm), epochs (epoch, step, val_average))
        "adam-clip-s0": ("completed", 30.0, [(1, 29.0), (2, 28.0), (3, 20.0), (4, 18.0)], [(1, 2, 40.0), (2, 4, 30.0)]),
        "adam-clip-s1": ("completed", 32.0, [(1, 31.0), (2, 26.0), (3, 22.0), (4, 14.0)], [(1, 2, 44.0), (2, 4, 20.0)]),
        "adamw-clip-s0": ("completed", 30.0, [(2, 30.5), (4, 31.0)], [(1, 3, 50.0), (2, 5, 55.0)]),
        "adam-clip-s2": ("failed", 99.0, [(1, 99.0)], [(1, 2, 99.0)]),
    }
    for name, (status, start, history, epochs) in runs.items():
        opt, loss, seed = name.split("-")
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(
            json.dumps(
                {"status": status, "optimizer": opt, "loss": loss, "seed": int(seed[1:]), "weight_norm_start": start}
            )
        )
        (d / "history.csv").write_text("step,loss,weight_norm\n" + "".join(f"{s},1.0,{w}\n" for s, w in history))
        (d / "epochs.csv").write_text("epoch,step,val_average\n" + "".join(f"{e},{s},{v}\n" for e, s, v in epochs))
    table = report.trajectory_table(results.collect_runs(tmp_path))
    rows = [
        tuple(r) for r in table[["optimizer", "loss", "epoch", "step", "weight_norm", "seeds"]].itertuples(index=False)
    ]
    assert rows == [
        ("adamw", "clip", 0, 0, 30.0, 1),
        ("adamw", "clip", 1, 3, 30.5, 1),  # no row at step 3: the last logged at or before it (step 2)
        ("adamw", "clip", 2, 5, 31.0, 1),
        ("adam", "clip", 0, 0, 31.0, 2),  # (30 + 32) / 2
        ("adam", "clip", 1, 2, 27.0, 2),  # (28 + 26) / 2
        ("adam", "clip", 2, 4, 16.0, 2),  # (18 + 14) / 2
    ]
    assert table["val_average"].isna().tolist() == [True, False, False, True, False, False]
    assert table["val_average"].dropna().tolist() == [50.0, 55.0, 42.0, 25.0]
    # runs without evaluations give an empty table with the columns
    for d in tmp_path.iterdir():
        (d / "epochs.csv").write_text("epoch,step,val_average\n")
    assert report.trajectory_table(results.collect_runs(tmp_path)).empty
