"""Figures: CR@k / MOR@k curves per objective with and without R (the paper's Fig. 5), and k sweeps."""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlkd.bench.tables import Grid  # noqa: E402

REFERENCE_STYLE = {"Teacher": "black", "Start": "grey"}  # evaluation-only rows, dotted
_AT_K = re.compile(r"^(?P<task>[^/|:]+)/(?P<prefix>[a-z_]*?)(?P<metric>cr|mor)@(?P<k>\d+)$")
_SWEEP = re.compile(r"^(?P<base>[^|]+)\|k=(?P<k>\d+)$")


def _base_objective(row: str) -> tuple[str, bool]:
    for suffix in ("+R (Dynamic)", "+R (Pearson)", "+R"):
        if suffix in row:
            return row.replace(suffix, "", 1), True
    return row, False


def curve_series(grid: Grid, prefix: str = "") -> dict[tuple[str, str], dict[int, float]]:
    """{(row, "cr" | "mor"): {k: mean}} for the columns with this metric prefix."""
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (row, column) in grid.values:
        match = _AT_K.match(column)
        if not match or match["prefix"] != prefix:
            continue
        series[(row, match["metric"])][int(match["k"])] = grid.estimate(row, column).mean
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
    objectives = sorted({_base_objective(row)[0] for row, _ in series} - set(REFERENCE_STYLE))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(objectives)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, label in ((axes[0], "cr", "CR@k (%)"), (axes[1], "mor", "MOR@k (%)")):
        for (row, m), points in sorted(series.items()):
            if m != metric:
                continue
            base, ranked = _base_objective(row)
            ks = sorted(points)
            if base in REFERENCE_STYLE:
                style = dict(color=REFERENCE_STYLE[base], linestyle=":")
            elif base.startswith("Rank-"):
                style = dict(color=colours[base], linestyle="-.")
            else:
                style = dict(color=colours[base], linestyle="-" if ranked else "--")
            ax.plot(ks, [points[k] for k in ks], marker="o", label=row, **style)
            ax.set_xticks(ks)
        ax.set_xlabel("k")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
            break
    fig.suptitle(textwrap.fill(title or "Top-k agreement", 110), fontsize=10)
    return _save(fig, out_path)


def k_sweep(grid: Grid, out_path: Path, title: str = "") -> Path | None:
    """Metric against the ranking range k, one line per row (Table 5 / k sweeps)."""
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (row, column) in grid.values:
        match = _SWEEP.match(column)
        if match:
            series[(row, match["base"])][int(match["k"])] = grid.estimate(row, column).mean
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
    ax.set_title(title or "k sweep")
    return _save(fig, out_path)


def _save(fig, out_path: Path) -> Path:
    """Lay out, write beside the target and rename into place (no half-written PNG)."""
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
