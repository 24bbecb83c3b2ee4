"""Uncertainty of results: t-intervals over seeds, a paired t-test for ±R, a paired bootstrap over
evaluation examples for ±R, Holm's step-down adjustment for a family of such tests, and a
DerSimonian-Laird random-effects mean of several ±R effects (the pooled row of the verdict)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    mean: float
    n: int
    sd: float | None  # sample standard deviation (ddof=1); None with one value
    half_width: float | None  # of the two-sided 95% t-interval; None with one value

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean with the Student-t confidence interval mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci of no values")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Estimate(mean, 1, None, None)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Estimate(mean, n, sd, float(half))


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test over seeds of (with R) − (without R): two-sided, H0 mean difference 0."""

    diff: Estimate
    t: float | None
    p: float | None


def paired_t(with_r: Sequence[float], without_r: Sequence[float], confidence: float = 0.95) -> PairedTest:
    if len(with_r) != len(without_r):
        raise ValueError(f"paired test needs equal lengths, got {len(with_r)} and {len(without_r)}")
    diffs = [a - b for a, b in zip(with_r, without_r)]
    estimate = mean_ci(diffs, confidence)
    if len(diffs) < 2:
        return PairedTest(estimate, None, None)
    if estimate.sd <= 1e-9 * max(1.0, abs(estimate.mean)):
        # Every seed moved by the same amount (to rounding): the t statistic is undefined (0/0 or ±inf).
        return PairedTest(estimate, None, None if estimate.mean == 0 else 0.0)
    result = stats.ttest_rel(with_r, without_r)
    return PairedTest(estimate, float(result.statistic), float(result.pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, the i-th smallest (i = 1..m) becomes min(1, max_{j<=i} (m - j + 1) p_(j)):
    rejecting where the adjusted p < alpha controls the family-wise error at alpha for any
    dependence between the tests.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * float(p_values[i]))
        adjusted[i] = min(1.0, running)
    return adjusted


def holm_bounds(p_values: Sequence[float], at_floor: Sequence[bool]) -> list[bool]:
    """Which Holm-adjusted p-values (``holm(p_values)``) are only upper bounds.

    A bootstrap p at its floor 1/(B+1) (no resample as extreme as the observation) is an upper
    bound on the p-value. Holm's adjusted p is non-decreasing in every raw p, so an adjusted p is
    an upper bound exactly when the running maximum that sets it comes from a floor p (a lower floor
    p keeps its place at the bottom of the order and changes no other term).
    """
    if len(p_values) != len(at_floor):
        raise ValueError("holm_bounds needs one floor flag per p-value")
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    bound = [False] * m
    running, running_bound = 0.0, False
    for rank, i in enumerate(order):
        term = (m - rank) * float(p_values[i])
        if term > running:
            running, running_bound = term, bool(at_floor[i])
        elif term == running and not at_floor[i]:
            running_bound = False  # an exact term reaches the same value
        bound[i] = running_bound and running < 1.0
    return bound


BOOTSTRAP_RESAMPLES = 20000  # p floor 1/(B+1) < 5e-05: below any Holm threshold of a verdict table
BOOTSTRAP_SEED = 20240913  # fixed: the same results directory always renders the same intervals


@dataclass(frozen=True)
class BootstrapTest:
    """Paired bootstrap over evaluation examples of the mean per-example difference."""

    mean: float
    low: float
    high: float
    p: float
    n_examples: int
    resamples: int
    se: float = 0.0  # standard deviation of the resampled means: the bootstrap standard error

    @property
    def at_floor(self) -> bool:
        """No resample was as far from the observed mean as it is from 0: p < 1/(B+1)."""
        return self.p <= 1.0 / (self.resamples + 1) + 1e-15


def paired_bootstrap(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = 0.95, batch: int = 5000) -> BootstrapTest:
    """Percentile interval of the mean of per-example differences (examples resampled with
    replacement, scipy.stats.bootstrap) and a two-sided p-value for "mean difference = 0".

    The p-value uses the same resamples centred on the null: the share of resampled means at least
    as far from the observed mean as the observed mean is from 0, with the usual +1 so that it is
    never 0 (Davison & Hinkley 1997, eq. 4.11). At that floor, 1/(B+1), the p-value is only known to
    be smaller (``BootstrapTest.at_floor``). Resamples are drawn ``batch`` at a time (memory).
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"a bootstrap over examples needs at least 2 examples, got {d.size}")
    observed = float(d.mean())
    if np.ptp(d) == 0.0:
        # Every example moved by the same amount: every resample has that mean.
        return BootstrapTest(observed, observed, observed, 1.0 if observed == 0 else 1.0 / (resamples + 1),
                             int(d.size), resamples, 0.0)
    result = stats.bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed), vectorized=True, batch=batch)
    spread = np.abs(result.bootstrap_distribution - observed)
    p = (1 + int(np.count_nonzero(spread >= abs(observed)))) / (resamples + 1)
    return BootstrapTest(observed, float(result.confidence_interval.low), float(result.confidence_interval.high),
                         min(1.0, p), int(d.size), resamples, float(result.standard_error))


@dataclass(frozen=True)
class RandomEffects:
    """DerSimonian-Laird random-effects mean of k estimates with their standard errors."""

    mean: float
    se: float
    low: float
    high: float
    tau2: float  # between-estimate variance (method of moments, truncated at 0)
    i2: float  # share of the spread beyond sampling error, max(0, (Q - (k-1)) / Q), in [0, 1]
    q: float  # Cochran's Q around the inverse-variance (fixed-effect) mean
    k: int
    p: float  # two-sided z test of mean = 0

    def p_equals(self, value: float) -> float:
        """Two-sided z test of "the random-effects mean = value" (value taken as exact)."""
        return float(2 * stats.norm.sf(abs(self.mean - value) / self.se))


def random_effects(estimates: Sequence[float], standard_errors: Sequence[float],
                   confidence: float = 0.95) -> RandomEffects:
    """DerSimonian & Laird (1986): w_i = 1/se_i², Q = Σ w_i (y_i − ȳ_w)², τ² = max(0, (Q − (k−1)) /
    (Σw − Σw²/Σw)), then the inverse-variance mean with weights 1/(se_i² + τ²), its standard error
    (Σ 1/(se_i² + τ²))^(-1/2) and a normal (z) interval. statsmodels' ``combine_effects`` computes the
    same; it is not a dependency of rlkd, so this is the textbook formula."""
    y = np.asarray(estimates, dtype=float)
    v = np.asarray(standard_errors, dtype=float) ** 2
    if y.ndim != 1 or y.size == 0 or y.shape != v.shape:
        raise ValueError("random_effects needs one standard error per estimate, at least one estimate")
    if np.any(v <= 0):
        raise ValueError("random_effects needs positive standard errors")
    k = int(y.size)
    w = 1.0 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 else 0.0
    w_star = 1.0 / (v + tau2)
    mean = float(np.sum(w_star * y) / np.sum(w_star))
    se = float(math.sqrt(1.0 / np.sum(w_star)))
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    p = float(2 * stats.norm.sf(abs(mean) / se))
    return RandomEffects(mean, se, mean - z * se, mean + z * se, tau2, i2, q, k, p)
