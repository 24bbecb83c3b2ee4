"""Results directory -> tables beside the paper: Markdown, CSV and LaTeX.

Every output opens with the verdict: the effect of the ranking loss, Δ(+R) per objective and
headline metric with its interval and Holm-adjusted p (``rlkd/bench/report/effects.py``). Then each
(row, column) aggregates the seeds of the cells that land there: mean ± the half-width of the 95%
Student-t interval when there are several seeds. The paper's number and ours − paper sit in
adjacent columns. The best row of each column (lowest for PPL/time, highest otherwise; reference
rows such as Teacher excluded) is marked. Last, every per-metric paired ±R t-test.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlkd.bench.report.effects import (EXAMPLES, MIN_SEEDS_FOR_INTERVAL, NONE, RANKED_VARIANTS, Contrast, ContrastCell,
                                       Effect, Pooled, Verdict, VerdictCell, method_sentence, ranking_effects,
                                       sweep_contrasts, verdict)
from rlkd.bench.report.grid import Grid, collect
from rlkd.bench.report.layouts import Column, Layout
from rlkd.bench.records import Cell, CellResult, Provenance
from rlkd.bench.report.stats import Estimate

__all__ = ["Grid", "collect", "build_tables", "ranking_effects", "verdict", "write_tables"]


@dataclass
class RenderedTable:
    title: str
    rows: list[str]
    columns: list[Column]
    estimates: dict[tuple[str, str], Estimate]
    paper: dict[tuple[str, str], float]
    best: set[tuple[str, str]]


def row_order(layout: Layout, grid: Grid) -> list[str]:
    paper_rows = layout.paper_rows() if not layout.split_by_correlation else []
    ordered = [r for r in paper_rows if r in grid.rows]
    # Reference rows first, then each objective followed by its ranked variants (by the cells'
    # fields: a row's objective label and variant, not its text).
    variant_rank = {v: i for i, v in enumerate(("none",) + RANKED_VARIANTS)}
    fields = {}
    for arm, row in grid.arm_rows.items():
        fields.setdefault(row, (arm.objective_label or row, variant_rank.get(arm.variant, len(variant_rank))))
    rest = [r for r in grid.rows if r not in ordered]
    rest.sort(key=lambda r: (r not in layout.reference_rows, *fields.get(r, (r, 0)), r))
    return ordered + rest


def build_tables(layout: Layout, grid: Grid) -> list[RenderedTable]:
    rows = row_order(layout, grid)
    tables = []
    for section in layout.present_sections(grid.columns()):
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


def _interval_shown(est: Estimate) -> bool:
    """A t-interval from one or two seeds (1 df: ±12.7 standard errors) says nothing; it is not printed."""
    return est.half_width is not None and est.n >= MIN_SEEDS_FOR_INTERVAL


def _interval_caption(seeds: list[int]) -> str:
    few, most = min(seeds, default=1), max(seeds, default=1)
    if most >= MIN_SEEDS_FOR_INTERVAL:
        return ", ± half-width of the 95% t-interval" + (
            f" (none with fewer than {MIN_SEEDS_FOR_INTERVAL} seeds)" if few < MIN_SEEDS_FOR_INTERVAL else "")
    return f" (no interval: fewer than {MIN_SEEDS_FOR_INTERVAL} seeds)" if most > 1 else ""


def _ours(est: Estimate | None) -> str:
    if est is None:
        return ""
    if not _interval_shown(est):
        return _fmt(est.mean)
    return f"{_fmt(est.mean)} ± {_fmt(est.half_width)}"


def _seed_counts(table: RenderedTable) -> set[int]:
    return {e.n for e in table.estimates.values()}


VERDICT_TITLE = "Effect of the ranking loss"


def _signed(value: float | None, digits: int = 2) -> str:
    return "" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def _p_text(p: float | None, bound: bool = False) -> str:
    """p as printed; ``bound``: a bootstrap p at its floor (no resample as extreme), printed "p < x"."""
    if p is None:
        return ""
    if bound:  # rounded up: the printed number must stay an upper bound
        exponent = math.floor(math.log10(p))
        mantissa = math.ceil(round(p / 10 ** exponent, 9))
        if mantissa == 10:
            mantissa, exponent = 1, exponent + 1
        return f"p < {mantissa}e{exponent:+03d}" if p < 0.001 else f"p < {math.ceil(p * 1000 - 1e-9) / 1000:.3f}"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def _rows_text(cell: VerdictCell) -> str:
    """The bootstrap over evaluation rows: its interval, and its secondary-family p on tested headlines;
    *italic* where that adjusted p < 0.05."""
    mark = "†" if cell.interval == EXAMPLES else ""
    text = f"rows{mark} [{_signed(cell.rows.low)}, {_signed(cell.rows.high)}]"
    if cell.rows_p_holm is None:
        return text
    text += f", {_p_text(cell.rows_p_holm, cell.rows_p_bound)}"
    return f"*{text}*" if cell.rows_p_holm < 0.05 else text


def verdict_cell_text(cell: VerdictCell | None) -> str:
    """With >= 3 seeds: Δ [t-interval] (p Holm, primary family), then the rows' bootstrap (secondary
    family); with fewer: Δ, then the rows' bootstrap marked † (it does not test the seed effect);
    without either, the per-seed differences."""
    if cell is None:
        return ""
    if cell.interval == NONE:
        return ", ".join(_signed(d) for d in cell.per_seed.values()) + " (per seed)"
    if cell.interval == EXAMPLES:
        return f"{_signed(cell.mean)}; {_rows_text(cell)}"
    text = f"{_signed(cell.mean)} [{_signed(cell.low)}, {_signed(cell.high)}]"
    if cell.p_holm is not None:
        text += f", {_p_text(cell.p_holm)}"
    text = f"**{text}**" if cell.p_holm is not None and cell.p_holm < 0.05 else text
    if cell.rows is not None:  # how much Δ moves with the evaluation rows
        text += f"; {_rows_text(cell)}"
    return text


POOLED_LABEL = "Pooled, all objectives"


def pooled_cell_text(pooled: Pooled | None) -> str:
    """Random-effects mean [95% interval], p for mean = 0; τ², I²; the paper's mean and p for ours = it."""
    if pooled is None:
        return ""
    effect = pooled.effect
    text = f"{_signed(effect.mean)} [{_signed(effect.low)}, {_signed(effect.high)}]"
    if pooled.headline.tested:
        text += f", {_p_text(effect.p)}"
    text += f"; τ² = {effect.tau2:.3g}, I² = {100 * effect.i2:.1f}%"
    if pooled.paper_mean is not None:
        over = ("" if pooled.paper_pairs == len(pooled.pairs)
                else f" ({pooled.paper_pairs} of {len(pooled.pairs)} pairs)")
        text += f"; paper {_signed(pooled.paper_mean)}{over}"
        if pooled.p_paper is not None:
            text += f", ours = paper: {_p_text(pooled.p_paper)}"
    return text


def _pooled_label(result: Verdict) -> str:
    ks = sorted({len(p.pairs) for p in result.pooled.values()})
    return f"{POOLED_LABEL} (random effects, {'/'.join(map(str, ks))} pairs)"


def _pooled_seeds(result: Verdict) -> str:
    counts = sorted({c.n_seeds for c in result.cells.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _seed_span(result: Verdict, pair) -> str:
    counts = sorted({c.n_seeds for (p, _), c in result.cells.items() if p == pair})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def render_verdict_markdown(result: Verdict, without_fields: list[str] = ()) -> list[str]:
    out = [f"### {VERDICT_TITLE}\n"]
    if without_fields:
        # Pairing reads the cells' fields; guessing from labels would pair a "+R" user label wrongly.
        out.append(f"{len(without_fields)} trained cell(s) lack the `objective_label`/`variant` fields (written by "
                   "an older rlkd) and are left out of it: add the fields to their `config.json` or rerun them.\n")
    if not result.cells:
        out.append("No ±R comparison here: no objective has cells both with and without the ranking loss.\n")
        return out
    header = ["Comparison", "seeds"] + [h.header for h in result.headlines]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for pair in result.pairs:
        if not any(p == pair for p, _ in result.cells):
            continue
        cells = [pair.label, _seed_span(result, pair)]
        cells += [verdict_cell_text(result.cells.get((pair, h))) for h in result.headlines]
        out.append("| " + " | ".join(cells) + " |")
    if result.pooled:
        cells = [f"**{_pooled_label(result)}**", _pooled_seeds(result)]
        cells += [pooled_cell_text(result.pooled.get(h)) for h in result.headlines]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(method_sentence(result) + "\n")
    return out


def contrast_cell_text(cell: ContrastCell | None) -> str:
    """Δ [t-interval], Holm p (bold where < 0.05); with fewer seeds the per-seed differences."""
    if cell is None:
        return ""
    if cell.test is None:
        return ", ".join(_signed(d) for d in cell.per_seed) + " (per seed)"
    d = cell.test.diff
    text = f"{_signed(d.mean)} [{_signed(d.low)}, {_signed(d.high)}]"
    if cell.p_holm is not None:
        text += f", {_p_text(cell.p_holm)}"
    return f"**{text}**" if cell.p_holm is not None and cell.p_holm < 0.05 else text


def render_contrast_markdown(contrast: Contrast) -> list[str]:
    if not contrast.pairs:
        return []
    reference = "null" if contrast.reference is None else contrast.reference
    out = [f"### {contrast.title}\n",
           f"Δ = (the row) − (the same row with {contrast.sweep} = {reference}), per seed then averaged over the "
           f"seeds both have; with ≥ {MIN_SEEDS_FOR_INTERVAL} seeds the 95% t-interval and the paired t-test's p, "
           "Holm-adjusted over this table's tested cells (**bold**: < 0.05).\n",
           "| Comparison | seeds | " + " | ".join(h.header for h in contrast.headlines) + " |",
           "|---|---|" + "---|" * len(contrast.headlines)]
    for pair in contrast.pairs:
        cells = [contrast.cells.get((pair, h)) for h in contrast.headlines]
        seeds = sorted({c.seeds for c in cells if c is not None})
        out.append(f"| {pair[0]} − {pair[1]} | {', '.join(map(str, seeds))} | "
                   + " | ".join(contrast_cell_text(c) for c in cells) + " |")
    return out + [""]


def render_markdown(tables: list[RenderedTable], effects: list[Effect], failed: list[tuple[str, str]],
                    result: Verdict | None = None, notes: list[str] = (), without_fields: list[str] = (),
                    contrasts: list[Contrast] = ()) -> str:
    out = render_verdict_markdown(result, without_fields) if result is not None else []
    for contrast in contrasts:
        out += render_contrast_markdown(contrast)
    for table in tables:
        with_paper = bool(table.paper)
        out.append(f"### {table.title}\n")
        seeds = sorted(_seed_counts(table))
        out.append(f"Ours: mean over seeds (n = {', '.join(map(str, seeds))})"
                   + _interval_caption(seeds)
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
        tested = sum(e.p_holm is not None for e in effects)
        out.append("### Every metric: paired ±R t-tests over seeds\n")
        out.append("Δ = (with R) − (without R), mean over the seeds both rows have; CI = 95% t-interval of the "
                   "paired differences; p = two-sided paired t-test (scipy.stats.ttest_rel)"
                   + (f"; p (Holm) = adjusted over the {tested} tests of this list" if tested else "")
                   + f". With fewer than {MIN_SEEDS_FOR_INTERVAL} seeds there is "
                   "no test: the CI column lists the per-seed differences.\n")
        out.append("| Comparison | Metric | n | Δ | 95% CI | t | p | p (Holm) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for effect in effects:
            if effect.test is None:
                mean = math.fsum(effect.per_seed) / len(effect.per_seed)
                ci, t, p = "per seed: " + ", ".join(_fmt(d) for d in effect.per_seed), "", ""
            else:
                d = effect.test.diff
                mean = d.mean
                ci = f"[{_fmt(d.low)}, {_fmt(d.high)}]" if d.half_width is not None else ""
                t = _fmt(effect.test.t) if effect.test.t is not None else ""
                p = f"{effect.test.p:.3g}" if effect.test.p is not None else ""
            p_holm = f"{effect.p_holm:.3g}" if effect.p_holm is not None else ""
            out.append(f"| {effect.ranked_row} vs {effect.base_row} | {effect.column.header} | {effect.seeds} "
                       f"| {_fmt(mean)} | {ci} | {t} | {p} | {p_holm} |")
        out.append("")
    if notes:
        out.append("### Notes\n")
        out += [f"- {note}" for note in notes]
        out.append("")
    if failed:
        out.append("### Failed cells (not in the tables)\n")
        out += [f"- `{cell_id}`: {error.splitlines()[0] if error else ''}" for cell_id, error in failed]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[RenderedTable], result: Verdict | None = None, contrasts: list[Contrast] = ()) -> str:
    """One line per (table, row, column): machine-readable, paper value and difference included.
    The verdict's lines come first (table = "Effect of the ranking loss", mean = Δ(+R), `interval`
    = seeds | examples | none, `p`, `p_holm` of the primary family (seed t-tests), `se` the standard
    error the pooled row used, `rows_*` the bootstrap over evaluation rows with its secondary-family
    `rows_p_holm` (`rows_p_bound` = 1: only an upper bound, the floor), then the pooled rows
    (`interval` = random_effects_dl, `paper` = the paper's mean Δ, `p_vs_paper`); the other tables
    leave those columns empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "row", "column", "header", "n", "mean", "sd", "ci95_low", "ci95_high", "paper",
                     "diff_vs_paper", "best", "interval", "p", "p_holm", "se", "rows_low", "rows_high", "rows_p",
                     "rows_p_holm", "rows_p_bound", "tau2", "i2", "p_vs_paper"])
    number = lambda v: repr(v) if v is not None else ""  # noqa: E731
    for (pair, headline), cell in (result.cells.items() if result is not None else ()):
        rows = cell.rows
        writer.writerow([VERDICT_TITLE, pair.label, "+".join(headline.keys), headline.header, cell.n_seeds,
                         repr(cell.mean), "", number(cell.low), number(cell.high), "", "", "", cell.interval,
                         number(cell.p), number(cell.p_holm), number(cell.se),
                         number(rows and rows.low), number(rows and rows.high), number(rows and rows.p),
                         number(cell.rows_p_holm), int(cell.rows_p_bound) if cell.rows_p_holm is not None else "",
                         "", "", ""])
    for headline, pooled in (result.pooled.items() if result is not None else ()):
        e = pooled.effect
        writer.writerow([VERDICT_TITLE, f"{POOLED_LABEL} ({e.k} pairs)", "+".join(headline.keys), headline.header,
                         e.k, repr(e.mean), "", repr(e.low), repr(e.high), number(pooled.paper_mean),
                         number(None if pooled.paper_mean is None else e.mean - pooled.paper_mean), "",
                         "random_effects_dl", repr(e.p) if headline.tested else "", "", repr(e.se), "", "", "", "",
                         "", repr(e.tau2), repr(e.i2), number(pooled.p_paper)])
    for contrast in contrasts:  # interval = seeds (t-interval, p, p_holm within the contrast) or none
        for ((row, reference), headline), cell in contrast.cells.items():
            d = cell.test.diff if cell.test is not None else None
            writer.writerow([contrast.title, f"{row} − {reference}", "+".join(headline.keys), headline.header,
                             cell.seeds, repr(cell.mean), "",
                             number(d and d.low), number(d and d.high), "", "", "",
                             "seeds" if cell.test is not None else "none", number(cell.test and cell.test.p),
                             number(cell.p_holm)] + [""] * 9)
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
                    int((row, column.key) in table.best), "", "", "",
                ] + [""] * 9)
    return buffer.getvalue()


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "↓": r"$\downarrow$",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "{": r"\{", "}": r"\}",
                  "−": "$-$", "–": "--", "†": r"$^\dagger$", "≥": r"$\geq$", "‖": r"$\|$", "<": "$<$",
                  "τ": r"$\tau$", "²": r"$^2$", "√": r"$\surd$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _tex_markup(text: str) -> str:
    """A verdict cell's Markdown (**bold** primary, *italic* secondary) as LaTeX."""
    parts = re.split(r"(\*\*[^*]+\*\*|\*[^*]+\*)", text)
    out = []
    for part in parts:
        if part.startswith("**"):
            out.append(f"\\textbf{{{_tex(part[2:-2])}}}")
        elif part.startswith("*") and len(part) > 1:
            out.append(f"\\textit{{{_tex(part[1:-1])}}}")
        else:
            out.append(_tex(part))
    return "".join(out)


def render_latex(tables: list[RenderedTable], result: Verdict | None = None) -> str:
    out = ["% Generated by `rlkd table`; needs \\usepackage{booktabs}."]
    if result is not None and result.cells:
        out.append("\\begin{table}[t]\\centering\\small")
        out.append(f"\\caption{{{_tex(VERDICT_TITLE)}. "
                   f"{_tex(method_sentence(result).replace('**bold**', 'bold').replace('*italic*', 'italic'))}}}")
        out.append("\\begin{tabular}{lr" + "r" * len(result.headlines) + "}")
        out.append("\\toprule")
        out.append("Comparison & seeds & " + " & ".join(_tex(h.header) for h in result.headlines) + " \\\\")
        out.append("\\midrule")
        for pair in result.pairs:
            if not any(p == pair for p, _ in result.cells):
                continue
            texts = [_tex_markup(verdict_cell_text(result.cells.get((pair, h)))) for h in result.headlines]
            out.append(f"{_tex(pair.label)} & {_tex(_seed_span(result, pair))} & " + " & ".join(texts) + " \\\\")
        if result.pooled:
            out.append("\\midrule")
            texts = [_tex(pooled_cell_text(result.pooled.get(h))) for h in result.headlines]
            out.append(f"{_tex(_pooled_label(result))} & {_tex(_pooled_seeds(result))} & " + " & ".join(texts)
                       + " \\\\")
        out.append("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
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
                    text = _fmt(est.mean) + (f"$\\pm${_fmt(est.half_width)}" if _interval_shown(est) else "")
                    if (row, column.key) in table.best:
                        text = f"\\textbf{{{text}}}"
                cells.append(text)
                if with_paper:
                    cells += _paper_cells(table, row, column.key, est)
            out.append(" & ".join(cells) + " \\\\")
        out.append("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    return "\n".join(out)


def write_tables(results_dir: Path, layout: Layout, results: list[CellResult], out_dir: Path | None = None,
                 unreadable: list[tuple[str, str]] = ()) -> dict[str, Path]:
    """``unreadable``: (cell id, problem) of records that could not be read; listed with the failed cells."""
    from rlkd.bench.store import write_text_atomic

    out_dir = out_dir or results_dir
    grid = collect(results, layout)
    grid.failed.extend((cell_id, f"record unreadable: {problem}") for cell_id, problem in unreadable)
    grid.notes.extend(code_version_notes(results))
    grid.notes.extend(stage_version_notes(results))
    tables = build_tables(layout, grid)
    order = row_order(layout, grid)
    effects = ranking_effects(layout, grid, order)
    result = verdict(layout, grid, order)
    contrasts = sweep_contrasts(layout, grid, order)
    paths = {"md": out_dir / "table.md", "csv": out_dir / "table.csv", "tex": out_dir / "table.tex"}
    write_text_atomic(paths["md"], render_markdown(tables, effects, grid.failed, result, grid.notes,
                                                    grid.without_fields, contrasts))
    write_text_atomic(paths["csv"], render_csv(tables, result, contrasts))
    write_text_atomic(paths["tex"], render_latex(tables, result))
    return paths


def _provenance_groups(results: list[CellResult], label: Callable[[Provenance, Cell], str | None],
                       heading: str) -> list[str]:
    """Finished cells grouped by ``label(recorded provenance, cell)`` (None: not counted): nothing
    when they all agree, else ``heading`` and a line per group naming its cells."""
    groups: dict[str, list[str]] = {}
    for result in results:
        if not result.done:
            continue
        name = label(result.provenance, result.cell)
        if name is not None:
            groups.setdefault(name, []).append(result.cell.id)
    if len(groups) <= 1:
        return []
    notes = [heading.format(n=len(groups))]
    for name, ids in sorted(groups.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(f"`{i}`" for i in ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
        notes.append(f"{name}: {len(ids)} cell(s): {shown}")
    return notes


def code_version_notes(results: list[CellResult]) -> list[str]:
    """A note per code version when the finished cells did not all run on the same code (git sha,
    dirty checkout, plug-in sources), naming the cells of each; nothing when they all agree."""
    def label(recorded: Provenance, cell: Cell) -> str:
        sha = recorded.git_sha
        name = (sha[:10] if sha else "unknown code") + (" (uncommitted changes)" if recorded.git_dirty else "")
        plugins = recorded.plugins
        if plugins:
            name += "; plug-ins " + ", ".join(f"{Path(n).name}@{(h or '?')[:8]}" for n, h in sorted(plugins.items()))
        return name

    return _provenance_groups(results, label, "These cells ran on {n} different code versions (`rlkd bench SPEC "
                                            "--rerun-stale` re-runs the ones that differ from the current code):")


def stage_version_notes(results: list[CellResult]) -> list[str]:
    """A note when the finished cells did not all start from the same exports of their cached stages
    (healing, SFT): a stage is keyed by its config, but a re-run of it on another machine is not
    bit-identical, so each cell's provenance records the content hash of the exports it used."""
    def label(recorded: Provenance, cell: Cell) -> str | None:
        if not cell.stages:
            return None
        stages = recorded.stages
        if not stages:
            return "stage exports not recorded (finished before rlkd recorded their hashes)"
        return "; ".join(f"{role}@{(sha or '?')[:10]}" for role, sha in sorted(stages.items()))

    return _provenance_groups(results, label, "These cells started from {n} different exports of their cached "
                                            "stages (same stage config, a separate run of it):")
