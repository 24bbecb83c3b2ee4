"""Uncertainty for results over seeds: t-intervals for a mean and a paired t-test for ±R."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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
