"""`tune`: equal budgets, bracketing, choices on validation only, and a tuning run that never opens the test sets."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pandas as pd
import pytest

from clipstudy.core.optim import OPTIMIZERS
from clipstudy.engine.config import ConfigError
from clipstudy.study import tune, tuning_table


def test_the_grid_is_the_half_decade_lattice_with_both_ends():
    assert tune.lr_grid(1e-4, 1e-2) == [1e-4, 3.162e-4, 1e-3, 3.162e-3, 1e-2]
    assert tune.lr_grid(1e-3, 1e-1) == [1e-3, 3.162e-3, 1e-2, 3.162e-2, 1e-1]
    assert tune.lr_grid(1e-3, 1e-3) == [1e-3]
    with pytest.raises(ValueError, match="low <= high"):
        tune.lr_grid(1e-2, 1e-3)


def test_extend_steps_past_the_end_where_the_best_is():
    grid = [1e-4, 3.162e-4, 1e-3]
    assert tune.extend(grid, 1e-3) == 3.162e-3  # best at the top: one half-decade higher
    assert tune.extend(grid, 1e-4) == 3.162e-5  # best at the bottom: one lower
    assert tune.extend(grid, 3.162e-4) is None  # inside: bracketed
    assert tune.extend([3.162, 10.0], 10.0) is None  # the upper limit (10) is not passed
    # two extensions land on the lattice again, where other optimizers' grids are
    assert tune.extend([3.162e-3, 1e-2], 1e-2) == 3.162e-2 and tune.extend([3.162e-2], 3.162e-2) == 0.1


def trials(rows):
    columns = ["group", "lr", "weight_decay", "status", "val_average"]
    return pd.DataFrame([dict(zip(columns, row)) for row in rows])


def test_scores_average_over_trials_and_a_broken_trial_disqualifies_its_rate():
    table = trials(
        [
            ("adamw", 1e-3, 0.02, "completed", 50.0),
            ("adamw", 1e-3, 0.02, "completed", 54.0),  # mean 52
            ("adamw", 3.162e-3, 0.02, "completed", 60.0),
            ("adamw", 3.162e-3, 0.02, "diverged", None),  # one diverged seed: -inf
            ("sgd", 1e-3, 0.02, "completed", 40.0),
            ("sgd", 1e-2, 0.02, "completed", 40.0),  # a tie: the smaller rate wins
        ]
    )
    scores = tune.group_scores(table).set_index(["group", "lr"])["score"]
    assert scores[("adamw", 1e-3)] == 52.0 and scores[("adamw", 3.162e-3)] == -math.inf
    best = tune.best_settings(tune.group_scores(table)).set_index("group")["lr"]
    assert best.to_dict() == {"adamw": 1e-3, "sgd": 1e-3}


def test_the_shared_rate_is_the_best_mean_among_rates_every_optimizer_tried():
    table = trials(
        [
            ("adamw", 1e-4, 0.02, "completed", 70.0),  # only adamw tried it: not a candidate
            ("adamw", 1e-3, 0.02, "completed", 60.0),
            ("adamw", 1e-2, 0.02, "completed", 40.0),
            ("sgd", 1e-3, 0.02, "completed", 20.0),  # mean at 1e-3: 40
            ("sgd", 1e-2, 0.02, "completed", 50.0),  # mean at 1e-2: 45
        ]
    )
    assert tune.shared_rate(tune.group_scores(table), ["adamw", "sgd"]) == 1e-2
    assert tune.shared_rate(tune.group_scores(table), ["adamw", "sgd", "adam"]) is None


def fake_sweep(peaks: dict[str, float], calls: list):
    """A stand-in for the sweep: a trial's validation Average peaks at its optimizer's rate in ``peaks``."""

    def run_sweep(cells, jobs=1, progress=True, notebooks=True):
        assert not notebooks  # trials train in worker processes, without the notebook
        calls.append(len(cells))
        out = {}
        for cell in cells:
            distance = abs(math.log10(cell.config.lr) - math.log10(peaks[cell.config.optimizer]))
            out[cell.name] = {"status": "completed", "val_average": 80.0 - 20.0 * distance}
        return out

    return run_sweep


def test_tune_extends_each_grid_until_its_best_is_bracketed_with_equal_base_budgets(monkeypatch, tmp_path):
    from clipstudy.study import sweep

    calls = []
    # adamw peaks inside its grid; sgd one decade above the top of its grid; adam far below its grid
    monkeypatch.setattr(sweep, "run_sweep", fake_sweep({"adamw": 1e-3, "sgd": 1.0, "adam": 1e-7}, calls))
    table, summary = tune.tune(
        "smoke",
        ["adamw", "sgd", "adam"],
        ["clip"],
        overrides={"data": str(tmp_path)},
        runs_root=tmp_path / "runs",
        max_extensions=2,
        progress=False,
    )
    groups = summary["groups"]
    assert {g: row["base_budget"] for g, row in groups.items()} == {"adamw": 5, "sgd": 5, "adam": 5}
    assert groups["adamw"] == {**groups["adamw"], "lr": 1e-3, "trials": 5, "bracketed": True}
    # sgd: 0.1 was the top; two extensions reach 1.0, the peak, still at the top edge: not bracketed, said so
    assert groups["sgd"]["trials"] == 7 and groups["sgd"]["lr"] == 1.0 and not groups["sgd"]["bracketed"]
    assert groups["adam"]["trials"] == 7 and groups["adam"]["lr"] == 1e-5 and not groups["adam"]["bracketed"]
    assert calls == [15, 17, 19]  # every round replans every trial; finished ones cost nothing (cached runs)
    assert table.loc[table["tuned"], "lr"].tolist() == [1e-3, 1.0, 1e-5]
    # the shared rate: among 1e-3 ... 1e-2 (tried by all three), the best mean over the optimizers
    means = {
        lr: (80 - 20 * abs(math.log10(lr / 1e-3)) + 80 - 20 * abs(math.log10(lr)) + 80 - 20 * (math.log10(lr) + 7)) / 3
        for lr in (1e-3, 3.162e-3, 1e-2)
    }
    assert summary["shared_lr"] == max(means, key=means.get)
    assert set(table["seed"]) == {tune.TUNING_SEED}


def test_tuning_seeds_stay_apart_from_reporting_seeds(tmp_path):
    with pytest.raises(ConfigError, match="start at 1000"):
        tune.tune("smoke", ["adamw"], ["clip"], seeds=(0,), runs_root=tmp_path, progress=False)


def test_rates_from_reads_the_choices_and_refuses_other_files(tmp_path):
    table = pd.DataFrame(
        [
            {"group": "adamw", "lr": 1e-3, "tuned": True, "shared": True},
            {"group": "adamw", "lr": 1e-2, "tuned": False, "shared": False},
            {"group": "sgd", "lr": 1e-3, "tuned": False, "shared": True},
            {"group": "sgd", "lr": 1e-1, "tuned": True, "shared": False},
        ]
    )
    tuning_table.write_table(table, tmp_path / "tuning.csv")
    assert tuning_table.rates_from(tmp_path / "tuning.csv", "tuned") == {"adamw": 1e-3, "sgd": 1e-1}
    assert tuning_table.rates_from(tmp_path / "tuning.csv", "shared") == {"*": 1e-3}
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a tuning table"):
        tuning_table.rates_from(tmp_path / "other.csv", "tuned")
    with pytest.raises(ConfigError, match="cannot read"):
        tuning_table.rates_from(tmp_path / "missing.csv", "tuned")


def test_a_real_tuning_run_never_opens_the_test_sets(demo_data_dir, tmp_path, monkeypatch, capsys):
    """The test files are deleted before tuning: a trial that opened them (to fingerprint, check, build or
    score them) would fail. The same data then fails a final run, which must score them."""
    from clipstudy.__main__ import main

    data = shutil.copytree(demo_data_dir, tmp_path / "data")
    (data / "retrieval.json").unlink()
    (data / "retrieval.json").mkdir()  # opening it fails (a folder), so does any check that it is a file
    shutil.rmtree(data / "zeroshot")
    spec = OPTIMIZERS["adamw"]
    monkeypatch.setitem(OPTIMIZERS, "adamw", dataclasses.replace(spec, search_lr=(1e-3, 3.162e-3)))
    argv = ["tune", "--profile", "smoke", "--data", str(data), "--optimizers", "adamw", "--max-extensions", "0"]
    argv += ["--set", "max_steps=2", "--set", "epochs=1", "--runs", str(tmp_path / "runs")]
    assert main([*argv, "--out", str(tmp_path / "tuning.csv")]) == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "tuning.csv")
    assert table["status"].tolist() == ["completed", "completed"] and table["val_average"].notna().all()
    for run in table["run_dir"]:
        metrics = json.loads((tmp_path / "runs" / run.split("/")[-1] / "metrics.json").read_text())
        assert "val_average" in metrics and "average" not in metrics  # validation scores only
        recorded = json.loads((tmp_path / "runs" / run.split("/")[-1] / "config.json").read_text())["fingerprint"]
        assert {"val_retrieval_ann", "val_zeroshot_listing"} <= set(recorded["data"])
        assert not {"retrieval_ann", "zeroshot_listing", "zeroshot_classnames"} & set(recorded["data"])
    assert table["tuned"].sum() == 1 and table["shared"].sum() == 1
    final = ["train", "--profile", "smoke", "--data", str(data), "--max_steps", "2", "--out", str(tmp_path / "f")]
    assert main(final) == 2 and f"{data / 'zeroshot'} not found" in capsys.readouterr().err


def test_with_a_rate_per_loss_the_shared_rate_is_chosen_with_clip():
    table = trials(
        [
            ("adamw:clip", 1e-3, 0.02, "completed", 60.0),
            ("adamw:clip", 1e-2, 0.02, "completed", 50.0),
            ("sgd:clip", 1e-3, 0.02, "completed", 40.0),
            ("sgd:clip", 1e-2, 0.02, "completed", 45.0),  # CLIP: mean 50 at 1e-3, 47.5 at 1e-2
            ("sgd:sogclr", 1e-3, 0.02, "completed", 5.0),
            ("sgd:sogclr", 1e-2, 0.02, "completed", 90.0),  # would move the choice if SogCLR counted
        ]
    )
    assert tune.shared_rate(tune.group_scores(table), ["adamw", "sgd"]) == 1e-3
    best = tune.best_settings(tune.group_scores(table)).set_index("group")["lr"]
    assert best["sgd:sogclr"] == 1e-2 and best["sgd:clip"] == 1e-2


def test_sweep_takes_a_tuning_tables_rates_most_specific_first(tmp_path, capsys):
    from clipstudy.study import sweep

    table = pd.DataFrame(
        [
            {"group": "adamw:clip", "lr": 1e-3, "tuned": True, "shared": True},
            {"group": "adamw:sogclr", "lr": 1e-2, "tuned": True, "shared": False},
            {"group": "sgd:clip", "lr": 3.162e-2, "tuned": True, "shared": False},
            {"group": "sgd:clip", "lr": 1e-3, "tuned": False, "shared": True},
        ]
    )
    tuning_table.write_table(table, tmp_path / "tuning.csv")
    cells = sweep.plan_cells(
        "smoke",
        optimizers=["adamw", "sgd"],
        losses=["clip", "sogclr"],
        lr={**tuning_table.rates_from(tmp_path / "tuning.csv", "tuned"), "sgd": 0.5},
        overrides={"data": str(tmp_path)},
        runs_root=tmp_path / "runs",
    )
    rates = {(c.label, c.loss): c.config.lr for c in cells}
    assert rates == {
        ("adamw", "clip"): 1e-3,
        ("adamw", "sogclr"): 1e-2,
        ("sgd", "clip"): 3.162e-2,
        ("sgd", "sogclr"): 0.5,
    }
    shared = sweep.plan_cells(
        "smoke",
        optimizers=["sgd"],
        losses=["sogclr"],
        lr={"*": 1e-3},
        overrides={"data": str(tmp_path)},
        runs_root=tmp_path / "runs",
    )
    assert shared[0].config.lr == 1e-3
    argv = ["--profile", "smoke", "--data", str(tmp_path), "--lr", "1e-3", "--lr-from", str(tmp_path / "tuning.csv")]
    with pytest.raises(ConfigError, match="give one of them"):
        sweep.main([*argv, "--dry-run"])


def test_the_pretrained_towers_are_made_before_any_trial(demo_data_dir, tmp_path, monkeypatch):
    """Trials only load the demo towers: building them (whose disjointness check reads every split) happens
    before the first trial starts."""
    from clipstudy.study import sweep

    data = shutil.copytree(demo_data_dir, tmp_path / "data")
    seen = []

    def run_sweep(cells, jobs=1, progress=True, notebooks=True):
        seen.append(sorted(p.name for p in (data / "pretrained").glob("*/towers.pt")))
        return {c.name: {"status": "completed", "val_average": 1.0} for c in cells}

    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    monkeypatch.setitem(OPTIMIZERS, "adamw", dataclasses.replace(OPTIMIZERS["adamw"], search_lr=(1e-3, 1e-3)))
    tiny = {
        "images": 32,
        "image_epochs": 1,
        "image_batch_size": 16,
        "captions": 64,
        "text_epochs": 1,
        "text_batch_size": 16,
    }
    overrides = {"data": str(data), "pretrained": True, "pretrain": json.dumps(tiny)}
    tune.tune(
        "smoke", ["adamw"], ["clip"], overrides=overrides, runs_root=tmp_path / "runs", max_extensions=0, progress=False
    )
    assert seen == [["towers.pt"]]


# ---------------------------------------------------------------- the pieces, on constructed tables (fast)
def test_lattice_rates_and_indices_worked_by_hand():
    assert [tune.lattice(k) for k in (-6, -5, -1, 0, 1, 2)] == [0.001, 0.003162, 0.3162, 1.0, 3.162, 10.0]
    assert [tune.lattice_index(r) for r in (0.001, 3.162e-4, 0.3162, 1.0, 10.0, 0.5)] == [-6, -7, -1, 0, 2, -1]
    for bad in ((0.0, 1e-3), (-1e-3, 1e-3), (1e-2, 1e-3)):
        with pytest.raises(ValueError) as error:
            tune.lr_grid(*bad)
        assert str(error.value) == f"search space ({bad[0]}, {bad[1]}): needs 0 < low <= high"
    assert tune.lr_grid(0.5, 2.0) == [0.3162, 1.0, 3.162]  # ends rounded onto the lattice


def test_extend_reaches_the_limits_but_never_passes_them():
    assert tune.extend([1e-3, 1e-4, 3.162e-4], 1e-3) == 3.162e-3  # any order of the grid
    assert tune.extend([1e-3, 1e-4, 3.162e-4], 1e-4) == 3.162e-5
    assert tune.extend([1e-3, 1e-4, 3.162e-4], 3.162e-4) is None
    assert tune.extend([1.0, 3.162], 3.162) == 10.0  # the upper limit itself is allowed
    assert tune.extend([3.162e-7, 1e-6], 3.162e-7) == 1e-7  # and the lower one
    assert tune.extend([1e-7, 3.162e-7], 1e-7) is None  # past it: no
    assert tune.extend([1e-3], 1e-3) == 3.162e-3  # one rate: its top, extended upwards first
    assert tune.extend([1e-3, 1e-2], 1e-3, limit=(1e-4, 1e-2)) == 3.162e-4
    assert tune.extend([1e-3, 1e-2], 1e-2, limit=(1e-4, 1e-2)) is None


def test_groups_are_optimizers_or_optimizer_and_loss():
    assert tune.group_of("adamw", "clip", per_loss=True) == "adamw:clip"
    assert tune.group_of("adamw", "clip", per_loss=False) == "adamw"


def test_group_scores_are_means_with_a_completed_trial_without_score_disqualifying():
    table = pd.DataFrame(
        [
            {"group": "a", "lr": 1e-3, "weight_decay": 0.0, "status": "completed", "val_average": 10.0},
            {"group": "a", "lr": 1e-3, "weight_decay": 0.0, "status": "completed", "val_average": 20.0},
            {"group": "a", "lr": 1e-3, "weight_decay": 0.1, "status": "completed", "val_average": 40.0},
            {"group": "a", "lr": 1e-2, "weight_decay": 0.0, "status": "completed", "val_average": None},
            {"group": "a", "lr": 1e-1, "weight_decay": 0.0, "status": "failed", "val_average": 99.0},
            {"group": "b", "lr": 1e-3, "weight_decay": 0.0, "status": "missing", "val_average": None},
        ]
    )
    scores = tune.group_scores(table)
    assert list(scores.columns) == ["group", "lr", "weight_decay", "score"]
    assert scores.to_dict("records") == [
        {"group": "a", "lr": 1e-3, "weight_decay": 0.0, "score": 15.0},
        {"group": "a", "lr": 1e-3, "weight_decay": 0.1, "score": 40.0},
        {"group": "a", "lr": 1e-2, "weight_decay": 0.0, "score": -math.inf},
        {"group": "a", "lr": 1e-1, "weight_decay": 0.0, "score": -math.inf},
        {"group": "b", "lr": 1e-3, "weight_decay": 0.0, "score": -math.inf},
    ]


def test_best_settings_break_ties_by_the_smaller_rate_then_the_smaller_decay():
    scores = pd.DataFrame(
        [
            {"group": "b", "lr": 1e-2, "weight_decay": 0.1, "score": 50.0},
            {"group": "b", "lr": 1e-2, "weight_decay": 0.0, "score": 50.0},  # same rate and score: smaller decay
            {"group": "b", "lr": 1e-3, "weight_decay": 0.0, "score": 30.0},
            {"group": "a", "lr": 1e-2, "weight_decay": 0.0, "score": 70.0},
            {"group": "a", "lr": 1e-3, "weight_decay": 0.1, "score": 70.0},  # same score: smaller rate
            {"group": "a", "lr": 1e-4, "weight_decay": 0.0, "score": -math.inf},
        ]
    )
    best = tune.best_settings(scores)
    assert list(best.columns) == ["group", "lr", "weight_decay", "score"]
    assert best.to_dict("records") == [
        {"group": "a", "lr": 1e-3, "weight_decay": 0.1, "score": 70.0},
        {"group": "b", "lr": 1e-2, "weight_decay": 0.0, "score": 50.0},
    ]


def test_shared_rate_uses_each_optimizers_best_decay_breaks_ties_low_and_ignores_others():
    scores = pd.DataFrame(
        [
            {"group": "adamw", "lr": 1e-3, "weight_decay": 0.0, "score": 10.0},
            {"group": "adamw", "lr": 1e-3, "weight_decay": 0.1, "score": 50.0},  # adamw at 1e-3: 50
            {"group": "adamw", "lr": 1e-2, "weight_decay": 0.0, "score": 40.0},
            {"group": "sgd", "lr": 1e-3, "weight_decay": 0.0, "score": 30.0},  # mean at 1e-3: 40
            {"group": "sgd", "lr": 1e-2, "weight_decay": 0.0, "score": 40.0},  # mean at 1e-2: 40, a tie
            {"group": "lion", "lr": 1e-1, "weight_decay": 0.0, "score": 99.0},  # not asked for
        ]
    )
    assert tune.shared_rate(scores, ["adamw", "sgd"]) == 1e-3
    assert tune.shared_rate(scores, ["adamw"]) == 1e-3  # adamw alone: its best, 50 at 1e-3
    assert tune.shared_rate(scores, ["sgd"]) == 1e-2
    assert tune.shared_rate(scores, ["adamw", "lion"]) is None  # no rate both tried
    per_loss = scores.assign(group=scores["group"] + ":siglip")
    assert tune.shared_rate(per_loss, ["adamw", "sgd"], loss="siglip") == 1e-3
    assert tune.shared_rate(per_loss, ["adamw", "sgd"]) is None  # chosen with clip, which none tried


def test_plan_trials_makes_one_cell_per_rate_decay_loss_and_seed(tmp_path):
    runs = tmp_path / "runs"
    planned = tune.plan_trials(
        "smoke",
        {"adamw": [1e-3, 1e-2]},
        ["clip", "sogclr"],
        (1000, 1001),
        (None,),
        False,
        {"data": str(tmp_path), "epochs": 2},
        runs,
    )
    assert len(planned) == 8 and {group for group, _ in planned} == {"adamw"}
    seen = set()
    for _, cell in planned:
        config = cell.config
        seen.add((cell.label, cell.loss, cell.seed))
        assert config.optimizer == "adamw" and config.loss == cell.loss and config.seed == cell.seed
        assert config.profile == "smoke" and config.epochs == 2 and config.data == str(tmp_path)
        assert config.evaluate_test is False  # tuning never opens the test sets
        assert config.weight_decay == 0.02  # no decay given: the profile's
        assert config.lr == {"adamw-lr0.001": 1e-3, "adamw-lr0.01": 1e-2}[cell.label]
        assert cell.out == runs / cell.name
    assert seen == {
        (label, loss, seed)
        for label in ("adamw-lr0.001", "adamw-lr0.01")
        for loss in ("clip", "sogclr")
        for seed in (1000, 1001)
    }
    per_loss = tune.plan_trials(
        "smoke", {"adamw:sogclr": [1e-3], "sgd:clip": [1e-2]}, ["clip", "sogclr"], (1000,), (0.0, 0.1), True, {}, runs
    )
    rows = [(g, c.label, c.loss, c.config.optimizer, c.config.lr, c.config.weight_decay) for g, c in per_loss]
    assert rows == [
        ("adamw:sogclr", "adamw-lr0.001-wd0", "sogclr", "adamw", 1e-3, 0.0),
        ("adamw:sogclr", "adamw-lr0.001-wd0.1", "sogclr", "adamw", 1e-3, 0.1),
        ("sgd:clip", "sgd-lr0.01-wd0", "clip", "sgd", 1e-2, 0.0),
        ("sgd:clip", "sgd-lr0.01-wd0.1", "clip", "sgd", 1e-2, 0.1),
    ]


class FakeTrialCell:
    def __init__(self, name, optimizer, loss, lr, weight_decay, seed, out):
        self.name, self.loss, self.seed, self.out = name, loss, seed, out
        self.config = type("Config", (), {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay})()


def test_trial_table_has_a_row_per_planned_trial_missing_ones_marked(tmp_path):
    a = FakeTrialCell("a-clip-s1000", "adamw", "clip", 1e-3, 0.02, 1000, tmp_path / "a")
    b = FakeTrialCell("b-clip-s1000", "sgd", "clip", 1e-2, 0.0, 1000, tmp_path / "b")
    c = FakeTrialCell("c-clip-s1001", "sgd", "clip", 1e-2, 0.0, 1001, tmp_path / "c")
    results = {"a-clip-s1000": {"status": "completed", "val_average": 42.5}, "c-clip-s1001": {"val_average": 1.0}}
    table = tune.trial_table([("adamw", a), ("sgd", b), ("sgd", c)], results)
    assert list(table.columns) == tune.COLUMNS
    rows = table.to_dict("records")
    assert rows[0] == {
        "group": "adamw",
        "optimizer": "adamw",
        "loss": "clip",
        "lr": 1e-3,
        "weight_decay": 0.02,
        "seed": 1000,
        "status": "completed",
        "val_average": 42.5,
        "run_dir": str(tmp_path / "a"),
    }
    assert rows[1]["status"] == "missing" and math.isnan(rows[1]["val_average"])  # never ran: no score
    assert rows[2]["status"] == "missing" and rows[2]["val_average"] == 1.0  # no status recorded
    assert (rows[1]["optimizer"], rows[1]["lr"], rows[1]["seed"]) == ("sgd", 1e-2, 1000)
    assert rows[1]["run_dir"] == str(tmp_path / "b")
    empty = tune.trial_table([], {})
    assert list(empty.columns) == tune.COLUMNS and len(empty) == 0


def test_write_table_writes_six_significant_digits_and_no_index(tmp_path):
    table = pd.DataFrame([{"group": "adamw", "lr": 1 / 3, "val_average": 1.5e-5, "tuned": True}])
    tuning_table.write_table(table, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == "group,lr,val_average,tuned\nadamw,0.333333,1.5e-05,True\n"


def test_rates_from_refuses_with_the_reason(tmp_path):
    path = tmp_path / "tuning.csv"
    for text in ("", "group,lr\nadamw,0.001\n"):
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            tuning_table.rates_from(path, "tuned")
        if text:
            assert str(error.value) == (
                f"--lr-from {path}: not a tuning table (no column ['shared', 'tuned']); see `clipstudy tune`"
            )
        else:
            message = str(error.value)
            assert message.startswith(f"--lr-from {path}: cannot read a tuning table (")
            assert message.endswith("); run `python -m clipstudy tune`")
    for shared in ([True, True], [False, False]):
        table = pd.DataFrame({"group": ["adamw", "sgd"], "lr": [1e-3, 1e-2], "tuned": [True, True], "shared": shared})
        tuning_table.write_table(table, path)
        with pytest.raises(ConfigError) as error:
            tuning_table.rates_from(path, "shared")
        assert str(error.value) == f"--lr-from {path}: no shared rate (every optimizer must have tried it)"
        assert tuning_table.rates_from(path, "tuned") == {"adamw": 1e-3, "sgd": 1e-2}
