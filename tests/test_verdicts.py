"""The report's verdicts on constructed results whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clipstudy.study import stats, verdicts

SEEDS = range(5)


def results(shape: dict[str, dict[tuple[str, str], float]], noise: float = 0.3, rng_seed: int = 0) -> pd.DataFrame:
    """A results table: per protocol, cell -> its true Average; each seed adds a shift shared by all cells
    of that seed (the same initial weights and data order) and a little independent noise."""
    rng = np.random.default_rng(rng_seed)
    seed_shift = {s: rng.normal(0, 3.0) for s in SEEDS}
    rows = []
    for protocol, cells in shape.items():
        for (optimizer, loss), value in cells.items():
            for s in SEEDS:
                rows.append(
                    {
                        "protocol": protocol,
                        "optimizer": optimizer,
                        "loss": loss,
                        "seed": s,
                        "status": "completed",
                        "average": value + seed_shift[s] + rng.normal(0, noise),
                        **dict.fromkeys(("txt_r1", "img_r1", "zeroshot_top1"), value),  # not what is compared
                        "lr": {"shared": 1e-3, "tuned": {"sgd": 3.162e-2}.get(optimizer, 1e-3)}[protocol],
                    }
                )
    return pd.DataFrame(rows)


def grid(optimizer_offset: dict[str, float], loss_offset: dict[str, float], base: float = 50.0) -> dict:
    return {(o, x): base + optimizer_offset[o] + loss_offset[x] for o in verdicts.OPTIMIZERS for x in verdicts.LOSSES}


LOSS_OFFSET = {"clip": 0.0, "sogclr": 6.0, "cyclip": 8.0, "vicreg": -10.0, "onlineclr": -4.0}
# shared: the paper's pattern, every gap far above the noise and the 2.07-point floor
SHARED = grid({"adamw": 0.0, "sgd": -10.0, "adam": -20.0}, LOSS_OFFSET)
# tuned: SGD catches up with AdamW (0.5 points: inside the floor); Adam stays last
TUNED = grid({"adamw": 0.0, "sgd": -0.5, "adam": -20.0}, LOSS_OFFSET)


def test_the_papers_pattern_is_reproduced_where_built_in_and_not_where_it_is_not():
    df = results({"shared": SHARED, "tuned": TUNED})
    shared = verdicts.findings(verdicts.tested(df, "shared")).set_index("finding")["outcome"]
    assert shared.tolist() == ["reproduced"] * 4
    tuned = verdicts.findings(verdicts.tested(df, "tuned")).set_index("finding")["outcome"]
    # F1 (AdamW best for every loss) and F4 (AdamW > SGD > Adam) need AdamW above SGD: a 0.5 gap is no finding
    assert tuned[verdicts.FINDINGS["F1"]] == "not distinguishable"
    assert tuned[verdicts.FINDINGS["F4"]] == "not distinguishable"
    assert tuned[verdicts.FINDINGS["F2"]] == tuned[verdicts.FINDINGS["F3"]] == "reproduced"


def test_a_reversed_claim_contradicts_a_finding():
    reversed_adam = grid({"adamw": 0.0, "sgd": -10.0, "adam": 5.0}, LOSS_OFFSET)  # Adam best everywhere
    table = verdicts.tested(results({"shared": reversed_adam}), "shared")
    outcome = verdicts.findings(table).set_index("finding")["outcome"]
    assert outcome[verdicts.FINDINGS["F1"]] == outcome[verdicts.FINDINGS["F3"]] == "contradicted"
    row = table.set_index("name").loc["AdamW > Adam | CLIP"]
    assert row["verdict"] == stats.WORSE and row["high"] < 0 and row["mean"] == pytest.approx(-5.0, abs=0.6)


def test_the_family_is_every_claim_once_and_holm_runs_over_all_of_it():
    df = results({"shared": SHARED})
    pairs = verdicts.family(df, "shared")
    # 3 optimizer pairs (means), 4 loss rivals of the best, 3 pairs x 5 losses, 6 AdamW loss claims
    assert len(pairs) == 3 + 4 + 15 + 6
    assert "AdamW > SGD | CLIP" in pairs and "SGD > AdamW | CLIP" not in pairs
    table = verdicts.tested(df, "shared")
    assert (table["p_holm"] >= table["p"] - 1e-15).all() and len(table) == len(pairs)
    # the adjusted p-values are Holm's over exactly this family (an independent recomputation)
    p = table["p"].to_numpy()
    order = np.argsort(p)
    adjusted = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]).clip(max=1)
    np.testing.assert_allclose(table["p_holm"].to_numpy()[order], adjusted)


def test_leaders_and_rivals_are_read_from_the_tested_comparisons():
    table = verdicts.tested(results({"shared": SHARED}), "shared")
    best, rivals = verdicts.best_and_rivals(table, "mean over losses")
    assert best == "AdamW" and {r["other"] for r in rivals} == {"SGD", "Adam"}
    assert all(r["verdict"] == stats.BETTER and r["low"] > 0 for r in rivals)
    loss, rivals = verdicts.best_and_rivals(table, "mean over optimizers")
    by = {r["other"]: r for r in rivals}
    assert loss == "CyCLIP" and by["SogCLR"]["mean"] == pytest.approx(2.0, abs=0.5)  # 8 - 6 by construction
    # seen from the loser's side, a comparison negates its difference and interval and swaps the verdict
    row = table.set_index("name").loc["AdamW > SGD | mean over losses"].to_dict() | {"name": "AdamW > SGD | x"}
    flipped = verdicts.from_side(row, "SGD")
    assert (flipped["mean"], flipped["low"], flipped["high"]) == (-row["mean"], -row["high"], -row["low"])
    assert flipped["verdict"] == stats.WORSE and flipped["other"] == "AdamW"


def test_tuning_effect_and_the_answer_say_what_changed():
    df = results({"shared": SHARED, "tuned": TUNED})
    effect = verdicts.protocol_effect(df).set_index("name")
    assert effect.loc["SGD tuned > shared | mean over losses", "verdict"] == stats.BETTER
    assert effect.loc["SGD tuned > shared | mean over losses", "mean"] == pytest.approx(9.5, abs=0.5)
    assert effect.loc["AdamW tuned > shared | mean over losses", "verdict"] == stats.NOT_DISTINGUISHABLE
    text = verdicts.answer(df)
    assert len(text) <= 6
    assert text[0].startswith("Under the shared protocol (learning rates: AdamW 0.001, SGD 0.001, Adam 0.001)")
    assert "the best optimizer over the five losses is AdamW" in text[0]
    assert "SGD 0.03162" in text[1] and "vs SGD" in text[1] and "not distinguishable" in text[1]
    assert "SGD +9." in text[2] and "better" in text[2]
    assert "2.07 points" in text[-1]


def test_a_missing_cell_makes_a_finding_not_testable():
    df = results({"shared": SHARED})
    df = df[~((df["optimizer"] == "adam") & (df["loss"] == "vicreg"))]
    outcome = verdicts.findings(verdicts.tested(df, "shared")).set_index("finding")["outcome"]
    assert outcome[verdicts.FINDINGS["F1"]] == "not testable"
    assert outcome[verdicts.FINDINGS["F2"]] == "reproduced"  # AdamW's losses are all there
