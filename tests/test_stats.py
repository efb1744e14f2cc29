"""clipstudy.study.stats against hand-worked examples, scipy, and brute force."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from clipstudy.study.stats import (
    BETTER,
    NOT_DISTINGUISHABLE,
    WORSE,
    PairedComparison,
    compare_family,
    expected_best,
    expected_best_band,
    holm,
    paired_difference,
    spearman_with_interval,
    verdict,
    verdict_reason,
)

# ---------------------------------------------------------------- paired_difference


def test_paired_difference_hand_computed():
    a = [12, 14, 11, 15, 13]
    b = [10, 11, 10, 12, 11]
    # d = a - b = [2, 3, 1, 3, 2]; mean = 11 / 5 = 2.2
    # deviations -0.2, 0.8, -1.2, 0.8, -0.2; squares sum to 0.04 + 0.64 + 1.44 + 0.64 + 0.04 = 2.8
    # sample variance 2.8 / 4 = 0.7; standard error sqrt(0.7 / 5) = sqrt(0.14) = 0.3741657
    # t quantile scipy.stats.t.ppf(0.975, df=4) = 2.7764451; half width 2.7764451 * 0.3741657 = 1.0388506
    # interval [2.2 - 1.0388506, 2.2 + 1.0388506] = [1.1611494, 3.2388506]
    # t = 2.2 / 0.3741657 = 5.8797473; two-sided p = 2 * scipy.stats.t.sf(5.8797473, 4) = 0.0041811
    c = paired_difference(a, b)
    assert c.n == 5
    assert c.mean == pytest.approx(2.2)
    assert c.low == pytest.approx(1.1611494, abs=1e-6)
    assert c.high == pytest.approx(3.2388506, abs=1e-6)
    assert c.p_value == pytest.approx(0.0041811, abs=1e-6)
    # a 90% interval is narrower: t.ppf(0.95, 4) = 2.1318468, half width 2.1318468 * 0.3741657 = 0.7976640
    c90 = paired_difference(a, b, confidence=0.90)
    assert (c90.low, c90.high) == pytest.approx((2.2 - 0.7976640, 2.2 + 0.7976640), abs=1e-6)
    # the sign follows a - b
    assert paired_difference(b, a).mean == pytest.approx(-2.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_difference_matches_scipy_ttest_rel(seed):
    rng = np.random.default_rng(seed)
    b = rng.normal(20, 3, size=7)
    a = b + rng.normal(0.8, 1.0, size=7)
    c = paired_difference(a, b)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (c.low, c.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert c.mean == pytest.approx(np.mean(a - b))


def test_paired_difference_degenerate_cases():
    one = paired_difference([3.0], [1.0])
    assert one.mean == 2.0 and one.n == 1
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.p_value)
    # the same difference on every seed, with the rounding of decimal scores: p = 0, interval = the mean
    same = paired_difference([12.34, 13.34, 20.1], [11.34, 12.34, 19.1])
    assert same.p_value == 0.0
    assert same.low == same.high == same.mean == pytest.approx(1.0)
    tie = paired_difference([12.34, 13.34], [12.34, 13.34])
    assert (tie.mean, tie.low, tie.high, tie.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert same.n == 3 and tie.n == 2


def test_rounding_level_means_1e_12_of_the_scores_and_never_less_than_1e_12():
    # scores below 1: the tolerance is 1e-12 (not 1e-12 x 0.005 = 5e-15)
    base = np.array([0.001, 0.002, 0.005])
    below = paired_difference(base + np.array([0.0, 0.0, 5e-13]), base - 0.001)
    assert np.ptp(np.subtract(base + np.array([0.0, 0.0, 5e-13]), base - 0.001)) > 1e-13
    assert below.low == below.high == below.mean and below.p_value == 0.0
    above = paired_difference(base + np.array([0.0, 0.0, 1.5e-12]), base - 0.001)  # beyond 1e-12: a spread
    assert above.low < above.mean < above.high


def test_paired_difference_refuses_misaligned_or_missing():
    with pytest.raises(ValueError, match="lengths 3 and 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1, 2, 3], [1, 2, np.nan])


# ---------------------------------------------------------------- holm


def test_holm_hand_worked():
    # sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> raised to 0.06 (monotone)
    adj = holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_monotone_and_capped():
    # 0.6 (x2) = 1.2 -> capped at 1; 0.7 (x1) = 0.7 -> raised to the 1.2 before it, capped at 1
    assert holm([0.7, 0.6]) == pytest.approx([1.0, 1.0])
    # 0.02 (x3) = 0.06, 0.3 (x2) = 0.6, 0.5 (x1) = 0.5 -> raised to 0.6
    assert holm([0.3, 0.5, 0.02]) == pytest.approx([0.6, 0.6, 0.06])
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20) ** 3
    adj = holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1)


def test_holm_nan_stays_and_does_not_count():
    # m = 2, not 3: 0.01 (x2) = 0.02, 0.04 (x1) = 0.04
    adj = holm([0.01, np.nan, 0.04])
    assert math.isnan(adj[1])
    assert adj[[0, 2]] == pytest.approx([0.02, 0.04])
    assert np.isnan(holm([np.nan, np.nan])).all()
    assert holm([]).shape == (0,)
    # None (a comparison that could not be tested) counts as NaN
    adj = holm([0.01, None, 0.04])
    assert math.isnan(adj[1]) and adj[[0, 2]] == pytest.approx([0.02, 0.04])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])


# ---------------------------------------------------------------- verdict


def test_verdict_better_and_worse():
    assert verdict(PairedComparison(3.0, 1.5, 4.5, 0.001, 5), 0.004, noise_floor=2.0) == BETTER
    assert verdict(PairedComparison(-3.0, -4.5, -1.5, 0.001, 5), 0.004, noise_floor=2.0) == WORSE
    label, reason = verdict_reason(PairedComparison(3.0, 1.5, 4.5, 0.001, 5), 0.004)
    assert label == BETTER and "+3.00" in reason


def test_verdict_interval_covers_zero():
    v = verdict_reason(PairedComparison(1.0, -0.5, 2.5, 0.2, 5), 0.4)
    assert v.label == NOT_DISTINGUISHABLE
    assert "covers 0" in v.reason
    # the interval alone decides when alpha and the confidence level disagree
    v = verdict_reason(PairedComparison(1.0, -0.5, 2.5, 0.2, 5), 0.01)
    assert v.label == NOT_DISTINGUISHABLE and "covers 0" in v.reason and "adjusted p" not in v.reason


def test_verdict_significant_but_inside_noise_floor():
    c = PairedComparison(1.2, 1.0, 1.4, 1e-5, 8)
    assert verdict(c, 1e-4) == BETTER
    v = verdict_reason(c, 1e-4, noise_floor=2.0)
    assert v.label == NOT_DISTINGUISHABLE
    assert "within the 2-point machine spread" in v.reason
    assert verdict(PairedComparison(-1.2, -1.4, -1.0, 1e-5, 8), 1e-4, noise_floor=2.0) == NOT_DISTINGUISHABLE


def test_verdict_holm_adjusted_p_and_few_seeds():
    # interval excludes 0 but the family-adjusted p does not pass alpha
    v = verdict_reason(PairedComparison(2.0, 0.5, 3.5, 0.03, 5), 0.09)
    assert v.label == NOT_DISTINGUISHABLE and "adjusted p = 0.09" in v.reason
    v = verdict_reason(PairedComparison(2.0, math.nan, math.nan, math.nan, 1), math.nan)
    assert v.label == NOT_DISTINGUISHABLE and "at least 2" in v.reason


# ---------------------------------------------------------------- compare_family

BASE = np.array([50.0, 52, 48, 51, 49])
LARGE = [10.2, 9.8, 10.5, 9.6, 10.1]  # paired t-test p = 3.6e-7
SMALL = [0.8, 1.4, 0.1, 0.9, 0.3]  # p = 0.0384 alone; second smallest of 3 -> x2 = 0.0768 after Holm
NULL = [-0.4, 0.6, 0.1, -0.5, 0.3]  # p = 0.928


def test_compare_family_large_gap_survives_holm_small_does_not():
    pairs = {"large": (BASE + LARGE, BASE), "small": (BASE + SMALL, BASE), "null": (BASE + NULL, BASE)}
    df = compare_family(pairs).set_index("name")
    assert list(df.reset_index().columns) == ["name", "mean", "low", "high", "p", "p_holm", "verdict", "reason", "n"]
    assert list(df.index) == ["large", "small", "null"]
    assert df.loc["small", "p"] == pytest.approx(0.038379, abs=1e-6)
    assert df.loc["small", "p"] < 0.05  # significant alone ...
    assert df.loc["small", "p_holm"] == pytest.approx(2 * df.loc["small", "p"])  # ... not in the family
    assert df.loc["large", "p_holm"] == pytest.approx(3 * df.loc["large", "p"])
    assert df.loc["null", "p_holm"] == pytest.approx(df.loc["null", "p"])
    assert df["verdict"].tolist() == [BETTER, NOT_DISTINGUISHABLE, NOT_DISTINGUISHABLE]
    assert "adjusted p" in df.loc["small", "reason"]
    assert "covers 0" in df.loc["null", "reason"]
    assert (df["n"] == 5).all()
    assert df.loc["large", "mean"] == pytest.approx(10.04)
    # reversed, the large gap is "worse"; a noise floor above it makes it no finding at all
    assert compare_family({"r": (BASE, BASE + LARGE)})["verdict"].tolist() == [WORSE]
    assert compare_family({"r": (BASE + LARGE, BASE)}, noise_floor=12.0)["verdict"].tolist() == [NOT_DISTINGUISHABLE]


def test_compare_family_empty():
    df = compare_family({})
    assert isinstance(df, pd.DataFrame) and len(df) == 0 and "verdict" in df.columns


# ---------------------------------------------------------------- spearman_with_interval


def test_spearman_rho_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, size=25).astype(float)
    y = x + rng.normal(0, 2, size=25)
    r = spearman_with_interval(x, y, n_boot=200, n_perm=200)
    assert r.rho == pytest.approx(sps.spearmanr(x, y).statistic)
    assert r.low <= r.rho <= r.high
    assert r.n == 25


def test_spearman_perfect_monotone():
    x = np.arange(10.0)
    r = spearman_with_interval(x, x**3 + 5)
    assert r.rho == pytest.approx(1.0)
    assert r.low == pytest.approx(1.0) and r.high == pytest.approx(1.0)
    assert r.p_value == pytest.approx(1 / 2001)  # no permutation of 10 ranks out of 2000 reaches |rho| = 1
    assert spearman_with_interval(x, -x).rho == pytest.approx(-1.0)


def test_spearman_independent_data_interval_covers_zero():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=40), rng.normal(size=40)
    r = spearman_with_interval(x, y)
    assert r.low < 0 < r.high
    assert r.p_value > 0.05


def test_spearman_p_and_interval_agree_with_scipy():
    # moderately correlated: the permutation p is near scipy's t-approximation and the bootstrap interval near
    # scipy.stats.bootstrap's percentile interval (both Monte Carlo, so to within its error)
    rng = np.random.default_rng(5)
    x = rng.normal(size=30)
    y = 0.45 * x + rng.normal(size=30)
    r = spearman_with_interval(x, y, n_boot=4000, n_perm=4000)
    assert r.p_value == pytest.approx(sps.spearmanr(x, y).pvalue, abs=0.01)
    ref = sps.bootstrap(
        (x, y),
        lambda a, b: sps.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        method="percentile",
        n_resamples=4000,
        rng=np.random.default_rng(1),
    )
    ci = ref.confidence_interval
    assert (r.low, r.high) == pytest.approx((ci.low, ci.high), abs=0.04)


def test_spearman_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=15), rng.normal(size=15)
    assert spearman_with_interval(x, y, seed=4) == spearman_with_interval(x, y, seed=4)
    assert spearman_with_interval(x, y, seed=4) != spearman_with_interval(x, y, seed=5)


def test_spearman_degenerate_inputs():
    # most resamples of x are constant (rho undefined): they are skipped, the interval stays finite
    r = spearman_with_interval([0, 0, 0, 0, 0, 0, 1.0], [1, 2, 3, 4, 5, 6, 7.0], n_boot=500, n_perm=200)
    assert np.isfinite([r.rho, r.low, r.high, r.p_value]).all()
    assert math.isnan(spearman_with_interval([1, 1, 1.0], [1, 2, 3.0]).rho)
    assert math.isnan(spearman_with_interval([1, 2.0], [1, 2.0]).low)
    with pytest.raises(ValueError, match="lengths"):
        spearman_with_interval([1, 2, 3], [1, 2])


# ---------------------------------------------------------------- expected_best


def brute_force_expected_max(scores, n):
    draws = list(itertools.product(scores, repeat=n))  # all N^n ordered draws, each equally likely
    return sum(max(d) for d in draws) / len(draws)


@pytest.mark.parametrize("scores", [[3.0, 1.0, 4.0, 1.5], [3.0, 1.0, 4.0, 1.0], [2.0, 7.0, 5.0]])
def test_expected_best_matches_brute_force(scores):
    curve = expected_best(scores, n_max=3)
    assert curve.shape == (3,)
    for n in (1, 2, 3):
        assert curve[n - 1] == pytest.approx(brute_force_expected_max(scores, n))


def test_expected_best_endpoints_and_default_length():
    scores = [0.31, 0.52, 0.47, 0.12, 0.50]
    curve = expected_best(scores)
    assert len(curve) == 5  # n_max defaults to the number of trials
    assert curve[0] == pytest.approx(np.mean(scores))  # one trial: the mean
    assert np.all(np.diff(curve) > 0)
    assert expected_best(scores, n_max=300)[-1] == pytest.approx(max(scores), abs=1e-9)  # many: the max
    with pytest.raises(ValueError, match="empty"):
        expected_best([])
    with pytest.raises(ValueError, match="n_max"):
        expected_best(scores, n_max=0)


def test_expected_best_band_contains_curve():
    rng = np.random.default_rng(2)
    scores = rng.normal(15, 3, size=12)
    band = expected_best_band(scores, n_max=20, n_boot=500, seed=1)
    assert list(band.columns) == ["n", "expected_best", "low", "high"]
    assert band["n"].tolist() == list(range(1, 21))
    assert band["expected_best"].to_numpy() == pytest.approx(expected_best(scores, n_max=20))
    assert (band["low"] <= band["expected_best"]).all() and (band["expected_best"] <= band["high"]).all()
    assert (band["high"] - band["low"] > 0).all()
    pd.testing.assert_frame_equal(band, expected_best_band(scores, n_max=20, n_boot=500, seed=1))
    # identical trials: no uncertainty, the band collapses onto the curve
    flat = expected_best_band([4.0, 4.0, 4.0], n_boot=50)
    assert (flat["low"] == 4.0).all() and (flat["high"] == 4.0).all()


# ---------------------------------------------------------------- inputs, edge cases and defaults


def test_scores_are_read_as_floats_and_misshapen_or_missing_ones_are_named():
    # an object column (as pandas leaves one that once held None) is read as numbers
    a = pd.Series([12, 14, 11, 15, 13], dtype=object)
    b = pd.Series([10, 11, 10, 12, 11], dtype=object)
    assert paired_difference(a, b).mean == pytest.approx(2.2)
    with pytest.raises(ValueError, match=r"^a must be 1-D, got shape \(1, 2\)$"):
        paired_difference([[1.0, 2.0]], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"^b must be 1-D"):
        paired_difference([1.0, 2.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"^a contains NaN"):
        paired_difference([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match=r"^b contains NaN"):
        paired_difference([1, 2, 3], [1, 2, np.nan])
    with pytest.raises(ValueError, match=r"^a and b must be aligned by seed: lengths 3 and 2 differ$"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"^x and y must be aligned by seed: lengths 3 and 2 differ$"):
        spearman_with_interval([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"^x contains NaN"):
        spearman_with_interval([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match=r"^y contains NaN"):
        spearman_with_interval([1, 2, 3], [1, np.nan, 3])
    with pytest.raises(ValueError, match=r"^scores contains NaN"):
        expected_best([1.0, np.nan])


def test_paired_difference_of_no_seeds_is_all_nan():
    c = paired_difference([], [])
    assert c.n == 0
    assert all(math.isnan(v) for v in (c.mean, c.low, c.high, c.p_value))


def test_paired_difference_two_seeds_get_an_interval():
    # d = [1, 3]: mean 2, sd sqrt(2), se 1, t.ppf(0.975, 1) = 12.7062047; t = 2, p = 2 * t.sf(2, 1) = 0.2951672
    c = paired_difference([11.0, 13.0], [10.0, 10.0])
    assert c.n == 2 and c.mean == 2.0
    assert (c.low, c.high) == pytest.approx((2 - 12.7062047, 2 + 12.7062047), abs=1e-6)
    assert c.p_value == pytest.approx(0.2951672, abs=1e-6)


def test_a_rounding_level_spread_is_judged_against_the_larger_side():
    # 99999.63 - 0.61 = 99999.34 - 0.32 = 99999.15 - 0.13 = 99999.02 in decimal; in binary the three differences
    # differ by 1.5e-11, far below the rounding of scores near 1e5 (1e-12 x 99999.63 = 1e-7): no spread at all
    large, small = [99999.63, 99999.34, 99999.15], [0.61, 0.32, 0.13]
    assert np.ptp(np.subtract(large, small)) > 1e-12  # the spread is real in binary ...
    for a, b, sign in ((large, small, 1), (small, large, -1)):  # ... whichever side holds the large scores
        c = paired_difference(a, b)
        assert c.mean == pytest.approx(sign * 99999.02)
        assert c.low == c.high == c.mean and c.p_value == 0.0
    # a spread of 1.4e-14 on scores near 300 is rounding as well (1e-12 x 300.7 = 3e-10)
    c = paired_difference([100.1, 200.2, 300.7], [0.3, 100.4, 200.9])
    assert c.low == c.high == c.mean == pytest.approx(99.8) and c.p_value == 0.0


def test_holm_refuses_what_is_not_a_list_of_p_values_and_takes_0_and_1():
    with pytest.raises(ValueError, match=r"^p_values must be 1-D, got shape \(1, 2\)$"):
        holm([[0.1, 0.2]])
    # 0 and 1 are p-values; the message names only the ones out of range
    with pytest.raises(ValueError, match=r"^p-values must lie in \[0, 1\], got \[ 1.5 -0.1\]$"):
        holm([0.0, 1.0, 1.5, 0.5, -0.1])
    # 0 (x3) = 0, 0.02 (x2) = 0.04, 1 (x1) = 1
    assert holm([1.0, 0.0, 0.02]) == pytest.approx([1.0, 0.0, 0.04])


def test_verdict_boundaries_and_defaults():
    # defaults: alpha 0.05 and no noise floor, so a 0.5-point gap with a tight interval is a finding
    small = PairedComparison(0.5, 0.3, 0.7, 0.001, 5)
    assert verdict(small, 0.004) == BETTER
    assert verdict_reason(small, 0.004) == (BETTER, "+0.50 [0.30, 0.70], adjusted p = 0.004")
    assert verdict(PairedComparison(-0.5, -0.7, -0.3, 0.001, 5), 0.004) == WORSE
    # adjusted p exactly at alpha is not below it
    assert verdict(small, 0.05) == NOT_DISTINGUISHABLE
    assert verdict_reason(small, 0.05).reason == "adjusted p = 0.05 is not below 0.05"
    assert verdict(small, 0.09) == NOT_DISTINGUISHABLE
    assert verdict(small, 0.09, alpha=0.1) == BETTER
    # an interval that ends at 0 covers it
    v = verdict_reason(PairedComparison(1.0, 0.0, 2.0, 0.01, 5), 0.01)
    assert v == (NOT_DISTINGUISHABLE, "interval [0.00, 2.00] covers 0")
    assert verdict(PairedComparison(-1.0, -2.0, 0.0, 0.01, 5), 0.01) == NOT_DISTINGUISHABLE
    # a difference exactly at the noise floor reaches it
    assert verdict(PairedComparison(2.0, 1.5, 2.5, 0.001, 5), 0.004, noise_floor=2.0) == BETTER
    # two seeds are enough to be judged
    assert verdict(PairedComparison(2.0, 1.5, 2.5, 0.001, 2), 0.004) == BETTER
    v = verdict_reason(PairedComparison(2.0, math.nan, math.nan, math.nan, 1), math.nan)
    assert v == (NOT_DISTINGUISHABLE, "1 paired seed(s): at least 2 are needed")
    # every failed condition is named, in order
    v = verdict_reason(PairedComparison(1.0, -0.5, 2.5, 0.2, 5), 0.4, noise_floor=2.07)
    assert v.reason == (
        "adjusted p = 0.4 is not below 0.05; interval [-0.50, 2.50] covers 0; "
        "|difference| 1.00 is within the 2.07-point machine spread"
    )
    assert verdict_reason(PairedComparison(2.0, 1.0, 3.0, 0.01, 3), math.nan).reason.startswith("adjusted p = nan")


def test_compare_family_passes_its_settings_to_every_comparison():
    pairs = {"large": (BASE + LARGE, BASE), "small": (BASE + SMALL, BASE), "null": (BASE + NULL, BASE)}
    # alpha 0.1: the small gap's Holm-adjusted p, 0.0768, passes
    df = compare_family(pairs, alpha=0.1).set_index("name")
    assert df["verdict"].tolist() == [BETTER, BETTER, NOT_DISTINGUISHABLE]
    # the intervals are each comparison's own, at the confidence asked for
    for confidence in (0.95, 0.8):
        df = compare_family(pairs, confidence=confidence).set_index("name")
        for name, (a, b) in pairs.items():
            ci = sps.ttest_rel(a, b).confidence_interval(confidence)
            assert (df.loc[name, "low"], df.loc[name, "high"]) == pytest.approx((ci.low, ci.high))
    # no noise floor by default: a 0.5-point gap seen on every seed is better
    df = compare_family({"half": (BASE + [0.45, 0.55, 0.5, 0.52, 0.48], BASE)})
    assert df["verdict"].tolist() == [BETTER]
    assert df["reason"].iloc[0].startswith("+0.50 [")


def reference_spearman(x, y, *, n_boot, n_perm, seed, confidence):
    """spearman_with_interval's procedure redone with scipy.stats.spearmanr on each resample and permutation,
    drawing the same resamples and permutations from the same generator (pairs, then permutations)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = [sps.spearmanr(x[i], y[i]).statistic for i in idx if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    perms = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
    rho = sps.spearmanr(x, y).statistic
    count = sum(abs(sps.spearmanr(x, y[p]).statistic) >= abs(rho) - 1e-12 for p in perms)
    return rho, low, high, (count + 1) / (n_perm + 1)


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_spearman_interval_and_p_are_the_resamples_and_permutations_scipy_gives(confidence):
    # tied scores on both sides, so ranks with ties and constant resamples (skipped) both occur
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 7.0, 8.0])
    y = np.array([2.0, 1.0, 3.0, 3.0, 4.0, 6.0, 6.0, 9.0])
    r = spearman_with_interval(x, y, n_boot=300, n_perm=300, seed=3, confidence=confidence)
    rho, low, high, p = reference_spearman(x, y, n_boot=300, n_perm=300, seed=3, confidence=confidence)
    assert r.rho == pytest.approx(rho)
    assert (r.low, r.high) == pytest.approx((low, high), abs=1e-12)
    assert r.p_value == pytest.approx(p, abs=1e-12)
    assert r.n == 8


def test_spearman_permutation_p_against_the_exact_permutation_distribution():
    # x = 1..4 and y with one adjacent swap: rho = 1 - 6 * 2 / (4 * 15) = 0.8. Of the 24 orders of y, |rho| >= 0.8
    # for the identity and the 3 adjacent swaps (rho 1, 0.8) and their reverses (-1, -0.8): exact p = 8 / 24
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0]
    exact = sum(abs(sps.spearmanr(x, p).statistic) >= 0.8 - 1e-12 for p in itertools.permutations(y)) / math.factorial(
        4
    )
    assert exact == pytest.approx(1 / 3)
    r = spearman_with_interval(x, y, n_boot=100, n_perm=6000, seed=0)
    assert r.rho == pytest.approx(0.8)
    assert r.p_value == pytest.approx(exact, abs=0.025)  # Monte Carlo: sd sqrt(1/3 * 2/3 / 6000) = 0.006


def test_spearman_defaults_and_smallest_inputs():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=12), rng.normal(size=12)
    assert spearman_with_interval(x, y) == spearman_with_interval(
        x, y, n_boot=2000, n_perm=2000, seed=0, confidence=0.95
    )
    # three pairs are enough; a side whose range is 1 is not constant
    r = spearman_with_interval([1.0, 2.0, 3.0], [0.0, 0.5, 1.0], n_boot=200, n_perm=200)
    assert r.rho == pytest.approx(1.0) and r.n == 3 and np.isfinite([r.low, r.high, r.p_value]).all()
    # ranks 1, 4, 3, 2 against 1, 2, 3, 4: rho = 1 - 6 * (0 + 4 + 0 + 4) / (4 * 15) = 0.2
    r = spearman_with_interval([0.0, 1.0, 0.5, 0.2], [1.0, 2.0, 3.0, 4.0], n_boot=200, n_perm=200)
    assert r.rho == pytest.approx(0.2) and np.isfinite([r.low, r.high, r.p_value]).all()
    # a constant side has no ranking: everything NaN, n kept
    for a, b in (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]), ([1.0, 2.0], [1.0, 2.0])):
        r = spearman_with_interval(a, b, n_boot=50, n_perm=50)
        assert r.n == len(a)
        assert all(math.isnan(v) for v in (r.rho, r.low, r.high, r.p_value))


def brute_force_curve(scores, n_max):
    return [brute_force_expected_max(scores, n) for n in range(1, n_max + 1)]


@pytest.mark.parametrize("confidence", [0.95, 0.6])
def test_expected_best_band_is_the_bootstrap_of_brute_force_curves(confidence):
    # each bootstrap resample of the 5 trials gets its curve by enumerating all 5^n draws; the band is their
    # percentiles (the same resamples, drawn from the trials in ascending order by the same generator)
    scores = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    band = expected_best_band(scores, n_max=3, n_boot=60, seed=2, confidence=confidence)
    rng = np.random.default_rng(2)
    resamples = rng.choice(np.sort(scores), size=(60, 5), replace=True)
    curves = np.array([brute_force_curve(list(r), 3) for r in resamples])
    tail = (1 - confidence) / 2 * 100
    assert band["low"].to_numpy() == pytest.approx(np.percentile(curves, tail, axis=0), abs=1e-12)
    assert band["high"].to_numpy() == pytest.approx(np.percentile(curves, 100 - tail, axis=0), abs=1e-12)
    assert band["expected_best"].to_numpy() == pytest.approx(brute_force_curve(list(scores), 3))
    assert band["n"].tolist() == [1, 2, 3]


def test_expected_best_single_trial_defaults_and_messages():
    assert expected_best([5.0]).tolist() == [5.0]  # one trial: every draw is it
    assert expected_best([5.0, 1.0], n_max=1).tolist() == [3.0]
    band = expected_best_band([5.0, 1.0, 2.0])
    assert band["n"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(band, expected_best_band([5.0, 1.0, 2.0], n_max=3, n_boot=1000, seed=0))
    pd.testing.assert_frame_equal(band, expected_best_band([5.0, 1.0, 2.0], confidence=0.95))
    # the documented defaults (1000 resamples, seed 0), on trials varied enough that either one shows
    trials = [5.0, 1.0, 2.0, 7.0, 3.5, 9.0, 0.5, 6.0]
    default = expected_best_band(trials)
    pd.testing.assert_frame_equal(default, expected_best_band(trials, n_boot=1000, seed=0))
    for other in ({"n_boot": 1001}, {"seed": 1}):
        assert not default.equals(expected_best_band(trials, **other)), other
    with pytest.raises(ValueError, match=r"^scores is empty: no trials to draw from$"):
        expected_best([])
    with pytest.raises(ValueError, match=r"^n_max must be at least 1, got 0$"):
        expected_best_band([1.0], n_max=0)


def test_constant_bootstrap_resamples_are_skipped_quietly():
    # with 3 pairs, one resample in 9 repeats one pair: rho is 0 / 0 there, dropped without a RuntimeWarning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = spearman_with_interval([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], n_boot=300, n_perm=50)
    assert result.n == 3 and result.rho == pytest.approx(0.5)
    assert -1.0 <= result.low <= result.high <= 1.0


def test_no_usable_bootstrap_resample_gives_no_interval():
    # seed 4 draws the one resample (2, 2, 2): a constant side, rho undefined, so there is no interval
    assert np.ptp(np.random.default_rng(4).integers(0, 3, size=(1, 3))) == 0
    result = spearman_with_interval([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], n_boot=1, n_perm=20, seed=4)
    assert result.rho == pytest.approx(0.5) and math.isnan(result.low) and math.isnan(result.high)
    assert 0 < result.p_value <= 1
