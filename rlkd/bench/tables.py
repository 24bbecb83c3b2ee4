"""Results directory -> tables beside the paper: Markdown, CSV and LaTeX.

Each (row, column) aggregates the seeds of the cells that land there: mean ± the half-width of the
95% Student-t interval when there are several seeds. The paper's number and ours − paper sit in
adjacent columns. The best row of each column (lowest for PPL/time, highest otherwise; reference
rows such as Teacher excluded) is marked. A second table gives the ±R effects: for every row X
with a row X+R (also X+R (Dynamic), X+R (Pearson)) and each column, the paired t-test over the
seeds both rows share.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlkd.bench.layouts import HIDDEN_METRICS, Column, Layout, Section
from rlkd.bench.stats import Estimate, PairedTest, mean_ci, paired_t

RANKED_SUFFIXES = ("+R", "+R (Dynamic)", "+R (Pearson)")


@dataclass
class Grid:
    """Values per (row, column) keyed by seed, in first-seen row order."""

    rows: list[str] = field(default_factory=list)
    values: dict[tuple[str, str], dict[Any, float]] = field(default_factory=lambda: defaultdict(dict))
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell id, error)

    def add(self, row: str, column: str, seed: Any, value: float) -> None:
        if row not in self.rows:
            self.rows.append(row)
        self.values[(row, column)][seed] = value

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for _, column in self.values:
            seen.setdefault(column, None)
        return list(seen)

    def estimate(self, row: str, column: str) -> Estimate | None:
        found = self.values.get((row, column))
        return mean_ci(list(found.values())) if found else None


def collect(cells: list[dict[str, Any]], layout: Layout) -> Grid:
    grid = Grid()
    for entry in cells:
        config = entry["config"]
        if entry["status"].get("status") != "done":
            grid.failed.append((config["id"], entry["status"].get("error", "")))
            continue
        for row, column, value in layout.entries(config, entry["metrics"]):
            grid.add(row, column, config.get("seed"), value)
    return grid


@dataclass
class RenderedTable:
    title: str
    rows: list[str]
    columns: list[Column]
    estimates: dict[tuple[str, str], Estimate]
    paper: dict[tuple[str, str], float]
    best: set[tuple[str, str]]


def _sections(layout: Layout, grid: Grid) -> list[Section]:
    present = {c for c in grid.columns() if not HIDDEN_METRICS.search(c)}
    if not layout.sections:
        return [Section("", [Column(c, c) for c in sorted(present)])]
    sections = []
    for section in layout.sections:
        kept = [c for c in section.columns if c.key in present]
        if kept:
            sections.append(Section(section.title, kept))
    listed = {c.key for s in layout.sections for c in s.columns}
    others = sorted(present - listed)
    if others:
        sections.append(Section("Other metrics", [Column(c, c) for c in others]))
    return sections


def _row_order(layout: Layout, grid: Grid) -> list[str]:
    paper_rows = layout.paper_rows() if not layout.split_by_correlation else []
    ordered = [r for r in paper_rows if r in grid.rows]
    rest = [r for r in grid.rows if r not in ordered]
    # Reference rows first, then each objective followed by its ranked variants.
    rest.sort(key=lambda r: (r not in layout.reference_rows, _base_of(r), r))
    return ordered + rest


def _base_of(row: str) -> str:
    for suffix in RANKED_SUFFIXES[::-1]:
        if suffix in row:
            return row.replace(suffix, "", 1)
    return row


def build_tables(layout: Layout, grid: Grid) -> list[RenderedTable]:
    rows = _row_order(layout, grid)
    tables = []
    for section in _sections(layout, grid):
        estimates, paper, best = {}, {}, set()
        for column in section.columns:
            for row in rows:
                est = grid.estimate(row, column.key)
                if est is not None:
                    estimates[(row, column.key)] = est
                value = layout.paper_value(row, column.key)
                if value is not None:
                    paper[(row, column.key)] = value
            candidates = [(estimates[(r, column.key)].mean, r) for r in rows
                          if (r, column.key) in estimates and r not in layout.reference_rows]
            if candidates:
                pick = min if column.lower_is_better else max
                target = pick(v for v, _ in candidates)
                best |= {(r, column.key) for v, r in candidates if v == target}
        used_rows = [r for r in rows if any((r, c.key) in estimates for c in section.columns)]
        title = layout.title + (f" — {section.title}" if section.title else "")
        tables.append(RenderedTable(title, used_rows, section.columns, estimates, paper, best))
    return tables


@dataclass
class Effect:
    base_row: str
    ranked_row: str
    column: Column
    test: PairedTest
    seeds: int


def ranking_effects(layout: Layout, grid: Grid) -> list[Effect]:
    """Paired ±R comparisons over the seeds the two rows share."""
    effects = []
    columns = [c for s in _sections(layout, grid) for c in s.columns]
    for ranked in grid.rows:
        for suffix in RANKED_SUFFIXES:
            if not ranked.endswith(suffix) and f"{suffix} [" not in ranked:
                continue
            base = ranked.replace(suffix, "", 1)
            if base not in grid.rows:
                continue
            for column in columns:
                with_r = grid.values.get((ranked, column.key), {})
                without = grid.values.get((base, column.key), {})
                seeds = sorted(set(with_r) & set(without), key=str)
                if seeds:
                    test = paired_t([with_r[s] for s in seeds], [without[s] for s in seeds])
                    effects.append(Effect(base, ranked, column, test, len(seeds)))
    return effects


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def _paper_cells(table: RenderedTable, row: str, key: str, est: Estimate | None) -> list[str]:
    """The paper's value and ours − paper, as printed beside our number."""
    paper = table.paper.get((row, key))
    return [_fmt(paper), _fmt(est.mean - paper) if est is not None and paper is not None else ""]


def _ours(est: Estimate | None) -> str:
    if est is None:
        return ""
    if est.half_width is None:
        return _fmt(est.mean)
    return f"{_fmt(est.mean)} ± {_fmt(est.half_width)}"


def _seed_counts(table: RenderedTable) -> set[int]:
    return {e.n for e in table.estimates.values()}


def render_markdown(tables: list[RenderedTable], effects: list[Effect], failed: list[tuple[str, str]]) -> str:
    out = []
    for table in tables:
        with_paper = bool(table.paper)
        out.append(f"### {table.title}\n")
        seeds = sorted(_seed_counts(table))
        out.append(f"Ours: mean over seeds (n = {', '.join(map(str, seeds))})"
                   + (", ± half-width of the 95% t-interval" if max(seeds, default=1) > 1 else "")
                   + "; **bold** = best of our rows in the column (Teacher/Start excluded)."
                   + (" `paper` = the paper's value, `Δ` = ours − paper." if with_paper else "") + "\n")
        header = ["Method"]
        for column in table.columns:
            header += [column.header] + (["paper", "Δ"] if with_paper else [])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for row in table.rows:
            cells = [row]
            for column in table.columns:
                est = table.estimates.get((row, column.key))
                text = _ours(est)
                if text and (row, column.key) in table.best:
                    text = f"**{text}**"
                cells.append(text)
                if with_paper:
                    cells += _paper_cells(table, row, column.key, est)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if effects:
        out.append("### Effect of the ranking loss (paired over seeds)\n")
        out.append("Δ = (with R) − (without R), mean over the seeds both rows have; CI = 95% t-interval of the "
                   "paired differences; p = two-sided paired t-test (scipy.stats.ttest_rel). With one seed "
                   "there is no test.\n")
        out.append("| Comparison | Metric | n | Δ | 95% CI | t | p |")
        out.append("|---|---|---|---|---|---|---|")
        for effect in effects:
            d = effect.test.diff
            ci = f"[{_fmt(d.low)}, {_fmt(d.high)}]" if d.half_width is not None else ""
            t = _fmt(effect.test.t) if effect.test.t is not None else ""
            p = f"{effect.test.p:.3g}" if effect.test.p is not None else ""
            out.append(f"| {effect.ranked_row} vs {effect.base_row} | {effect.column.header} | {effect.seeds} "
                       f"| {_fmt(d.mean)} | {ci} | {t} | {p} |")
        out.append("")
    if failed:
        out.append("### Failed cells (not in the tables)\n")
        out += [f"- `{cell_id}`: {error.splitlines()[0] if error else ''}" for cell_id, error in failed]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[RenderedTable]) -> str:
    """One line per (table, row, column): machine-readable, paper value and difference included."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "row", "column", "header", "n", "mean", "sd", "ci95_low", "ci95_high", "paper",
                     "diff_vs_paper", "best"])
    for table in tables:
        for row in table.rows:
            for column in table.columns:
                est = table.estimates.get((row, column.key))
                paper = table.paper.get((row, column.key))
                if est is None and paper is None:
                    continue
                writer.writerow([
                    table.title, row, column.key, column.header,
                    est.n if est else 0,
                    repr(est.mean) if est else "",
                    repr(est.sd) if est and est.sd is not None else "",
                    repr(est.low) if est and est.low is not None else "",
                    repr(est.high) if est and est.high is not None else "",
                    repr(paper) if paper is not None else "",
                    repr(est.mean - paper) if est and paper is not None else "",
                    int((row, column.key) in table.best),
                ])
    return buffer.getvalue()


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "↓": r"$\downarrow$",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "{": r"\{", "}": r"\}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def render_latex(tables: list[RenderedTable]) -> str:
    out = ["% Generated by `rlkd table`; needs \\usepackage{booktabs}."]
    for table in tables:
        with_paper = bool(table.paper)
        per = 3 if with_paper else 1
        out.append("\\begin{table}[t]\\centering\\small")
        out.append(f"\\caption{{{_tex(table.title)}}}")
        out.append("\\begin{tabular}{l" + ("r" * per * len(table.columns)) + "}")
        out.append("\\toprule")
        if with_paper:
            out.append(" & " + " & ".join(f"\\multicolumn{{3}}{{c}}{{{_tex(c.header)}}}" for c in table.columns)
                       + " \\\\")
            out.append("Method & " + " & ".join(["ours & paper & $\\Delta$"] * len(table.columns)) + " \\\\")
        else:
            out.append("Method & " + " & ".join(_tex(c.header) for c in table.columns) + " \\\\")
        out.append("\\midrule")
        for row in table.rows:
            cells = [_tex(row)]
            for column in table.columns:
                est = table.estimates.get((row, column.key))
                text = ""
                if est is not None:
                    text = _fmt(est.mean) + (f"$\\pm${_fmt(est.half_width)}" if est.half_width is not None else "")
                    if (row, column.key) in table.best:
                        text = f"\\textbf{{{text}}}"
                cells.append(text)
                if with_paper:
                    cells += _paper_cells(table, row, column.key, est)
            out.append(" & ".join(cells) + " \\\\")
        out.append("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    return "\n".join(out)


def write_tables(results_dir: Path, layout: Layout, cells: list[dict[str, Any]], out_dir: Path | None = None) -> dict[str, Path]:
    from rlkd.bench.store import write_text_atomic

    out_dir = out_dir or results_dir
    grid = collect(cells, layout)
    tables = build_tables(layout, grid)
    effects = ranking_effects(layout, grid)
    paths = {"md": out_dir / "table.md", "csv": out_dir / "table.csv", "tex": out_dir / "table.tex"}
    write_text_atomic(paths["md"], render_markdown(tables, effects, grid.failed))
    write_text_atomic(paths["csv"], render_csv(tables))
    write_text_atomic(paths["tex"], render_latex(tables))
    return paths
