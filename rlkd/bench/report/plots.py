"""Figures: CR@k / MOR@k curves per objective with and without R (the paper's Fig. 5), k sweeps, and
the forest plot of the ranking loss's effect."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlkd.bench.report.effects import EXAMPLES, NONE, RANKED_VARIANTS, SEEDS, Verdict  # noqa: E402
from rlkd.bench.report.grid import Grid  # noqa: E402
from rlkd.bench.report.layouts import at_k  # noqa: E402

REFERENCE_STYLE = {"Teacher": "black", "Start": "grey"}  # evaluation-only rows, dotted


def _row_kinds(grid: Grid) -> dict[str, tuple[str, str]]:
    """{row: (colour group, "ranked" | "plain" | "rank_only" | "reference")}, from the cells'
    fields (a user's label may contain "+R"); rows without fields are reference models."""
    kinds = {}
    for arm, row in grid.arm_rows.items():
        if arm.variant in RANKED_VARIANTS:
            kinds.setdefault(row, (arm.objective_label or row, "ranked"))
        elif arm.variant is not None and arm.variant.startswith("rank_only"):
            kinds.setdefault(row, (row, "rank_only"))
        elif arm.variant is not None:
            kinds.setdefault(row, (arm.objective_label or row, "plain"))
    return kinds


def curve_series(grid: Grid, prefix: str = "") -> dict[tuple[str, str], dict[int, float]]:
    """{(row, "cr" | "mor"): {k: mean}} for the columns with this metric prefix."""
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (row, column) in grid.values:
        key = grid.keys[column]
        found = at_k(key.metric) if key.sweep is None and key.correlation is None else None
        if found is None or found.prefix != prefix:
            continue
        series[(row, found.family)][found.k] = grid.estimate(row, column).mean
    # A model scored against itself (the teacher against the teacher) is 100 everywhere: it says
    # nothing and would squeeze every other curve into the bottom of the axes.
    identical = {row for row, _ in series if all(v == 100.0 for (r, _), pts in series.items() if r == row
                                                 for v in pts.values())}
    return {key: points for key, points in series.items() if key[0] not in identical}


def alignment_curves(grid: Grid, out_path: Path, prefix: str = "", title: str = "") -> Path | None:
    """CR@k (left) and MOR@k (right) against k; one colour per objective, dashed without R."""
    series = curve_series(grid, prefix)
    if not series:
        return None
    kinds = _row_kinds(grid)
    kind = lambda row: kinds.get(row, (row, "reference"))  # noqa: E731
    objectives = sorted({kind(row)[0] for row, _ in series if kind(row)[1] != "reference"})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(objectives)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, label in ((axes[0], "cr", "CR@k (%)"), (axes[1], "mor", "MOR@k (%)")):
        for (row, m), points in sorted(series.items()):
            if m != metric:
                continue
            group, how = kind(row)
            ks = sorted(points)
            if how == "reference":
                style = dict(color=REFERENCE_STYLE.get(row, "black"), linestyle=":")
            elif how == "rank_only":
                style = dict(color=colours[group], linestyle="-.")
            else:
                style = dict(color=colours[group], linestyle="-" if how == "ranked" else "--")
            ax.plot(ks, [points[k] for k in ks], marker="o", label=row, **style)
            ax.set_xticks(ks)
        ax.set_xlabel("k")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
            break
    fig.suptitle(_fitted(title or "Top-k agreement", fig, 10), fontsize=10)
    return _save(fig, out_path)


def k_sweep(grid: Grid, out_path: Path, title: str = "") -> Path | None:
    """Metric against the ranking range k, one line per row (Table 5 / k sweeps)."""
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (row, column) in grid.values:
        key = grid.keys[column]
        if key.sweep is not None and key.sweep[0] == "k" and str(key.sweep[1]).isdigit():
            series[(row, key.without_sweep().text)][int(key.sweep[1])] = grid.estimate(row, column).mean
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (row, base), points in sorted(series.items()):
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=f"{row} ({base})")
    ax.set_xlabel("ranking range k")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_fitted(title or "k sweep", fig, 12), fontsize=12)
    return _save(fig, out_path)


def _fitted(text: str, fig, fontsize: float) -> str:
    """``text`` wrapped to the figure's width, so that a long spec title is never cut off at the
    edges: a line holds as many characters as the width fits at 0.6 em each (DejaVu Sans averages
    about 0.5 em over mixed-case text)."""
    return textwrap.fill(text, max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize))))


def _save(fig, out_path: Path, layout: bool = True) -> Path:
    """Lay out, write beside the target and rename into place (no half-written PNG)."""
    if layout:
        fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path


# Forest plot colours: the interval clears 0 on the better side / on the worse side / neither.
_VERDICT_COLOURS = {True: "#1a7f37", False: "#cf222e", None: "#57606a"}


def forest_plot(result: Verdict, out_path: Path, title: str = "") -> Path | None:
    """Δ(+R) with its interval, one panel per headline metric, one line per comparison, a zero
    line; green/red where the interval clears 0 on the better/worse side; under the comparisons the
    pooled random-effects mean (diamond) and the paper's mean Δ over the same pairs (cross)."""
    if not result.cells:
        return None
    pairs = [p for p in result.pairs if any(q == p for q, _ in result.cells)]
    rows = len(pairs) + (1 if result.pooled else 0)
    width = 3.3 * len(result.headlines) + 1.6
    height = 0.42 * rows + 1.9
    fig, axes = plt.subplots(1, len(result.headlines), figsize=(width, height), sharey=True, squeeze=False)
    positions = {pair: rows - 1 - i for i, pair in enumerate(pairs)}  # first comparison on top, pooled last
    for ax, headline in zip(axes[0], result.headlines):
        ax.axvline(0.0, color="black", linewidth=0.8)
        for pair in pairs:
            cell = result.cells.get((pair, headline))
            if cell is None:
                continue
            y = positions[pair]
            colour = _VERDICT_COLOURS[cell.improves]
            if cell.interval == NONE:
                # Too few seeds for an interval: show each seed's difference, hollow.
                ax.plot(list(cell.per_seed.values()), [y] * cell.n_seeds, "o", mfc="none", color=colour)
                continue
            ax.errorbar([cell.mean], [y], xerr=[[cell.mean - cell.low], [cell.high - cell.mean]],
                        fmt="s" if cell.interval == EXAMPLES else "o", color=colour, capsize=3,
                        linestyle="none", elinewidth=1.6)
            ax.annotate(f"{cell.mean:+#.3g}", (cell.mean, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color=colour)
        pooled = result.pooled.get(headline)
        if pooled is not None:
            e = pooled.effect
            clears = (e.high < 0 if headline.lower_is_better else e.low > 0) or None
            if clears is None and (e.low > 0 if headline.lower_is_better else e.high < 0):
                clears = False
            colour = _VERDICT_COLOURS[clears]
            ax.errorbar([e.mean], [0], xerr=[[e.mean - e.low], [e.high - e.mean]], fmt="D", color=colour,
                        capsize=3, linestyle="none", elinewidth=1.6)
            ax.annotate(f"{e.mean:+#.3g}", (e.mean, 0), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7, color=colour)
            if pooled.paper_mean is not None:
                ax.plot([pooled.paper_mean], [0], "x", color="black", markersize=7)
        better = "← better" if headline.lower_is_better else "better →"
        ax.set_title(f"{headline.header}\n({better})", fontsize=9)
        ax.set_xlabel("Δ(+R)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    labels = ([f"pooled ({max(len(p.pairs) for p in result.pooled.values())} pairs)"] if result.pooled else []) \
        + [p.label for p in reversed(pairs)]
    axes[0][0].set_yticks(range(rows))
    axes[0][0].set_yticklabels(labels, fontsize=9)
    axes[0][0].set_ylim(-0.7, rows - 0.3)
    used = result.intervals_used()
    legend = []
    if SEEDS in used:
        legend.append("● 95% t-interval over seeds")
    if EXAMPLES in used:
        legend.append("■ 95% bootstrap interval over evaluation rows (fewer than 3 seeds: not a test over seeds)")
    if NONE in used:
        legend.append("○ per-seed differences (too few seeds for an interval)")
    if result.pooled:
        legend.append("◆ random-effects mean over the pairs, 95% interval")
        if any(p.paper_mean is not None for p in result.pooled.values()):
            legend.append("× the paper's mean Δ over the same pairs")
    legend.append("green/red: interval clears 0 on the better/worse side")
    fig.suptitle(_fitted(title or "Effect of the ranking loss", fig, 10), fontsize=10)
    fig.text(0.5, 0.005, _fitted("   ".join(legend), fig, 7.5), ha="center", va="bottom", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.06 + 0.1 / max(1, len(pairs)), 1, 1))
    return _save(fig, out_path, layout=False)
