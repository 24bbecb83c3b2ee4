"""The effect of the ranking loss: which arms pair, and Δ(+R) with its interval and Holm-adjusted p.

A ±R pair is a ranked arm (variant R, R_dynamic, pearson) and the arm with the same objective
label and the same sweep values, variant "none"; sweep keys of the ranking loss itself (k, ...)
exist only on the ranked side and are ignored. Both are compared over the seeds they share.

The verdict table has one row per pair and one column per headline metric of the layout. Each
cell's interval is, by rule:

* >= 3 paired seeds: the 95% t-interval of the per-seed differences, p from the paired t-test;
* fewer seeds, and every shared seed of both arms has per-example values for the metric: the 95%
  percentile interval of a paired bootstrap over evaluation examples of the per-example
  difference averaged over those seeds, p from the same resamples;
* otherwise no interval: the per-seed differences are listed ("too few seeds for an interval").

With >= 3 seeds and per-example values, the bootstrap over evaluation examples is given as well
(``rows``): the t-interval says how much the difference moves with the training seed, the
bootstrap how much it moves with the choice of evaluation rows (a downstream test set of a few
hundred rows). The p-values of one table's primary tests are Holm-adjusted together; the rows'
bootstrap p-values form a second family, adjusted on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlkd.bench.grid import Arm, Grid
from rlkd.bench.layouts import Column, Headline, Layout
from rlkd.bench.spec import RANKED_VARIANTS
from rlkd.bench.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, BootstrapTest, PairedTest, holm, paired_bootstrap,
                              paired_t)

UNRANKED = "none"
MIN_SEEDS_FOR_INTERVAL = 3


@dataclass(frozen=True)
class Pair:
    base: Arm
    ranked: Arm
    base_row: str
    ranked_row: str

    @property
    def label(self) -> str:
        return f"{self.ranked_row} − {self.base_row}"


def ranking_pairs(grid: Grid, row_order: list[str] | None = None) -> list[Pair]:
    """Every (without R, with R) pair of arms in the grid, in ``row_order`` (default: first seen)."""
    bases: dict[tuple[str, tuple], Arm] = {}
    for arm in grid.arm_rows:
        if arm.variant == UNRANKED and arm.objective_label is not None:
            bases[(arm.objective_label, arm.sweep)] = arm
    pairs = []
    for arm, row in grid.arm_rows.items():
        if arm.variant not in RANKED_VARIANTS or arm.objective_label is None:
            continue
        ranking_only = grid.ranking_keys.get(arm, frozenset())
        # The base keeps every sweep key the ranked arm has except the ranking loss's own.
        kept = tuple((k, v) for k, v in arm.sweep if k not in ranking_only)
        base = bases.get((arm.objective_label, kept))
        if base is not None:
            pairs.append(Pair(base, arm, grid.arm_rows[base], row))
    order = {row: i for i, row in enumerate(row_order or [])}
    first_seen = {row: i for i, row in enumerate(grid.rows)}
    position = lambda row: (order.get(row, len(order)), first_seen[row])  # noqa: E731
    return sorted(pairs, key=lambda p: (position(p.base_row), position(p.ranked_row)))


# ---------------------------------------------------------------------------------------------
# Per-metric paired t-tests (the full listing after the verdict)


@dataclass
class Effect:
    base_row: str
    ranked_row: str
    column: Column
    test: PairedTest | None  # None with fewer than MIN_SEEDS_FOR_INTERVAL seeds
    seeds: int
    p_holm: float | None = None
    per_seed: list[float] = field(default_factory=list)  # the differences, where there is no test


def tabulated_columns(layout: Layout, grid: Grid) -> list[Column]:
    return [c for s in layout.present_sections(grid.columns()) for c in s.columns]


def ranking_effects(layout: Layout, grid: Grid, row_order: list[str] | None = None) -> list[Effect]:
    """Paired ±R t-tests over shared seeds for each pair and column; p Holm-adjusted over them all."""
    columns = tabulated_columns(layout, grid)
    effects = []
    for pair in ranking_pairs(grid, row_order):
        for column in columns:
            with_r = grid.arm_values.get((pair.ranked, column.key), {})
            without = grid.arm_values.get((pair.base, column.key), {})
            seeds = sorted(set(with_r) & set(without), key=str)
            if len(seeds) >= MIN_SEEDS_FOR_INTERVAL:
                test = paired_t([with_r[s] for s in seeds], [without[s] for s in seeds])
                effects.append(Effect(pair.base_row, pair.ranked_row, column, test, len(seeds)))
            elif seeds:  # too few seeds for a test: the per-seed differences only
                effects.append(Effect(pair.base_row, pair.ranked_row, column, None, len(seeds),
                                      per_seed=[with_r[s] - without[s] for s in seeds]))
    tested = [e for e in effects if e.test is not None and e.test.p is not None]
    for effect, adjusted in zip(tested, holm([e.test.p for e in tested])):
        effect.p_holm = adjusted
    return effects


# ---------------------------------------------------------------------------------------------
# The verdict


SEEDS, EXAMPLES, NONE = "seeds", "examples", "none"


@dataclass
class VerdictCell:
    headline: Headline
    per_seed: dict[Any, float]  # seed -> (with R) − (without R)
    interval: str  # SEEDS | EXAMPLES | NONE
    mean: float
    low: float | None = None
    high: float | None = None
    p: float | None = None
    p_holm: float | None = None
    n_examples: int | None = None
    rows: BootstrapTest | None = None  # with >= 3 seeds: the bootstrap over evaluation examples too
    rows_p_holm: float | None = None

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def improves(self) -> bool | None:
        """Whether the interval lies wholly on the better side of 0 (None: no interval)."""
        if self.low is None:
            return None
        better = self.high < 0 if self.headline.lower_is_better else self.low > 0
        worse = self.low > 0 if self.headline.lower_is_better else self.high < 0
        return True if better else (False if worse else None)


@dataclass
class Verdict:
    pairs: list[Pair]
    headlines: list[Headline]
    cells: dict[tuple[Pair, Headline], VerdictCell] = field(default_factory=dict)

    @property
    def family_size(self) -> int:
        return sum(c.p is not None for c in self.cells.values())

    def intervals_used(self) -> set[str]:
        return {c.interval for c in self.cells.values()}

    def n_examples(self) -> set[int]:
        return {c.n_examples for c in self.cells.values() if c.n_examples is not None}

    def row_bootstraps(self) -> list[VerdictCell]:
        return [c for c in self.cells.values() if c.rows is not None]


def _composite(grid: Grid, arm: Arm, headline: Headline) -> dict[Any, float]:
    """Per seed, the mean of the headline's columns (seeds that have all of them)."""
    per_key = [grid.arm_values.get((arm, key), {}) for key in headline.keys]
    seeds = set(per_key[0]).intersection(*per_key[1:]) if per_key else set()
    return {s: math.fsum(v[s] for v in per_key) / len(per_key) for s in seeds}


def _composite_examples(grid: Grid, arm: Arm, headline: Headline, seeds: list[Any]) -> np.ndarray | None:
    """(seed, example) array of the headline's per-example values, or None if any is missing."""
    rows = []
    for seed in seeds:
        parts = [grid.examples.get((arm, key), {}).get(seed) for key in headline.keys]
        if any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
            return None
        rows.append(np.mean(np.asarray(parts, dtype=float), axis=0))
    return np.asarray(rows) if rows else None


def headlines(layout: Layout, grid: Grid) -> list[Headline]:
    """The layout's headline metrics; a layout without any puts every tabulated column in the verdict."""
    if layout.headlines:
        return list(layout.headlines)
    return [Headline(c.header, (c.key,)) for c in tabulated_columns(layout, grid)]


def verdict(layout: Layout, grid: Grid, row_order: list[str] | None = None) -> Verdict:
    pairs = ranking_pairs(grid, row_order)
    result = Verdict(pairs, [])
    for headline in headlines(layout, grid):
        for pair in pairs:
            with_r, without = _composite(grid, pair.ranked, headline), _composite(grid, pair.base, headline)
            seeds = sorted(set(with_r) & set(without), key=str)
            if seeds:
                result.cells[(pair, headline)] = _cell(grid, pair, headline, seeds, with_r, without)
        if any(h == headline for _, h in result.cells):
            result.headlines.append(headline)
    tested = [c for c in result.cells.values() if c.p is not None]
    for cell, adjusted in zip(tested, holm([c.p for c in tested])):
        cell.p_holm = adjusted
    rows = result.row_bootstraps()
    for cell, adjusted in zip(rows, holm([c.rows.p for c in rows])):
        cell.rows_p_holm = adjusted
    return result


def _cell(grid: Grid, pair: Pair, headline: Headline, seeds: list[Any], with_r: dict[Any, float],
          without: dict[Any, float]) -> VerdictCell:
    per_seed = {s: with_r[s] - without[s] for s in seeds}
    ranked_examples = _composite_examples(grid, pair.ranked, headline, seeds)
    base_examples = _composite_examples(grid, pair.base, headline, seeds)
    boot = None
    if ranked_examples is not None and base_examples is not None and ranked_examples.shape == base_examples.shape \
            and ranked_examples.shape[1] >= 2:
        boot = paired_bootstrap((ranked_examples - base_examples).mean(axis=0))  # per example, mean over seeds
    if len(seeds) >= MIN_SEEDS_FOR_INTERVAL:
        test = paired_t([with_r[s] for s in seeds], [without[s] for s in seeds])
        return VerdictCell(headline, per_seed, SEEDS, test.diff.mean, test.diff.low, test.diff.high, test.p,
                           rows=boot)
    if boot is not None:
        return VerdictCell(headline, per_seed, EXAMPLES, boot.mean, boot.low, boot.high, boot.p,
                           n_examples=boot.n_examples)
    return VerdictCell(headline, per_seed, NONE, math.fsum(per_seed.values()) / len(per_seed))


def method_sentence(result: Verdict) -> str:
    """The one sentence under the verdict table that says how its numbers were made."""
    used = result.intervals_used()
    parts = ["Δ = (with R) − (without R) for the same objective and sweep values, over the training seeds both "
             "have; ↓ = lower is better"]
    if SEEDS in used:
        parts.append(f"[a, b] = 95% t-interval of the per-seed differences (≥ {MIN_SEEDS_FOR_INTERVAL} seeds), "
                     "p from the paired t-test")
    if EXAMPLES in used:
        n = ", ".join(str(n) for n in sorted(result.n_examples()))
        parts.append(f"[a, b]† = with fewer than {MIN_SEEDS_FOR_INTERVAL} seeds, the 95% percentile interval of a "
                     f"paired bootstrap over the {n} evaluation examples ({BOOTSTRAP_RESAMPLES} resamples, seed "
                     f"{BOOTSTRAP_SEED}) of the per-example difference averaged over seeds, p from the same "
                     "resamples")
    if result.row_bootstraps():
        n = ", ".join(str(n) for n in sorted({c.rows.n_examples for c in result.row_bootstraps()}))
        parts.append(f"rows [a, b] = with ≥ {MIN_SEEDS_FOR_INTERVAL} seeds, also the 95% percentile interval of a "
                     f"paired bootstrap over the {n} evaluation examples ({BOOTSTRAP_RESAMPLES} resamples, seed "
                     f"{BOOTSTRAP_SEED}) of the per-example difference averaged over seeds: how much Δ moves with "
                     "the evaluation rows; its p is Holm-adjusted over the table's row bootstraps alone")
    if NONE in used:
        parts.append(f"\"(per seed)\" = fewer than {MIN_SEEDS_FOR_INTERVAL} paired seeds and no per-example "
                     "scores: too few seeds for an interval, so the per-seed differences are listed")
    if result.family_size:
        tests = "the 1 test" if result.family_size == 1 else f"the {result.family_size} tests"
        parts.append(f"p is Holm-adjusted over {tests} of this table; **bold** = adjusted p < 0.05")
    return "; ".join(parts) + "."
