"""The statistics behind the report's conclusions: paired comparisons across seeds, Holm's correction, verdicts
with a noise floor, Spearman's rho with an interval, and the expected-best tuning curve of Dodge et al. (2019).

Pure functions on arrays; scores are higher-is-better. A comparison of two settings pairs their runs by seed
(same seed: same initial weights and data order), so the seed-to-seed variation common to both cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"
FAMILY_COLUMNS = ["name", "mean", "low", "high", "p", "p_holm", "verdict", "reason", "n"]


def _scores(x, name: str) -> np.ndarray:
    """``x`` as a 1-D float array; NaN refused (a missing run must be dropped on purpose, not averaged over)."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN: drop the missing runs (and their partners) before comparing")
    return arr


def _pair(a, b, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _scores(a, names[0]), _scores(b, names[1])
    if len(a) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} must be aligned by seed: lengths {len(a)} and {len(b)} differ")
    return a, b


@dataclass(frozen=True)
class PairedComparison:
    """Mean of a - b over seeds, its t-interval (low, high), the paired t-test's two-sided p-value, and n seeds."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int


def paired_difference(a, b, *, confidence: float = 0.95) -> PairedComparison:
    """Paired t-test of ``a`` against ``b`` (scores on the same seeds, aligned by position).

    n < 2: interval and p are NaN. All differences equal (zero spread, up to rounding of the scores): the
    interval collapses to the mean, and p is 0 for a nonzero mean, 1 for a zero one.
    """
    a, b = _pair(a, b)
    d, n = a - b, len(a)
    if n == 0:
        return PairedComparison(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return PairedComparison(mean, math.nan, math.nan, math.nan, n)
    # 12.34 - 11.34 and 13.34 - 12.34 differ in the last bit: spreads at rounding level count as zero
    tol = 1e-12 * max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
    if np.ptp(d) <= tol:
        return PairedComparison(mean, mean, mean, 1.0 if abs(mean) <= tol else 0.0, n)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return PairedComparison(mean, mean - half, mean + half, p, n)


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    The k-th smallest of m p-values is scaled by (m - k + 1), made non-decreasing along the sorted order, and
    capped at 1. NaN (a comparison that could not be tested) stays NaN and does not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)]}")
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = (len(order) - np.arange(len(order))) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


class Verdict(NamedTuple):
    label: str  # BETTER, WORSE or NOT_DISTINGUISHABLE
    reason: str  # why, for the report: "interval covers 0", "|difference| 1.20 is within the 2.0-point ..."


def verdict_reason(
    comparison: PairedComparison, adjusted_p: float, *, alpha: float = 0.05, noise_floor: float = 0.0
) -> Verdict:
    """The verdict on a - b and why. "better"/"worse" only when the adjusted p is below ``alpha``, the interval
    excludes 0, and |mean| reaches ``noise_floor`` (the spread between two machines running the same command: a
    smaller difference is not a finding). Otherwise every condition that failed is named in the reason."""
    c = comparison
    if c.n < 2:
        return Verdict(NOT_DISTINGUISHABLE, f"{c.n} paired seed(s): at least 2 are needed")
    failed = []
    if math.isnan(adjusted_p) or adjusted_p >= alpha:
        failed.append(f"adjusted p = {adjusted_p:.3g} is not below {alpha:g}")
    if c.low <= 0 <= c.high:
        failed.append(f"interval [{c.low:.2f}, {c.high:.2f}] covers 0")
    if abs(c.mean) < noise_floor:
        failed.append(f"|difference| {abs(c.mean):.2f} is within the {noise_floor:g}-point machine spread")
    if failed:
        return Verdict(NOT_DISTINGUISHABLE, "; ".join(failed))
    label = BETTER if c.mean > 0 else WORSE
    return Verdict(label, f"{c.mean:+.2f} [{c.low:.2f}, {c.high:.2f}], adjusted p = {adjusted_p:.3g}")


def verdict(comparison: PairedComparison, adjusted_p: float, *, alpha: float = 0.05, noise_floor: float = 0.0) -> str:
    """ "better", "worse" or "not distinguishable" (see :func:`verdict_reason` for the rule and the why)."""
    return verdict_reason(comparison, adjusted_p, alpha=alpha, noise_floor=noise_floor).label


def compare_family(pairs, *, alpha: float = 0.05, noise_floor: float = 0.0, confidence: float = 0.95) -> pd.DataFrame:
    """One row per comparison of the mapping name -> (a, b), Holm-corrected across the whole family: the report
    draws every conclusion of one table at once, so the chance of any false finding among them is what counts."""
    comps = {name: paired_difference(a, b, confidence=confidence) for name, (a, b) in pairs.items()}
    p_holm = holm([c.p_value for c in comps.values()])
    rows = []
    for (name, c), ph in zip(comps.items(), p_holm):
        v = verdict_reason(c, float(ph), alpha=alpha, noise_floor=noise_floor)
        rows.append((name, c.mean, c.low, c.high, c.p_value, float(ph), v.label, v.reason, c.n))
    return pd.DataFrame(rows, columns=FAMILY_COLUMNS)


@dataclass(frozen=True)
class SpearmanResult:
    """Spearman's rho, its percentile bootstrap interval (low, high), the permutation p-value, and n pairs."""

    rho: float
    low: float
    high: float
    p_value: float
    n: int


def _row_rho(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of rank arrays (Spearman's rho per row); NaN where a row is constant."""
    dx = rx - rx.mean(axis=1, keepdims=True)
    dy = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((dx**2).sum(axis=1) * (dy**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (dx * dy).sum(axis=1) / den, math.nan)


def spearman_with_interval(
    x, y, *, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0, confidence: float = 0.95
) -> SpearmanResult:
    """Spearman's rho of paired observations, with a percentile bootstrap interval (pairs resampled; resamples
    where rho is undefined, a constant side, are skipped) and a two-sided permutation p-value,
    (count(|rho_perm| >= |rho|) + 1) / (n_perm + 1). Deterministic for a given seed."""
    x, y = _pair(x, y, ("x", "y"))
    n = len(x)
    nan = SpearmanResult(math.nan, math.nan, math.nan, math.nan, n)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = _row_rho(stats.rankdata(x[idx], axis=1), stats.rankdata(y[idx], axis=1))
    boot = boot[~np.isnan(boot)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail]) if len(boot) else (math.nan, math.nan)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    perm = _row_rho(np.broadcast_to(rx, (n_perm, n)), rng.permuted(np.tile(ry, (n_perm, 1)), axis=1))
    count = int((np.abs(perm) >= abs(rho) - 1e-12).sum())  # ties in |rho| count as extreme
    return SpearmanResult(rho, float(low), float(high), (count + 1) / (n_perm + 1), n)


def _tuning_curves(sorted_scores: np.ndarray, n_max: int) -> np.ndarray:
    """Expected max of n i.i.d. draws for n = 1..n_max, per row of ascending scores: sum_i v_(i) * (F_i^n -
    F_{i-1}^n), F_i = i / N the empirical CDF at the i-th smallest score (P(max of n draws = v_(i)))."""
    big_n = sorted_scores.shape[-1]
    cdf = np.arange(big_n + 1) / big_n
    ns = np.arange(1, n_max + 1)[:, None]
    weights = cdf[1:] ** ns - cdf[:-1] ** ns  # (n_max, N)
    return sorted_scores @ weights.T


def _curve_args(scores, n_max: int | None) -> tuple[np.ndarray, int]:
    v = _scores(scores, "scores")
    if len(v) == 0:
        raise ValueError("scores is empty: no trials to draw from")
    n_max = len(v) if n_max is None else int(n_max)
    if n_max < 1:
        raise ValueError(f"n_max must be at least 1, got {n_max}")
    return np.sort(v), n_max


def expected_best(scores, n_max: int | None = None) -> np.ndarray:
    """Dodge et al. (2019), "Show your work": the expected best validation score when n hyperparameter trials
    are drawn i.i.d. (with replacement) from the observed ones, for n = 1..n_max (default: the number of
    trials). Element n - 1 is the value for n. A setting's tuning budget matters as much as its best score."""
    v, n_max = _curve_args(scores, n_max)
    return _tuning_curves(v, n_max)


def expected_best_band(
    scores, n_max: int | None = None, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> pd.DataFrame:
    """:func:`expected_best` with a percentile bootstrap band (trials resampled, the curve recomputed): columns
    n, expected_best, low, high. Deterministic for a given seed."""
    v, n_max = _curve_args(scores, n_max)
    rng = np.random.default_rng(seed)
    boot = np.sort(rng.choice(v, size=(n_boot, len(v)), replace=True), axis=1)
    curves = _tuning_curves(boot, n_max)  # (n_boot, n_max)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(curves, [tail, 100 - tail], axis=0)
    return pd.DataFrame(
        {"n": np.arange(1, n_max + 1), "expected_best": _tuning_curves(v, n_max), "low": low, "high": high}
    )
