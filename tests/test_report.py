"""The analysis notebook and report functions on fixture run directories (no training)."""
import json
from pathlib import Path

import pandas as pd
import pytest

from clipstudy import report

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
        m = {"status": status, "optimizer": opt, "loss": loss, "seed": seed, "wall_time_s": 10.0 + seed,
             "train_samples_per_s": 100.0, "peak_memory_mb": 500.0}
        if status == "completed":
            m.update(txt_r1=tr, img_r1=ir, zeroshot_top1=acc, average=(tr + ir + acc) / 3)
            (d / "history.csv").write_text("step,loss,lr\n1,4.0,0.001\n2,3.5,0.001\n")
            (d / "epochs.csv").write_text(f"epoch,step,txt_r1,img_r1,zeroshot_top1,average\n1,2,{tr},{ir},{acc},{(tr+ir+acc)/3}\n")
        elif status == "diverged":
            m.update(diverged_at_step=7)
        else:
            m.update(error="DataError: /data/coco.json is not valid JSON")
        (d / "metrics.json").write_text(json.dumps(m))


def test_tables_and_conclusions(tmp_path):
    write_fixture_runs(tmp_path)
    df = report.collect_runs(tmp_path)
    assert len(df) == len(FIXTURE)
    table = report.study_table(df).set_index(["Optimizer", "Method"])
    # mean ± sample std over the two seeds, by hand: TR (10, 12) -> 11.00 ± 1.41
    assert table.loc[("AdamW", "CLIP"), "TR@1"] == "11.00 ± 1.41"
    assert table.loc[("AdamW", "SogCLR"), "Average"] == f"{((14+11+26)/3 + (13+12+24)/3)/2:.2f} ± " \
        f"{pd.Series([(14+11+26)/3, (13+12+24)/3]).std():.2f}"
    assert table.loc[("SGD", "CLIP"), "TR@1"] == "9.00" and table.loc[("SGD", "CLIP"), "Status"] == "1 diverged"
    assert table.loc[("SGD", "SogCLR"), "Average"] == "–" and table.loc[("SGD", "SogCLR"), "Status"] == "2 failed"
    lines = report.conclusions(df)
    assert lines[0].startswith("Best cell: AdamW + SogCLR")
    assert any("diverged" in line and "sgd-clip-s1 at step 7" in line for line in lines)
    assert any("failed" in line and "sgd-sogclr-s0" in line for line in lines)
    assert any("AdamW is best for 2 of 2 losses" in line for line in lines)


def test_spearman_against_published(tmp_path):
    # Runs whose averages are the published ones reversed give rho = -1; the same order gives +1.
    pub = report.published_table()
    for sign, name in ((1, "same"), (-1, "reversed")):
        root = tmp_path / name
        for r in pub.itertuples():
            d = root / f"{r.optimizer}-{r.loss}-s0"
            d.mkdir(parents=True)
            avg = sign * r.average
            (d / "metrics.json").write_text(json.dumps({"status": "completed", "optimizer": r.optimizer,
                                                        "loss": r.loss, "seed": 0, "txt_r1": avg, "img_r1": avg,
                                                        "zeroshot_top1": avg, "average": avg}))
        rho = report.spearman_vs_published(report.collect_runs(root))
        assert rho["n_cells"] == 15
        assert rho["rho"] == pytest.approx(sign * 1.0)


def test_analysis_notebook_renders_report(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_fixture_runs(runs)
    html = report.render("demo", runs, out)
    results = pd.read_csv(out / "results.csv")
    assert {"optimizer", "loss", "seed", "txt_r1", "img_r1", "zeroshot_top1", "average", "status"} <= set(results.columns)
    fixture = {(o, l, s): (st, tr) for o, l, s, st, tr, _, _ in FIXTURE}
    for row in results.itertuples():
        status, tr = fixture[(row.optimizer, row.loss, row.seed)]
        assert row.status == status
        if tr is not None:
            assert row.txt_r1 == tr
    study = pd.read_csv(out / "study_table.csv")
    assert study.set_index(["Optimizer", "Method"]).loc[("AdamW", "CLIP"), "IR@1"] == "9.00 ± 1.41"
    text = html.read_text()
    assert "11.00 ± 1.41" in text and "diverged" in text and "failed" in text
    assert "Best cell: AdamW + SogCLR" in text
    assert "def " not in text and "import " not in text  # code hidden


def test_conclusions_against_chance(tmp_path):
    write_fixture_runs(tmp_path)
    df = report.collect_runs(tmp_path)
    # chance Average = (1 + 1 + 10) / 3 = 4; cell means: AdamW+CLIP 13.83, AdamW+SogCLR 16.67, SGD+CLIP 10.33,
    # Adam+CLIP 3.33 -> three cells above 2 x 4 = 8, Adam+CLIP below chance
    lines = report.conclusions(df, {"txt_r1": 1.0, "img_r1": 1.0, "zeroshot_top1": 10.0})
    assert "3 of 4 cells reach more than twice the chance Average (4.00)." in lines
    below = [line for line in lines if line.startswith("Below chance")]
    assert len(below) == 1 and below[0].endswith("Adam + CLIP.")


def test_conclusions_compare_variants_with_their_base_optimizer(tmp_path):
    write_fixture_runs(tmp_path)
    extra = [("adam-nol2", "clip", 0, 6.0, 6.0, 9.0), ("sgd-lr0.05", "clip", 0, 3.0, 3.0, 3.0)]
    for opt, loss, seed, tr, ir, acc in extra:
        d = tmp_path / f"{opt}-{loss}-s{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "status": "completed", "optimizer": opt, "loss": loss, "seed": seed,
            "txt_r1": tr, "img_r1": ir, "zeroshot_top1": acc, "average": (tr + ir + acc) / 3}))
    lines = report.conclusions(report.collect_runs(tmp_path))
    # by hand: Adam+CLIP (3+3+4)/3 = 3.33, Adam (no L2) 7.00; SGD: only SGD+CLIP s0 completed, 31/3 = 10.33
    assert ("Adam with its L2 penalty averages 3.33; without it 7.00: dropping the L2 term helps." in lines)
    assert ("SGD (lr 0.05, clip 1) averages 3.00 over losses against 10.33 for SGD with its defaults: "
            "the variant does not help." in lines)
    # with a chance Average of 6 both stay within 2 x 6 = 12: neither learns
    lines = report.conclusions(report.collect_runs(tmp_path), {"txt_r1": 6.0, "img_r1": 6.0, "zeroshot_top1": 6.0})
    assert ("SGD (lr 0.05, clip 1) averages 3.00 over losses against 10.33 for SGD with its defaults: "
            "neither learns (both within twice the chance Average, 6.00)." in lines)


def test_chance_levels_come_from_the_data_of_real_runs(demo_data_dir, tmp_path):
    """chance_levels_for reads a real run's config.json, finds its evaluation sets and gives the chance levels
    the data generator computed independently (and 100 / n by hand)."""
    from clipstudy.config import make_config
    from clipstudy.train import train
    from conftest import TINY_DEMO

    runs = tmp_path / "runs"
    (runs / "aaa-from-elsewhere").mkdir(parents=True)  # a run whose data is not on this machine: skipped
    (runs / "aaa-from-elsewhere" / "config.json").write_text(json.dumps({"config": {
        "profile": "smoke", "data": str(tmp_path / "not-here")}}))
    train(make_config("smoke", data=str(demo_data_dir), out=str(runs / "adamw-clip-s0"), max_steps=1, threads=1),
          progress=False)
    chance = report.chance_levels_for(runs)
    manifest = json.loads((demo_data_dir / "manifest.json").read_text())["chance"]
    for key in ("txt_r1", "img_r1", "zeroshot_top1", "zeroshot_top5"):
        assert chance[key] == pytest.approx(manifest[key]), key
    assert chance["img_r1"] == pytest.approx(100 / TINY_DEMO["retrieval_size"])
    assert chance["zeroshot_top1"] == pytest.approx(100 / TINY_DEMO["zeroshot_classes"])
    assert report.chance_levels_for(tmp_path / "no-runs") == {}
