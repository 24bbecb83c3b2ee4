"""The effect of the ranking loss: which arms pair, and Δ(+R) with its interval and Holm-adjusted p.

A ±R pair is a ranked arm (variant R, R_dynamic, pearson) and the arm with the same objective
label and the same sweep values, variant "none"; sweep keys of the ranking loss itself (k, ...)
exist only on the ranked side and are ignored. Both are compared over the seeds they share.

The verdict table has one row per pair and one column per headline metric of the layout, the same
rules in every layout:

* Primary family: with >= 3 paired seeds, the 95% t-interval of the per-seed differences and the
  paired t-test over seeds. These p-values, and only these, are Holm-adjusted together.
* Secondary family ("rows"): where every shared seed of both arms has per-example values for the
  headline, a paired bootstrap over evaluation examples of the per-example difference averaged over
  the seeds: how much Δ moves with the choice of evaluation rows. With >= 3 seeds it is given beside
  the seed test; with fewer seeds it is all there is: the cell's interval is that bootstrap, marked
  as not testing the training-seed effect (one or two trained models per arm say whether these
  models differ on these rows, not whether +R helps). The rows p-values are Holm-adjusted on their
  own, never mixed with the seed tests.
* Otherwise no interval: the per-seed differences are listed ("too few seeds for an interval").
* A headline marked ``tested=False`` (the same generations scored by a second ROUGE library) is
  shown beside the others with its intervals and no p: it is not a further test of either family.

Under the pairs, a pooled row per headline: the DerSimonian-Laird random-effects mean of the
pairs' Δ over all objectives (``stats.random_effects``), its 95% interval, τ² and I², and, where the
paper has both rows of the pairs, the paper's mean Δ over the same pairs with a z test of
"our mean = the paper's". Each pair enters with its mean Δ and a standard error: sd/√n over the
seeds for a seed-tested pair; for a pair with fewer than 3 seeds, the bootstrap standard error over
evaluation rows. That SE leaves out the training-seed variance; under the random-effects model the
variance it leaves out shows up as between-pair heterogeneity, so it widens the pooled interval
through τ² (and inflates τ² and I², which then mix objective differences with seed noise). Pairs
without either are left out and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlkd.bench.report.grid import Arm, Grid
from rlkd.bench.report.layouts import Column, Headline, Layout
from rlkd.bench.spec import RANKED_VARIANTS
from rlkd.bench.report.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, BootstrapTest, PairedTest, RandomEffects, holm,
                              holm_bounds, paired_bootstrap, paired_t, random_effects)

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


def seed_comparison(ours: dict[Any, float], ref: dict[Any, float]) -> tuple[int, PairedTest | None, list[float]]:
    """(shared seeds, paired t-test of ours − ref over them or None with fewer than
    MIN_SEEDS_FOR_INTERVAL, the per-seed differences where there is no test)."""
    seeds = sorted(set(ours) & set(ref), key=str)
    if len(seeds) >= MIN_SEEDS_FOR_INTERVAL:
        return len(seeds), paired_t([ours[s] for s in seeds], [ref[s] for s in seeds]), []
    return len(seeds), None, [ours[s] - ref[s] for s in seeds]


def ranking_effects(layout: Layout, grid: Grid, row_order: list[str] | None = None) -> list[Effect]:
    """Paired ±R t-tests over shared seeds for each pair and column; p Holm-adjusted over them all."""
    columns = tabulated_columns(layout, grid)
    effects = []
    for pair in ranking_pairs(grid, row_order):
        for column in columns:
            n, test, per_seed = seed_comparison(grid.arm_values.get((pair.ranked, column.key), {}),
                                                grid.arm_values.get((pair.base, column.key), {}))
            if n:  # with too few seeds for a test, the per-seed differences only
                effects.append(Effect(pair.base_row, pair.ranked_row, column, test, n, per_seed=per_seed))
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
    interval: str  # SEEDS (t over seeds) | EXAMPLES (bootstrap over rows only) | NONE
    mean: float
    low: float | None = None
    high: float | None = None
    p: float | None = None  # the paired t-test over seeds (primary family); None otherwise
    p_holm: float | None = None
    n_examples: int | None = None
    rows: BootstrapTest | None = None  # the bootstrap over evaluation examples, where there are per-example values
    rows_p_holm: float | None = None  # Holm over the secondary family (tested headlines' row bootstraps)
    rows_p_bound: bool = False  # rows_p_holm is only an upper bound (a bootstrap p at its floor set it)
    se: float | None = None  # the standard error the pooled row uses: sd/√n over seeds, else the rows' bootstrap SE

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
class Pooled:
    """The pooled row of one headline: the random-effects mean Δ over the pairs."""

    headline: Headline
    effect: RandomEffects
    pairs: list[Pair]  # pooled
    left_out: list[Pair]  # no standard error (no interval of either kind)
    from_rows: list[Pair]  # pooled with the rows' bootstrap SE (fewer than 3 seeds)
    paper_mean: float | None = None  # the paper's mean Δ over the pooled pairs it has
    paper_pairs: int = 0
    p_paper: float | None = None  # two-sided z test of "our mean = the paper's mean"


@dataclass
class Verdict:
    pairs: list[Pair]
    headlines: list[Headline]
    cells: dict[tuple[Pair, Headline], VerdictCell] = field(default_factory=dict)
    pooled: dict[Headline, Pooled] = field(default_factory=dict)

    @property
    def family_size(self) -> int:
        """Tests of the primary family: paired t-tests over seeds of tested headlines."""
        return sum(c.p is not None for c in self.cells.values())

    @property
    def rows_family_size(self) -> int:
        return sum(c.rows_p_holm is not None for c in self.cells.values())

    def intervals_used(self) -> set[str]:
        return {c.interval for c in self.cells.values()}

    def n_examples(self) -> set[int]:
        return {c.rows.n_examples for c in self.cells.values() if c.rows is not None}

    def row_bootstraps(self) -> list[VerdictCell]:
        return [c for c in self.cells.values() if c.rows is not None]

    def untested_headlines(self) -> list[Headline]:
        return [h for h in self.headlines if not h.tested]


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
    return [Headline(c.header, (c.key,), better=c.better) for c in tabulated_columns(layout, grid)]


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
    # Primary family: the seed t-tests of the tested headlines.
    tested = [c for c in result.cells.values() if c.p is not None]
    for cell, adjusted in zip(tested, holm([c.p for c in tested])):
        cell.p_holm = adjusted
    # Secondary family: the tested headlines' bootstraps over evaluation rows, whatever the seed count.
    rows = [c for c in result.row_bootstraps() if c.headline.tested]
    raw = [c.rows.p for c in rows]
    for cell, adjusted, bound in zip(rows, holm(raw), holm_bounds(raw, [c.rows.at_floor for c in rows])):
        cell.rows_p_holm, cell.rows_p_bound = adjusted, bound
    for headline in result.headlines:
        pooled = _pooled(layout, result, headline)
        if pooled is not None:
            result.pooled[headline] = pooled
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
        se = test.diff.sd / math.sqrt(test.diff.n) if test.diff.sd else None
        return VerdictCell(headline, per_seed, SEEDS, test.diff.mean, test.diff.low, test.diff.high,
                           test.p if headline.tested else None, n_examples=boot.n_examples if boot else None, rows=boot,
                           se=se)
    if boot is not None:
        return VerdictCell(headline, per_seed, EXAMPLES, boot.mean, boot.low, boot.high,
                           n_examples=boot.n_examples, rows=boot, se=boot.se or None)
    return VerdictCell(headline, per_seed, NONE, math.fsum(per_seed.values()) / len(per_seed))


def paper_delta(layout: Layout, pair: Pair, headline: Headline) -> float | None:
    """The paper's Δ(+R) for this pair and headline (mean over the headline's columns), if it has both rows."""
    deltas = []
    for key in headline.keys:
        ranked, base = layout.paper_value(pair.ranked_row, key), layout.paper_value(pair.base_row, key)
        if ranked is None or base is None:
            return None
        deltas.append(ranked - base)
    # The paper prints 2 decimals: round away the binary noise of the differences (1.455, not 1.4549999).
    return round(math.fsum(deltas) / len(deltas), 10) if deltas else None


MIN_PAIRS_TO_POOL = 2


def _pooled(layout: Layout, result: Verdict, headline: Headline) -> Pooled | None:
    cells = [(pair, result.cells[(pair, headline)]) for pair in result.pairs if (pair, headline) in result.cells]
    usable = [(pair, cell) for pair, cell in cells if cell.se is not None and cell.se > 0]
    if len(usable) < MIN_PAIRS_TO_POOL:
        return None
    effect = random_effects([c.mean for _, c in usable], [c.se for _, c in usable])
    pooled = Pooled(headline, effect, [p for p, _ in usable], [p for p, c in cells if (p, c) not in usable],
                    [p for p, c in usable if c.interval == EXAMPLES])
    paper = [d for d in (paper_delta(layout, p, headline) for p in pooled.pairs) if d is not None]
    if paper:
        pooled.paper_mean = round(math.fsum(paper) / len(paper), 10)
        pooled.paper_pairs = len(paper)
        if headline.tested:
            pooled.p_paper = effect.p_equals(pooled.paper_mean)
    return pooled


def method_sentence(result: Verdict) -> str:
    """The sentences under the verdict table that say how its numbers were made."""
    used = result.intervals_used()
    parts = ["Δ = (with R) − (without R) for the same objective and sweep values, over the training seeds both "
             "have (a seed is the run's `seed`: it sets the training data order and torch's random state; both "
             "arms of a pair start from the same models); "
             "↓ = lower is better"]
    if SEEDS in used:
        parts.append(f"[a, b] = 95% t-interval of the per-seed differences (≥ {MIN_SEEDS_FOR_INTERVAL} seeds), "
                     "p from the paired t-test over seeds: the primary test")
    if result.row_bootstraps():
        n = ", ".join(str(n) for n in sorted(result.n_examples()))
        parts.append(f"rows [a, b] = 95% percentile interval of a paired bootstrap over the {n} evaluation examples "
                     f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}) of the per-example difference "
                     "averaged over seeds, p from the same resamples (\"p < x\": no resample as extreme, the floor "
                     f"1/(B+1) = {1 / (BOOTSTRAP_RESAMPLES + 1):.0e} times the Holm factor): how much Δ moves with "
                     "the evaluation rows, the secondary test")
    if EXAMPLES in used:
        parts.append(f"rows† = fewer than {MIN_SEEDS_FOR_INTERVAL} seeds, so the bootstrap over rows is all there "
                     "is: it tests whether these trained models score the same on these rows, not the effect of "
                     "+R over training seeds")
    if NONE in used:
        parts.append(f"\"(per seed)\" = fewer than {MIN_SEEDS_FOR_INTERVAL} paired seeds and no per-example "
                     "scores: too few seeds for an interval, so the per-seed differences are listed")
    families = []
    if result.family_size:
        tests = "the 1 seed test" if result.family_size == 1 else f"the {result.family_size} seed tests"
        families.append(f"p after [a, b] is Holm-adjusted over {tests} of this table (primary family); "
                        "**bold** = adjusted p < 0.05")
    if result.rows_family_size:
        families.append(f"a rows p is Holm-adjusted over the table's {result.rows_family_size} bootstraps over rows "
                        "(secondary family, never mixed with the seed tests); *italic* = adjusted p < 0.05")
    parts += families
    for headline in result.untested_headlines():
        parts.append(f"{headline.header} scores the same generations again: shown beside, not a test of either "
                     "family (no p)")
    if result.pooled:
        pooled = next(iter(result.pooled.values()))
        parts.append("pooled = DerSimonian-Laird random-effects mean of the pairs' Δ, each with its standard error "
                     f"(sd/√n over seeds; with fewer than {MIN_SEEDS_FOR_INTERVAL} seeds the rows' bootstrap SE, "
                     "which leaves out the seed variance: under the random-effects model it appears as between-pair "
                     "heterogeneity, in τ² and I²), 95% z-interval, p for mean = 0 and, where the paper has the "
                     "pairs, for mean = the paper's mean Δ over the same pairs (taken as exact: the paper gives no "
                     "intervals); these p are not Holm-adjusted"
                     + (f"; {len(pooled.left_out)} pair(s) without an interval left out" if pooled.left_out else ""))
    return "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Sweep contrasts: Δ = (a swept value) − (the reference value), e.g. sparse − exact teacher cache


@dataclass
class ContrastCell:
    seeds: int
    test: PairedTest | None  # None with fewer than MIN_SEEDS_FOR_INTERVAL seeds
    per_seed: list[float] = field(default_factory=list)  # the differences, where there is no test
    p_holm: float | None = None

    @property
    def mean(self) -> float:
        return self.test.diff.mean if self.test is not None else math.fsum(self.per_seed) / len(self.per_seed)


@dataclass
class Contrast:
    title: str
    sweep: str
    reference: Any
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (row, reference row)
    headlines: list[Headline] = field(default_factory=list)
    cells: dict[tuple[tuple[str, str], Headline], ContrastCell] = field(default_factory=dict)  # ((row, ref), headline)


def _without(sweep: tuple[tuple[str, Any], ...], key: str) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in sweep if k != key)


def sweep_contrasts(layout: Layout, grid: Grid, row_order: list[str] | None = None) -> list[Contrast]:
    """Per contrast of the layout: each arm whose ``sweep`` value differs from the reference, paired
    with the arm that differs in that key alone (same objective label, variant and other sweep
    values), per headline over their shared seeds: a paired t-test with >= 3 seeds (Holm-adjusted
    within the contrast's table), else the per-seed differences."""
    out = []
    order = {row: i for i, row in enumerate(row_order or grid.rows)}
    for key, reference, title in layout.contrasts:
        contrast = Contrast(title, key, reference)
        references, swept = {}, []
        for arm in grid.arm_rows:
            sweep = dict(arm.sweep)
            if sweep.get(key) == reference:  # a sweep without the key counts as its null entry
                references[(arm.objective_label, arm.variant, _without(arm.sweep, key))] = arm
            elif key in sweep:
                swept.append(arm)
        pairs = [(arm, references[(arm.objective_label, arm.variant, _without(arm.sweep, key))]) for arm in swept
                 if (arm.objective_label, arm.variant, _without(arm.sweep, key)) in references]
        pairs.sort(key=lambda p: (order.get(grid.arm_rows[p[1]], len(order)), order.get(grid.arm_rows[p[0]], len(order))))
        for headline in headlines(layout, grid):
            for arm, base in pairs:
                n, test, per_seed = seed_comparison(_composite(grid, arm, headline), _composite(grid, base, headline))
                if not n:
                    continue
                label = (grid.arm_rows[arm], grid.arm_rows[base])
                if label not in contrast.pairs:
                    contrast.pairs.append(label)
                if headline not in contrast.headlines:
                    contrast.headlines.append(headline)
                contrast.cells[(label, headline)] = ContrastCell(n, test, per_seed)
        tested = [c for (_, headline), c in contrast.cells.items()
                  if headline.tested and c.test is not None and c.test.p is not None]
        for cell, adjusted in zip(tested, holm([c.test.p for c in tested])):
            cell.p_holm = adjusted
        out.append(contrast)
    return out
