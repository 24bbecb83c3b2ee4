"""How the cells of a results directory are laid out as tables: a layout declaration
(:mod:`rlkd.bench.layout_schema`, a shipped YAML file or a spec's own) made into the object reporting
uses.

A layout maps each finished cell to (row label, column key, value) entries and knows where the
paper's number for a (row, column) lives. Column keys are ``task/metric``; a layout whose columns
are a sweep (Table 5: k) uses ``task/metric|k=K``; Table 8 splits columns by correlation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from rlkd.bench.layout_schema import LayoutDeclaration, resolve_layout
from rlkd.bench.report.paper import paper_table
from rlkd.bench.records import Cell

# A column whose declaration leaves its direction out: lower is better for these metrics.
LOWER_IS_BETTER = re.compile(r"(^|/)[a-z_]*(ppl|seconds|loss|kl)(\||$)")
# Bookkeeping metrics a cell records but no table shows (they do not compare across objectives).
HIDDEN_METRICS = re.compile(r"/(final_train_loss|train_step_seconds|total|no_answer|([a-z]+_)?teacher_ppl)$")


@dataclass(frozen=True)
class ColumnKey:
    """A tabulated column's parts; ``text`` is the key that layouts, tables and the paper's numbers
    name it by (``task/metric``, ``task/metric|k=K``, ``Pearson:task/metric``)."""

    task: str
    metric: str
    sweep: tuple[str, Any] | None = None  # (sweep key, value) when a sweep's values are columns
    correlation: str | None = None  # "Pearson" | "SRCC" when split by correlation

    @property
    def text(self) -> str:
        key = f"{self.task}/{self.metric}"
        if self.sweep is not None:
            key += f"|{self.sweep[0]}={self.sweep[1]}"
        return f"{self.correlation}:{key}" if self.correlation else key

    def without_sweep(self) -> ColumnKey:
        return ColumnKey(self.task, self.metric, None, self.correlation)


# Top-k agreement metrics as the evaluation names them: [set prefix]cr@k or [set prefix]mor@k, e.g.
# heldout_cr@2 (a further alignment set), true_mor@5 (against the true distribution).
_AT_K_METRIC = re.compile(r"^(?P<prefix>[a-z_]*?)(?P<family>cr|mor)@(?P<k>\d+)$")


@dataclass(frozen=True)
class AtK:
    prefix: str  # "" for the main alignment set
    family: str  # "cr" | "mor"
    k: int


def at_k(metric: str) -> AtK | None:
    """The parts of a top-k agreement metric's name (None for any other metric)."""
    match = _AT_K_METRIC.match(metric)
    return AtK(match["prefix"], match["family"], int(match["k"])) if match else None


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    better: str | None = None  # "higher" | "lower"; None: by the key (LOWER_IS_BETTER)

    @property
    def lower_is_better(self) -> bool:
        if self.better is not None:
            return self.better == "lower"
        return bool(LOWER_IS_BETTER.search(self.key))


@dataclass(frozen=True)
class Headline:
    """A verdict-table metric: one column, or the mean of several (mean CR@2–5), per cell."""

    header: str
    keys: tuple[str, ...]
    # False: shown beside the tested headlines (the same generations scored by a second library),
    # with intervals and no p, not a test of the verdict's families.
    tested: bool = True
    better: str | None = None  # "higher" | "lower"; None: as the first key's column

    @property
    def lower_is_better(self) -> bool:
        return Column(self.keys[0], self.header, self.better).lower_is_better


@dataclass
class Section:
    title: str
    columns: list[Column]


@dataclass
class Layout:
    name: str
    title: str
    sections: list[Section]
    paper_table: str | None = None
    column_sweep: str | None = None  # sweep key whose values become columns (Table 5)
    split_by_correlation: bool = False  # Table 8: Pearson / SRCC columns, paper table transposed
    reference_rows: tuple[str, ...] = ("Teacher", "Start")  # never marked best
    row_order: tuple[str, ...] = ()  # preferred row order where there is no paper table
    # The verdict table's metrics; empty: every column of the sections (or, generic, every metric).
    headlines: tuple[Headline, ...] = ()
    # (sweep key, reference value, title) of each sweep contrast table.
    contrasts: tuple[tuple[str, Any, str], ...] = ()

    @classmethod
    def of(cls, declaration: LayoutDeclaration) -> Layout:
        return cls(declaration.name, declaration.title,
                   [Section(s.title, [Column(c.key, c.header, c.better) for c in s.columns])
                    for s in declaration.sections],
                   paper_table=declaration.paper_table, column_sweep=declaration.column_sweep,
                   split_by_correlation=declaration.split_by_correlation,
                   reference_rows=tuple(declaration.reference_rows), row_order=tuple(declaration.row_order),
                   headlines=tuple(Headline(h.header, tuple(h.keys), h.tested, h.better)
                                   for h in declaration.headlines),
                   contrasts=tuple((c.sweep, c.reference, c.title or f"Effect of {c.sweep}")
                                   for c in declaration.contrasts))

    # -- placing cells ------------------------------------------------------------------------
    def row_label(self, cell: Cell) -> str:
        label = cell.arm.method
        if self.split_by_correlation:
            label = label.replace(" (Pearson)", "")
        if self.column_sweep and self.column_sweep in cell.arm.sweep:
            label = re.sub(r"^Rank-\d+", "Rank-k", label)
        hidden = {self.column_sweep} if self.column_sweep else set()
        if label.startswith("Rank-") or "Rank-k" in label:
            hidden.add("k")
        extras = [f"{k}={v}" for k, v in sorted(cell.arm.sweep.items()) if k not in hidden]
        return f"{label} [{', '.join(extras)}]" if extras else label

    def column(self, cell: Cell, metric: str) -> ColumnKey:
        """Where this metric of this cell is tabulated: its task and metric, the swept value when
        the layout's columns are a sweep, the correlation when Pearson and SRCC are split."""
        swept = cell.arm.sweep
        sweep = ((self.column_sweep, swept[self.column_sweep])
                 if self.column_sweep and self.column_sweep in swept else None)
        correlation = None
        if self.split_by_correlation:
            correlation = "Pearson" if cell.ranking.get("correlation") == "pearson" else "SRCC"
        return ColumnKey(cell.task, metric, sweep, correlation)

    def column_key(self, cell: Cell, metric: str) -> str:
        return self.column(cell, metric).text

    def entries(self, cell: Cell, metrics: dict[str, float]) -> Iterable[tuple[str, ColumnKey, float]]:
        row = self.row_label(cell)
        for metric, value in metrics.items():
            yield row, self.column(cell, metric), float(value)

    def present_sections(self, column_keys: Iterable[str]) -> list[Section]:
        """The sections as tabulated for these column keys: absent columns dropped, hidden
        bookkeeping metrics left out, any other metric in a last "Other metrics" section."""
        present = {c for c in column_keys if not HIDDEN_METRICS.search(c)}
        if not self.sections:
            return [Section("", [Column(c, c) for c in sorted(present)])]
        sections = []
        for section in self.sections:
            kept = [c for c in section.columns if c.key in present]
            if kept:
                sections.append(Section(section.title, kept))
        listed = {c.key for s in self.sections for c in s.columns}
        others = sorted(present - listed)
        if others:
            sections.append(Section("Other metrics", [Column(c, c) for c in others]))
        return sections

    # -- the paper ----------------------------------------------------------------------------
    def paper_value(self, row: str, column_key: str) -> float | None:
        if not self.paper_table:
            return None
        table = paper_table(self.paper_table)
        if self.split_by_correlation:
            correlation, _, _ = column_key.partition(":")
            return table.value(correlation, row)
        return table.value(row, column_key)

    def paper_rows(self) -> list[str]:
        if not self.paper_table:
            return list(self.row_order)
        # The layout's own order first (e.g. Teacher, Start), then the paper's rows in its order.
        return list(self.row_order) + [r for r in paper_table(self.paper_table).rows if r not in self.row_order]


def get_layout(layout: str | LayoutDeclaration | dict | None) -> Layout:
    """The layout a spec names: None (generic: every metric), a shipped layout's name
    (rlkd/bench/table_layouts/NAME.yaml) or a declaration; KeyError for an unknown name."""
    return Layout.of(resolve_layout(layout))
