"""Uncertainty of results: t-intervals over seeds, a paired t-test for ±R, a paired bootstrap over
evaluation examples for ±R, and Holm's step-down adjustment for a family of such tests."""

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


BOOTSTRAP_RESAMPLES = 2000
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


def paired_bootstrap(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> BootstrapTest:
    """Percentile interval of the mean of per-example differences (examples resampled with
    replacement, scipy.stats.bootstrap) and a two-sided p-value for "mean difference = 0".

    The p-value uses the same resamples centred on the null: the share of resampled means at least
    as far from the observed mean as the observed mean is from 0, with the usual +1 so that it is
    never 0 (Davison & Hinkley 1997, eq. 4.11).
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"a bootstrap over examples needs at least 2 examples, got {d.size}")
    observed = float(d.mean())
    if np.ptp(d) == 0.0:
        # Every example moved by the same amount: every resample has that mean.
        return BootstrapTest(observed, observed, observed, 1.0 if observed == 0 else 1.0 / (resamples + 1),
                             int(d.size), resamples)
    result = stats.bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    spread = np.abs(result.bootstrap_distribution - observed)
    p = (1 + int(np.count_nonzero(spread >= abs(observed)))) / (resamples + 1)
    return BootstrapTest(observed, float(result.confidence_interval.low), float(result.confidence_interval.high),
                         min(1.0, p), int(d.size), resamples)
