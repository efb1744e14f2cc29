"""The report's verdicts on constructed results whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from clipstudy.study import conclusions, stats, verdicts
from clipstudy.study.results import RESULT_COLUMNS

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


# ---------------------------------------------------------------- a constructed study with every kind of verdict
#
# Five seeds; each seed shifts every cell alike (the same initial weights and data order), and each run adds
# its own small noise. By construction, per loss (true mean Averages):
#
#              CLIP  SogCLR  CyCLIP  VICReg  OnlineCLR   mean over losses
#   AdamW       50    56      58      40      46          50
#   SGD         40    56.5    57      30      36          43.9
#   Adam        30    36      38      45      26          35
#
# so AdamW clearly wins CLIP and OnlineCLR; SGD is 0.5 above AdamW on SogCLR, seen on every seed (significant) but
# inside the 2.07-point machine spread; SGD's CyCLIP runs are so noisy that the 1-point gap's interval covers 0;
# Adam beats both on VICReg. Under ``tuned``, SGD gains 6 points everywhere, Adam 0.5, AdamW nothing.


TRUE = {
    "adamw": {"clip": 50.0, "sogclr": 56.0, "cyclip": 58.0, "vicreg": 40.0, "onlineclr": 46.0},
    "sgd": {"clip": 40.0, "sogclr": 56.5, "cyclip": 57.0, "vicreg": 30.0, "onlineclr": 36.0},
    "adam": {"clip": 30.0, "sogclr": 36.0, "cyclip": 38.0, "vicreg": 45.0, "onlineclr": 26.0},
}
SHIFT = [0.0, 3.0, -2.0, 1.0, -1.5]
SGD_CYCLIP_NOISE = [3.0, -4.0, 1.0, -3.0, 3.0]
TUNING_GAIN = {"adamw": 0.0, "sgd": 6.0, "adam": 0.5}
LR = {"shared": {"adamw": 1e-3, "sgd": 1e-3, "adam": 1e-3}, "tuned": {"adamw": 1e-3, "sgd": 3e-2, "adam": 3e-4}}


def study(protocols=("shared",), rng_seed: int = 1) -> pd.DataFrame:
    """The constructed study as a results table (the columns of results.collect_runs)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for protocol in protocols:
        for optimizer, cells in TRUE.items():
            for loss, value in cells.items():
                for s, shift in enumerate(SHIFT):
                    if (optimizer, loss) == ("sgd", "cyclip"):
                        noise = SGD_CYCLIP_NOISE[s]
                    else:  # the SogCLR cells are the steadiest: their 0.5-point gap is significant
                        noise = rng.normal(0, 0.02 if loss == "sogclr" else 0.2)
                    gain = TUNING_GAIN[optimizer] if protocol == "tuned" else 0.0
                    average = value + shift + noise + gain
                    lr = LR[protocol][optimizer] * (
                        0.5 if (protocol, optimizer, loss) == ("tuned", "sgd", "clip") else 1
                    )
                    rows.append(
                        {
                            "protocol": protocol,
                            "optimizer": optimizer,
                            "base_optimizer": optimizer,
                            "loss": loss,
                            "seed": s,
                            "status": "completed",
                            "txt_r1": average,
                            "img_r1": average,
                            "zeroshot_top1": average,
                            "average": average,
                            "lr": lr,
                            "grad_clip": 0.0,
                        }
                    )
    return pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)


def averages(df, optimizer, loss, protocol="shared"):
    part = df[(df["protocol"] == protocol) & (df["optimizer"] == optimizer) & (df["loss"] == loss)]
    return part.sort_values("seed")["average"].to_numpy()


def over_losses(df, optimizer, protocol="shared"):
    return np.mean([averages(df, optimizer, loss, protocol) for loss in verdicts.LOSSES], axis=0)


def over_optimizers(df, loss, protocol="shared"):
    return np.mean([averages(df, o, loss, protocol) for o in verdicts.OPTIMIZERS], axis=0)


def scipy_interval(a, b) -> str:
    """``+m.mm [+l.ll, +h.hh]``: the mean of a - b and its 95% paired t-interval, by scipy.stats.ttest_rel."""
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    return f"{np.mean(a - b):+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"


BETTER, WORSE, ND = stats.BETTER, stats.WORSE, stats.NOT_DISTINGUISHABLE


def test_constructed_study_gets_the_verdicts_it_was_built_with():
    df = study()
    table = verdicts.tested(df, "shared").set_index("name")
    assert (table["protocol"] == "shared").all()
    expected = {
        "AdamW > SGD | mean over losses": BETTER,
        "AdamW > Adam | mean over losses": BETTER,
        "SGD > Adam | mean over losses": BETTER,
        "CyCLIP > CLIP | mean over optimizers": BETTER,
        "CyCLIP > SogCLR | mean over optimizers": ND,  # 1.5 points: inside the machine spread
        "CyCLIP > VICReg | mean over optimizers": BETTER,
        "CyCLIP > OnlineCLR | mean over optimizers": BETTER,
        "AdamW > SGD | CLIP": BETTER,
        "AdamW > Adam | CLIP": BETTER,
        "SGD > Adam | CLIP": BETTER,
        "AdamW > SGD | SogCLR": ND,
        "AdamW > Adam | SogCLR": BETTER,
        "SGD > Adam | SogCLR": BETTER,
        "AdamW > SGD | CyCLIP": ND,
        "AdamW > Adam | CyCLIP": BETTER,
        "SGD > Adam | CyCLIP": BETTER,
        "AdamW > SGD | VICReg": BETTER,
        "AdamW > Adam | VICReg": WORSE,
        "SGD > Adam | VICReg": WORSE,
        "AdamW > SGD | OnlineCLR": BETTER,
        "AdamW > Adam | OnlineCLR": BETTER,
        "SGD > Adam | OnlineCLR": BETTER,
        **{f"{a} > {b} | AdamW": BETTER for a in ("CyCLIP", "SogCLR") for b in ("CLIP", "VICReg", "OnlineCLR")},
    }
    assert table["verdict"].to_dict() == expected
    # each comparison is the paired difference of exactly its cells, seed by seed (scipy as the reference)
    pairs = {
        "AdamW > SGD | mean over losses": (over_losses(df, "adamw"), over_losses(df, "sgd")),
        "SGD > Adam | mean over losses": (over_losses(df, "sgd"), over_losses(df, "adam")),
        "CyCLIP > VICReg | mean over optimizers": (over_optimizers(df, "cyclip"), over_optimizers(df, "vicreg")),
        "SGD > Adam | VICReg": (averages(df, "sgd", "vicreg"), averages(df, "adam", "vicreg")),
        "SogCLR > OnlineCLR | AdamW": (averages(df, "adamw", "sogclr"), averages(df, "adamw", "onlineclr")),
    }
    for key, (a, b) in pairs.items():
        ref = sps.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        row = table.loc[key]
        assert (row["mean"], row["low"], row["high"], row["p"]) == pytest.approx(
            (np.mean(a - b), ci.low, ci.high, ref.pvalue), rel=1e-9
        ), key
        assert row["n"] == 5
    # the three kinds of "not distinguishable", each with its reason
    assert table.loc["AdamW > SGD | SogCLR", "p_holm"] < 0.01 and table.loc["AdamW > SGD | SogCLR", "high"] < 0
    assert table.loc["AdamW > SGD | SogCLR", "reason"] == (
        f"|difference| {abs(table.loc['AdamW > SGD | SogCLR', 'mean']):.2f} is within the 2.07-point machine spread"
    )
    assert "covers 0" in table.loc["AdamW > SGD | CyCLIP", "reason"]
    # with no noise floor, the steady 0.5-point gap is a finding
    assert (
        verdicts.tested(df, "shared", noise_floor=0.0).set_index("name").loc["AdamW > SGD | SogCLR", "verdict"] == WORSE
    )


def test_constructed_study_findings_count_each_claim():
    outcome = verdicts.findings(verdicts.tested(study(), "shared"))
    assert outcome.to_dict("records") == [
        {
            "finding": "AdamW is the best optimizer for every loss",
            "outcome": "contradicted",  # Adam beats it on VICReg
            "evidence": "7 of 10 claimed comparisons hold, 1 reversed, 2 not distinguishable",
        },
        {
            "finding": "CyCLIP and SogCLR are the best losses (with AdamW)",
            "outcome": "reproduced",
            "evidence": "6 of 6 claimed comparisons hold, 0 reversed, 0 not distinguishable",
        },
        {
            "finding": "Adam is poor everywhere (last of the three optimizers for every loss)",
            "outcome": "contradicted",
            "evidence": "8 of 10 claimed comparisons hold, 2 reversed, 0 not distinguishable",
        },
        {
            "finding": "SGD is second (mean Average over losses: AdamW > SGD > Adam)",
            "outcome": "reproduced",
            "evidence": "2 of 2 claimed comparisons hold, 0 reversed, 0 not distinguishable",
        },
    ]


def test_findings_outcomes_from_a_hand_made_table():
    claims_f4 = ["AdamW > SGD | mean over losses", "SGD > Adam | mean over losses"]

    def outcome(f4_verdicts):
        table = pd.DataFrame({"name": claims_f4, "verdict": f4_verdicts})
        row = verdicts.findings(table).set_index("finding").loc[verdicts.FINDINGS["F4"]]
        return row["outcome"], row["evidence"]

    assert outcome([BETTER, BETTER]) == (
        "reproduced",
        "2 of 2 claimed comparisons hold, 0 reversed, 0 not distinguishable",
    )
    assert outcome([BETTER, ND]) == (
        "not distinguishable",
        "1 of 2 claimed comparisons hold, 0 reversed, 1 not distinguishable",
    )
    assert outcome([WORSE, ND]) == (
        "contradicted",
        "0 of 2 claimed comparisons hold, 1 reversed, 1 not distinguishable",
    )
    assert outcome([BETTER, WORSE])[0] == "contradicted"
    # one claim missing: not testable, whatever the others say (F1 to F3 have none of their comparisons here)
    table = pd.DataFrame({"name": claims_f4[:1], "verdict": [WORSE]})
    assert verdicts.findings(table)["outcome"].tolist() == ["not testable"] * 4


def test_from_side_and_best_and_rivals_on_a_hand_made_table():
    rows = [
        {"name": "A > B | scope", "mean": 3.0, "low": 1.0, "high": 5.0, "verdict": BETTER},
        {"name": "A > C | scope", "mean": -1.0, "low": -2.0, "high": 0.5, "verdict": ND},
        {"name": "B > C | scope", "mean": -6.0, "low": -8.0, "high": -4.0, "verdict": WORSE},
        {"name": "A > B | other", "mean": -50.0, "low": -51.0, "high": -49.0, "verdict": WORSE},
    ]
    table = pd.DataFrame(rows)
    # margins: A 3 - 1 = 2, B -3 - 6 = -9, C 1 + 6 = 7: C leads, seen from its side in both of its comparisons
    best, rivals = verdicts.best_and_rivals(table, "scope")
    assert best == "C"
    assert rivals == [
        {**rows[1], "other": "A", "mean": 1.0, "low": -0.5, "high": 2.0, "verdict": ND},
        {**rows[2], "other": "B", "mean": 6.0, "low": 4.0, "high": 8.0, "verdict": BETTER},
    ]
    assert verdicts.from_side(rows[0], "A") == {**rows[0], "other": "B"}
    assert verdicts.from_side(rows[2], "C")["verdict"] == BETTER
    assert verdicts.best_and_rivals(table, "nothing") is None
    # a leader whose margin is built only from what it loses to others is still found (margins start at 0)
    best, rivals = verdicts.best_and_rivals(pd.DataFrame(rows[:1]), "scope")
    assert best == "A" and rivals == [{**rows[0], "other": "B"}]
    best, _ = verdicts.best_and_rivals(pd.DataFrame([{**rows[0], "mean": -3.0}]), "scope")
    assert best == "B"
    assert verdicts.interval({"mean": 1.234, "low": -0.5, "high": 2.0}) == "+1.23 [-0.50, +2.00]"


@pytest.mark.parametrize(
    "means, leader",
    [
        # margins A -0.5 + 1.0 = 0.5, B 0.5 + 0.2 = 0.7, C -1.2: every side's differences add up, from 0
        ((-0.5, 1.0, 0.2), "B"),
        # A -8 + 10 = 2, B 8 - 8 = 0, C -10 + 8 = -2: C's last comparison alone would make it the leader
        ((-8.0, 10.0, -8.0), "A"),
        # A 5 + 5 = 10, B -5 + 6 = 1: A's last comparison alone would lose to B's
        ((5.0, 5.0, 6.0), "A"),
    ],
)
def test_the_leader_sums_every_comparison_it_is_in(means, leader):
    names = ("Adam (no L2) > B | scope", "Adam (no L2) > C | scope", "B > C | scope")  # a name with spaces
    table = pd.DataFrame(
        [{"name": n, "mean": m, "low": m - 1, "high": m + 1, "verdict": ND} for n, m in zip(names, means)]
    )
    best, rivals = verdicts.best_and_rivals(table, "scope")
    assert best == {"A": "Adam (no L2)"}.get(leader, leader)
    assert len(rivals) == 2 and {r["other"] for r in rivals} == {"Adam (no L2)", "B", "C"} - {best}


def test_rates_used_and_their_text():
    df = study(("shared", "tuned"))
    assert verdicts.rates_used(df, "shared") == {"adamw": [1e-3], "sgd": [1e-3], "adam": [1e-3]}
    assert verdicts.rates_used(df, "tuned") == {"adamw": [1e-3], "sgd": [1.5e-2, 3e-2], "adam": [3e-4]}
    assert (
        verdicts._rates_text(verdicts.rates_used(df, "tuned")) == "AdamW 0.001, SGD 0.015 to 0.03 by loss, Adam 0.0003"
    )
    assert verdicts._rates_text({"sgd": [1e-3, 2e-3, 4e-3]}) == "SGD 0.001 to 0.004 by loss"
    # optimizers outside the original three are not listed
    extra = pd.concat([df, df[df["optimizer"] == "adam"].assign(optimizer="lion", lr=0.5)])
    assert set(verdicts.rates_used(extra, "shared")) == {"adamw", "sgd", "adam"}


def test_protocol_effect_and_the_answer_on_the_constructed_study():
    df = study(("shared", "tuned"))
    effect = verdicts.protocol_effect(df).set_index("name")
    assert effect["verdict"].to_dict() == {
        "AdamW tuned > shared | mean over losses": ND,
        "SGD tuned > shared | mean over losses": BETTER,
        "Adam tuned > shared | mean over losses": ND,
    }
    sgd = (over_losses(df, "sgd", "tuned"), over_losses(df, "sgd", "shared"))
    assert effect.loc["SGD tuned > shared | mean over losses", "mean"] == pytest.approx(np.mean(sgd[0] - sgd[1]))
    assert effect.loc["SGD tuned > shared | mean over losses", "mean"] == pytest.approx(6.0, abs=0.3)
    # below the noise floor: a 0.5-point gain is not distinguishable; with no floor it is
    assert "machine spread" in effect.loc["Adam tuned > shared | mean over losses", "reason"]
    no_floor = verdicts.protocol_effect(df, noise_floor=0.0).set_index("name")
    assert no_floor.loc["Adam tuned > shared | mean over losses", "verdict"] == BETTER
    assert verdicts.protocol_effect(study()).empty  # no tuned runs: nothing to compare

    text = verdicts.answer(df)
    assert len(text) == 6
    shared_rivals = "; ".join(
        f"vs {other} {scipy_interval(over_losses(df, 'adamw'), over_losses(df, key))}, better"
        for other, key in (("SGD", "sgd"), ("Adam", "adam"))
    )
    loss_rivals = "; ".join(
        f"vs {name} {scipy_interval(over_optimizers(df, 'cyclip'), over_optimizers(df, key))}, {v}"
        for name, key, v in (
            ("CLIP", "clip", BETTER),
            ("SogCLR", "sogclr", ND),
            ("VICReg", "vicreg", BETTER),
            ("OnlineCLR", "onlineclr", BETTER),
        )
    )
    assert text[0] == (
        "Under the shared protocol (learning rates: AdamW 0.001, SGD 0.001, Adam 0.001), the best optimizer over the "
        f"five losses is AdamW ({shared_rivals}), and the best loss over the three optimizers is CyCLIP "
        f"({loss_rivals})."
    )
    assert text[1].startswith(
        "Under the tuned protocol (learning rates: AdamW 0.001, SGD 0.015 to 0.03 by loss, Adam 0.0003), the best "
        "optimizer over the five losses is AdamW (vs SGD "
    )
    gains = "; ".join(
        f"{name} {scipy_interval(over_losses(df, key, 'tuned'), over_losses(df, key))}, {v}"
        for name, key, v in (("AdamW", "adamw", ND), ("SGD", "sgd", BETTER), ("Adam", "adam", ND))
    )
    assert text[2] == (
        f"Tuning each optimizer's rate with the same budget changes its mean Average over the losses by {gains}."
    )
    assert text[3].startswith(
        "The original study's four findings, each tested comparison by comparison: shared: "
        "'AdamW is the best optimizer for every loss' contradicted, 'CyCLIP and SogCLR are the best losses (with "
        "AdamW)' reproduced, 'Adam is poor everywhere (last of the three optimizers for every loss)' contradicted, "
        "'SGD is second (mean Average over losses: AdamW > SGD > Adam)' reproduced; tuned: "
    )
    assert text[3].endswith(".") and text[3].count("; tuned: ") == 1
    rho = {p: verdicts.rank_agreement(df, p) for p in ("shared", "tuned")}
    assert text[4] == (
        "Spearman's rho between this study's 15 cells and the published ones: "
        + "; ".join(
            f"{p} {rho[p].rho:.2f} [{rho[p].low:.2f}, {rho[p].high:.2f}], permutation p = {rho[p].p_value:.3f}"
            for p in ("shared", "tuned")
        )
        + "."
    )
    assert text[5] == (
        "Each interval is a 95% paired t-interval over the seeds; verdicts use Holm-adjusted p-values within each "
        "protocol, and a difference smaller than 2.07 points, the spread between two machines running the same "
        "command, is not distinguishable even when its interval excludes 0."
    )
    # one protocol only: no tuning sentence, one protocol in the findings and the agreement
    text = verdicts.answer(study(("tuned",)))
    assert len(text) == 4 and text[0].startswith("Under the tuned protocol")
    assert "; shared: " not in text[1] and text[1].count("tuned: ") == 1


def test_rank_agreement_against_the_published_table():
    from clipstudy.study.findings import published_table

    pub = published_table()
    rng = np.random.default_rng(0)
    ours = pub["average"].to_numpy() + rng.normal(0, 3.0, size=15)  # the published order, with some swaps

    def runs(values):
        return pd.DataFrame(
            [
                # the cell mean is what is ranked: seed 1 is 2 points above seed 0
                {
                    "protocol": "shared",
                    "optimizer": r.optimizer,
                    "loss": r.loss,
                    "seed": s,
                    "status": "completed",
                    "average": v - 1 + 2 * s,
                }
                for r, v in zip(pub.itertuples(), values)
                for s in range(2)
            ]
        )

    result = verdicts.rank_agreement(runs(ours), "shared")
    assert result.n == 15
    assert result.rho == pytest.approx(sps.spearmanr(ours, pub["average"]).statistic)
    assert 0 < result.rho < 1
    assert result == stats.spearman_with_interval(ours, pub["average"].to_numpy(), seed=0)
    assert verdicts.rank_agreement(runs(ours), "shared", seed=3) == stats.spearman_with_interval(
        ours, pub["average"].to_numpy(), seed=3
    )
    assert verdicts.rank_agreement(runs(ours), "shared", seed=3) != result
    # the published order reversed: rho = -1, and no permutation of 15 cells out of 2000 reaches it
    reversed_ = verdicts.rank_agreement(runs(-pub["average"].to_numpy()), "shared")
    assert reversed_.rho == pytest.approx(-1.0) and reversed_.p_value == pytest.approx(1 / 2001)
    assert verdicts.rank_agreement(runs(ours), "tuned").n == 0


def test_partial_studies_leave_out_what_cannot_be_compared():
    df = study()
    # a missing cell (every seed of SGD + VICReg failed): the means over SGD's losses cannot be formed
    failed = df.assign(status=np.where((df["optimizer"] == "sgd") & (df["loss"] == "vicreg"), "failed", "completed"))
    pairs = verdicts.family(failed, "shared")
    assert "AdamW > SGD | mean over losses" not in pairs and "SGD > Adam | mean over losses" not in pairs
    assert "AdamW > Adam | mean over losses" in pairs
    assert "AdamW > SGD | VICReg" not in pairs and "AdamW > Adam | VICReg" in pairs
    assert (
        not any("VICReg | mean over optimizers" in k for k in pairs) and "CyCLIP > CLIP | mean over optimizers" in pairs
    )
    # a seed missing in one cell: that cell's comparisons and the means it enters pair the other four seeds
    dropped = df[~((df["optimizer"] == "adam") & (df["loss"] == "clip") & (df["seed"] == 2))]
    pairs = verdicts.family(dropped, "shared")
    assert len(pairs["AdamW > Adam | CLIP"][0]) == 4 and len(pairs["AdamW > SGD | CLIP"][0]) == 5
    assert len(pairs["AdamW > Adam | mean over losses"][0]) == 4
    assert len(pairs["CyCLIP > CLIP | mean over optimizers"][0]) == 4
    assert pairs["AdamW > Adam | CLIP"][0].tolist() == [
        v for s, v in enumerate(averages(df, "adamw", "clip")) if s != 2
    ]
    # another protocol's runs and runs that did not complete are not this protocol's scores
    other = pd.concat([df, df.assign(protocol="tuned", average=0.0), df.assign(status="diverged", average=0.0)])
    assert {k: [x.tolist() for x in v] for k, v in verdicts.family(other, "shared").items()} == {
        k: [x.tolist() for x in v] for k, v in verdicts.family(df, "shared").items()
    }
    assert verdicts.family(df, "tuned") == {}
    assert verdicts.cell_scores(df, "shared").shape == (5, 15)


# ---------------------------------------------------------------- the report's conclusions on the constructed study


def test_conclusions_sentences_on_the_constructed_study():
    df = study(("shared", "tuned"))
    extra = pd.DataFrame(
        [
            {
                "protocol": "shared",
                "optimizer": "sgd",
                "loss": "clip",
                "seed": 7,
                "status": "diverged",
                "diverged_at_step": np.nan,
            },
            {
                "protocol": "tuned",
                "optimizer": "adam",
                "loss": "vicreg",
                "seed": 8,
                "status": "diverged",
                "diverged_at_step": 12.0,
            },
            {"protocol": "tuned", "optimizer": "adam", "loss": "clip", "seed": 9, "status": "failed"},
        ]
    ).reindex(columns=RESULT_COLUMNS)
    lines = conclusions.conclusions(pd.concat([df, extra], ignore_index=True))
    shared = [line.removeprefix("[shared] ") for line in lines if line.startswith("[shared] ")]
    tuned = [line.removeprefix("[tuned] ") for line in lines if line.startswith("[tuned] ")]
    assert len(shared) + len(tuned) + 2 == len(lines)  # every line tagged, then the runs that did not complete
    assert lines[-2:] == [
        "2 run(s) diverged: shared/sgd-clip-s7 at step ?, tuned/adam-vicreg-s8 at step 12.",
        "1 run(s) failed: tuned/adam-clip-s9.",
    ]
    best = averages(df, "adamw", "cyclip")
    assert (
        shared[0]
        == f"Best cell (highest mean): AdamW + CyCLIP, Average {best.mean():.2f} ± {best.std(ddof=1):.2f} over 5 seeds."
    )
    assert tuned[0].startswith("Best cell (highest mean): SGD + CyCLIP, Average ")  # 57 + 6 > 58

    def clause(loss, best, other, verdict):
        gap = scipy_interval(averages(df, best, loss), averages(df, other, loss))
        return f"vs {verdicts.name(other)} {gap}, {verdict}"

    def line(loss, best, *others):
        head = f"{verdicts.name(loss)}: best optimizer {verdicts.name(best)} ({averages(df, best, loss).mean():.2f})"
        return head + "; " + "; ".join(clause(loss, best, o, v) for o, v in others) + "."

    assert shared[1:6] == [
        line("clip", "adamw", ("sgd", BETTER), ("adam", BETTER)),
        line("sogclr", "sgd", ("adamw", ND), ("adam", BETTER)),  # SGD 0.5 ahead: within the machine spread
        line("cyclip", "adamw", ("sgd", ND), ("adam", BETTER)),  # the interval covers 0
        line("vicreg", "adam", ("adamw", BETTER), ("sgd", BETTER)),  # seen from Adam's side
        line("onlineclr", "adamw", ("sgd", BETTER), ("adam", BETTER)),
    ]
    assert shared[6:10] == [
        "Paper finding 'AdamW is the best optimizer for every loss': contradicted (7 of 10 claimed comparisons "
        "hold, 1 reversed, 2 not distinguishable).",
        "Paper finding 'CyCLIP and SogCLR are the best losses (with AdamW)': reproduced (6 of 6 claimed "
        "comparisons hold, 0 reversed, 0 not distinguishable).",
        "Paper finding 'Adam is poor everywhere (last of the three optimizers for every loss)': contradicted (8 of "
        "10 claimed comparisons hold, 2 reversed, 0 not distinguishable).",
        "Paper finding 'SGD is second (mean Average over losses: AdamW > SGD > Adam)': reproduced (2 of 2 claimed "
        "comparisons hold, 0 reversed, 0 not distinguishable).",
    ]
    rho = verdicts.rank_agreement(df, "shared")
    assert shared[10] == (
        f"Spearman's rho against the published ranking of the 15 cells: {rho.rho:.2f} [{rho.low:.2f}, "
        f"{rho.high:.2f}], permutation p = {rho.p_value:.3f}."
    )
    assert shared[11].startswith("AdamW: mean Average over 5 losses 50.")  # the optimizer lines follow
    assert "No collapse diagnostics in these runs (they predate them)." in shared
    assert not any("chance" in x for x in shared)  # no chance levels given


def test_conclusions_name_cells_against_chance():
    df = study()  # true cell means + 0.1 (the mean seed shift)
    # chance Average (18 + 21 + 24) / 3 = 21: above 42 are AdamW's CLIP, SogCLR, CyCLIP and OnlineCLR, SGD's SogCLR
    # and CyCLIP, Adam's VICReg; nothing is below 21
    lines = conclusions.conclusions(df, {"txt_r1": 18.0, "img_r1": 21.0, "zeroshot_top1": 24.0})
    assert "[shared] 7 of 15 cells reach more than twice the chance Average (21.00)." in lines
    assert not any("Below chance" in x for x in lines)
    # chance Average 27: above 54 only the SogCLR and CyCLIP cells of AdamW and SGD; Adam + OnlineCLR (26.1) below
    lines = conclusions.conclusions(df, {"txt_r1": 27.0, "img_r1": 27.0, "zeroshot_top1": 27.0})
    assert "[shared] 4 of 15 cells reach more than twice the chance Average (27.00)." in lines
    assert "[shared] Below chance: Adam + OnlineCLR." in lines
    # a chance level without all three metrics is no chance Average
    assert conclusions.conclusions(df, {"txt_r1": 10.0, "img_r1": 20.0}) == conclusions.conclusions(df)
    # twice the chance Average exactly is not more than it; the chance Average itself is not below it
    done = pd.DataFrame({"optimizer": ["adamw", "sgd"], "loss": ["clip", "clip"], "average_mean": [40.0, 20.0]})
    assert conclusions._chance_conclusions(done, 20.0) == [
        "0 of 2 cells reach more than twice the chance Average (20.00)."
    ]
    assert conclusions._chance_conclusions(done, None) == []


def test_conclusions_without_protocol_folders_or_completed_cells():
    df = study().assign(protocol=None)
    df.loc[0, "status"] = "diverged"
    df.loc[0, "diverged_at_step"] = 3.0
    lines = conclusions.conclusions(df)
    assert lines[0].startswith("Best cell (highest mean): AdamW + CyCLIP")  # untagged
    assert lines[-1] == "1 run(s) diverged: adamw-clip-s0 at step 3."
    assert conclusions.protocols_in(df) == [""]
    assert conclusions.protocols_in(study(("tuned", "shared"))) == ["shared", "tuned"]
    failed = study().assign(status="failed")
    assert conclusions.conclusions(failed) == ["[shared] No cell completed, so there is nothing to conclude."] + [
        "75 run(s) failed: " + ", ".join(f"shared/{o}-{x}-s{s}" for o in TRUE for x in TRUE[o] for s in range(5)) + "."
    ]


def test_a_loss_whose_optimizers_share_no_seed_has_nothing_to_test():
    df = study()
    one_each = df[((df["optimizer"] == "adamw") & (df["seed"] == 0)) | ((df["optimizer"] == "sgd") & (df["seed"] == 1))]
    lines = conclusions._loss_conclusions(
        conclusions.cell_summary(one_each).dropna(subset=["average_mean"]), verdicts.tested(one_each, "shared")
    )
    clip = averages(df, "adamw", "clip")[0]
    assert lines[0] == f"CLIP: best optimizer AdamW ({clip:.2f}) (fewer than two seeds in common: nothing to test)."
    # a loss run by one optimizer only: no comparison and nothing to say about one
    alone = df[(df["optimizer"] == "adam") & (df["loss"] == "clip")]
    lines = conclusions._loss_conclusions(conclusions.cell_summary(alone), verdicts.tested(alone, "shared"))
    assert lines == [f"CLIP: best optimizer Adam ({averages(df, 'adam', 'clip').mean():.2f})."]
    # seeds in common but only one: the comparison is made, and says why it decides nothing
    same_seed = df[df["seed"] == 0]
    lines = conclusions._loss_conclusions(conclusions.cell_summary(same_seed), verdicts.tested(same_seed, "shared"))
    assert lines[0].startswith("CLIP: best optimizer AdamW") and "; vs SGD +10." in lines[0]
    assert lines[0].endswith(", not distinguishable.")


def test_variants_are_compared_with_the_optimizer_their_runs_modify():
    df = study()
    adam = df[df["optimizer"] == "adam"]
    # Adam without L2: 3 points above Adam on CLIP and SogCLR (the losses both ran), on four seeds
    nol2 = adam[adam["loss"].isin(["clip", "sogclr"]) & (adam["seed"] < 4)].assign(
        optimizer="adam-nol2", average=lambda d: d["average"] + 3.0 + 0.1 * d["seed"]
    )
    # on seed 4 Adam without L2 ran only a loss Adam did not: that seed has no mean over shared losses
    nol2 = pd.concat([nol2, nol2.iloc[:1].assign(loss="siglip", seed=4)])
    scratch = adam.assign(optimizer="adam-scratch", average=0.0)  # compared in the initialisation lines instead
    orphan = adam.assign(optimizer="lion", base_optimizer="lion-base")  # its base has no runs
    lines = conclusions._variant_conclusions(pd.concat([df, nol2, scratch, orphan]))
    a = np.mean([averages(nol2, "adam-nol2", x) for x in ("clip", "sogclr")], axis=0)
    b = np.mean([averages(adam, "adam", x)[:4] for x in ("clip", "sogclr")], axis=0)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert lines == [
        f"Adam (no L2) against Adam (mean over 2 losses, 4 seeds): {scipy_interval(a, b)}, better "
        f"({np.mean(a - b):+.2f} [{ci.low:.2f}, {ci.high:.2f}], adjusted p = {ref.pvalue:.3g})."
    ]
    assert conclusions._variant_conclusions(df) == []  # every optimizer is its own base


def test_marked_study_table_marks_each_cell_against_its_losss_best():
    df = study(("shared", "tuned"))
    table = conclusions.marked_study_table(df, "shared")
    assert (table["Protocol"] == "shared").all()
    marks = table.set_index(["Optimizer", "Method"])["vs best"].to_dict()
    assert marks == {
        ("AdamW", "CLIP"): "best",
        ("SGD", "CLIP"): WORSE,
        ("Adam", "CLIP"): WORSE,
        ("AdamW", "SogCLR"): ND,
        ("SGD", "SogCLR"): "best",
        ("Adam", "SogCLR"): WORSE,
        ("AdamW", "CyCLIP"): "best",
        ("SGD", "CyCLIP"): ND,
        ("Adam", "CyCLIP"): WORSE,
        ("AdamW", "VICReg"): WORSE,
        ("SGD", "VICReg"): WORSE,
        ("Adam", "VICReg"): "best",
        ("AdamW", "OnlineCLR"): "best",
        ("SGD", "OnlineCLR"): WORSE,
        ("Adam", "OnlineCLR"): WORSE,
    }
    # runs outside protocol folders (protocol missing, as results.csv read back gives it): no Protocol column; a
    # cell with no completed run has no mark
    plain = study().assign(protocol=None)
    plain.loc[(plain["optimizer"] == "adam") & (plain["loss"] == "clip"), "status"] = "failed"
    table = conclusions.marked_study_table(plain, "")
    assert "Protocol" not in table
    marks = table.set_index(["Optimizer", "Method"])["vs best"]
    assert marks[("Adam", "CLIP")] == "–" and marks[("SGD", "CLIP")] == WORSE
    assert conclusions.marked_study_table(df, "nothing").empty


def test_marked_study_table_with_one_seed_unknown_names_and_a_loss_without_runs():
    """What `make demo` gives (one seed: no spread), cells of an optimizer and a loss the registries no longer
    know (shown by their keys), and a loss whose every run failed (no best: no mark)."""
    df = study().query("seed == 0").copy()
    df.loc[df["loss"] == "cyclip", "status"] = "failed"
    extra = df[(df["optimizer"] == "adamw") & (df["loss"] == "clip")].iloc[[0]]
    lion = extra.assign(optimizer="lion", base_optimizer="lion", average=99.0)  # ahead of every CLIP cell
    old = extra.assign(loss="oldloss", average=30.0)  # the one cell of its loss
    table = conclusions.marked_study_table(pd.concat([df, lion, old], ignore_index=True), "shared")
    marks = table.set_index(["Optimizer", "Method"])["vs best"].to_dict()
    assert marks[("lion", "CLIP")] == "best"
    assert marks[("AdamW", "CLIP")] == "–"  # the verdicts test the study's three optimizers only
    assert marks[("AdamW", "oldloss")] == "best"
    assert marks[("SGD", "SogCLR")] == "best" and marks[("AdamW", "SogCLR")] == ND  # one seed: nothing certain
    assert [marks[(o, "CyCLIP")] for o in ("AdamW", "SGD", "Adam")] == ["–"] * 3


def test_a_study_of_three_cells_says_what_it_cannot_compare():
    df = study()
    clip = df[df["loss"] == "clip"]
    text = verdicts.answer(clip)
    assert text[0] == (
        "Under the shared protocol (learning rates: AdamW 0.001, SGD 0.001, Adam 0.001), no optimizer over the five "
        "losses could be compared, and no loss over the three optimizers could be compared."
    )
    assert text[1] == (
        "The original study's four findings, each tested comparison by comparison: shared: "
        + ", ".join(f"{claim!r} not testable" for claim in verdicts.FINDINGS.values())
        + "."
    )
    rho = verdicts.rank_agreement(clip, "shared")
    assert rho.n == 3  # three cells are enough for a rank agreement
    assert text[2] == (
        "Spearman's rho between this study's 15 cells and the published ones: "
        f"shared {rho.rho:.2f} [{rho.low:.2f}, {rho.high:.2f}], permutation p = {rho.p_value:.3f}."
    )
    assert len(text) == 4
    lines = conclusions.conclusions(clip)
    assert any(
        line.startswith("[shared] Spearman's rho against the published ranking of the 3 cells: ") for line in lines
    )
    # two cells are not
    two = clip[clip["optimizer"] != "adam"]
    assert not any("Spearman" in line for line in verdicts.answer(two) + conclusions.conclusions(two))
    assert len(verdicts.answer(two)) == 3
    # one seed: the best cell has no spread to show
    one = df[df["seed"] == 1]  # SGD + CyCLIP 4 points below its mean on this seed
    assert conclusions.conclusions(one)[0] == (
        f"[shared] Best cell (highest mean): AdamW + CyCLIP, Average {averages(df, 'adamw', 'cyclip')[1]:.2f}."
    )


def test_the_length_effect_pairs_each_cell_by_seed_and_judges_it():
    """Long against short, cell by cell: seeds paired, names from the runs' steps, the study's order first,
    Holm over the cells, the machine-spread floor."""

    def runs(cells: dict, steps: int) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"optimizer": o, "loss": x, "seed": s, "status": "completed", "average": v, "global_step": steps}
                for (o, x), values in cells.items()
                for s, v in enumerate(values)
            ]
        )

    short = runs(
        {
            ("adam-nol2", "clip"): [30.0, 30.0, 31.0],  # an optimizer outside the study's three
            ("adam", "align"): [20.0, 20.0, 20.0],  # a loss outside the study's five, sorting before "clip"
            ("adam", "clip"): [40.0, 42.0, 44.0],
            ("adamw", "clip"): [40.0, 41.0, 42.0],
        },
        375,
    )
    long = runs(
        {
            ("adam-nol2", "clip"): [30.0, 30.5, 31.0],
            ("adam", "align"): [25.0, 25.0, 26.0],
            ("adam", "clip"): [30.0, 33.0, 34.0, 99.0],  # -10, -9, -10: far below, every seed
            ("adamw", "clip"): [41.0, 42.1, 42.9, 50.0],  # +1.0, +1.1, +0.9: certain, but inside the 2.07 floor
            ("sgd", "clip"): [50.0, 50.0, 50.0],  # no short cell: not compared
        },
        1500,
    )
    long.loc[(long["optimizer"] == "adam") & (long["seed"] == 3), "status"] = "diverged"  # counts nowhere
    table = verdicts.length_effect(long, short).set_index("name")
    cells = ["AdamW + CLIP", "Adam + CLIP", "Adam + align", "Adam (no L2) + CLIP"]  # a name unknown: its key
    assert table.index.tolist() == [f"1500 > 375 steps | {cell}" for cell in cells]
    adam = table.loc["1500 > 375 steps | Adam + CLIP"]
    d = np.array([-10.0, -9.0, -10.0])
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert adam["mean"] == pytest.approx(-29 / 3)
    assert (adam["low"], adam["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert adam["n"] == 3 and adam["verdict"] == stats.WORSE
    adamw = table.loc["1500 > 375 steps | AdamW + CLIP"]
    assert adamw["n"] == 3 and adamw["mean"] == pytest.approx(1.0)  # seed 3 has no short partner
    assert adamw["p_holm"] < 0.05 and adamw["low"] > 0  # significant: only the floor keeps it from "better"
    assert adamw["verdict"] == stats.NOT_DISTINGUISHABLE
    assert verdicts.length_effect(long, short, noise_floor=0.5).set_index("name").loc[adamw.name, "verdict"] == (
        stats.BETTER
    )
    # Holm over the four cells: the smallest p times four
    assert table["p_holm"].min() == pytest.approx(min(1.0, 4 * table["p"].min()))
    empty = verdicts.length_effect(long[long["loss"] == "sogclr"], short)
    assert empty.empty and list(empty.columns) == stats.FAMILY_COLUMNS


def test_the_conclusions_use_the_chance_level_and_name_cells_the_registries_do_not_know():
    """Two cells at chance (1.0): the chance lines list both, each optimizer line counts the losses it learns
    with, and the diagnostics call the cell that did not learn so; unknown names appear as their keys; a
    best cell of two seeds shows its spread."""
    df = study().copy()
    at_chance = (df["optimizer"] == "sgd") & df["loss"].isin(["vicreg", "onlineclr"])
    df.loc[at_chance, ["txt_r1", "img_r1", "zeroshot_top1", "average"]] = 0.9
    df = df.assign(
        image_cos_mean_start=0.5,
        image_cos_mean_end=0.3,
        text_cos_mean_start=0.5,
        text_cos_mean_end=0.3,
        weight_norm_start=30.0,
        weight_norm_end=30.0,
        grad_norm_start=1.0,
        grad_norm_end=1.0,
    )
    chance = {"txt_r1": 1.0, "img_r1": 1.0, "zeroshot_top1": 1.0}
    lines = conclusions.protocol_conclusions(df, "shared", chance)
    assert "Below chance: SGD + VICReg, SGD + OnlineCLR." in lines
    sgd = next(line for line in lines if line.startswith("SGD: mean Average"))
    assert "learns (above twice chance) with 3 of 5 losses" in sgd
    assert any(line.startswith("SGD + VICReg did not learn (Average 0.90)") for line in lines)
    # an optimizer and a loss outside the registries, leading on two seeds
    best = df[(df["optimizer"] == "adamw") & (df["loss"] == "clip") & (df["seed"] < 2)].assign(
        optimizer="lion", base_optimizer="lion", loss="oldloss", average=[90.0, 92.0]
    )
    lines = conclusions.protocol_conclusions(pd.concat([df, best], ignore_index=True), "shared", chance)
    assert lines[0] == "Best cell (highest mean): lion + oldloss, Average 91.00 ± 1.41 over 2 seeds."
    assert "oldloss: best optimizer lion (91.00)." in lines
