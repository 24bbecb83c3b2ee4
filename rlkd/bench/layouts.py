"""How the cells of a results directory are laid out as the paper's tables.

A layout maps each finished cell to (row label, column key, value) entries and knows where the
paper's number for a (row, column) lives. Column keys are ``task/metric``; a layout whose columns
are a sweep (Table 5: k) uses ``task/metric|k=K``; Table 8 splits columns by correlation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from rlkd.bench.paper import paper_table
from rlkd.bench.records import Cell

ALIGNMENT = [("cr@1", "CR@1"), ("cr@2", "CR@2"), ("cr@3", "CR@3"), ("cr@4", "CR@4"), ("cr@5", "CR@5"),
             ("mor@3", "MOR@3"), ("mor@5", "MOR@5"), ("mor@10", "MOR@10"), ("mor@20", "MOR@20")]
LOWER_IS_BETTER = re.compile(r"(^|/)[a-z_]*(ppl|seconds|loss|kl)(\||$)")
# Bookkeeping metrics a cell records but no table shows (they do not compare across objectives).
HIDDEN_METRICS = re.compile(r"/(final_train_loss|train_step_seconds|total|no_answer|([a-z]+_)?teacher_ppl)$")


@dataclass(frozen=True)
class Column:
    key: str
    header: str

    @property
    def lower_is_better(self) -> bool:
        return bool(LOWER_IS_BETTER.search(self.key))


@dataclass(frozen=True)
class Headline:
    """A verdict-table metric: one column, or the mean of several (mean CR@2–5), per cell."""

    header: str
    keys: tuple[str, ...]
    # False: shown beside the tested headlines (the same generations scored by a second library),
    # with intervals and no p, not a test of the verdict's families.
    tested: bool = True

    @property
    def lower_is_better(self) -> bool:
        return Column(self.keys[0], self.header).lower_is_better


def _mean_of(task: str, prefix: str, metric: str, ks: tuple[int, ...], label: str = "") -> Headline:
    return Headline(f"mean {metric.upper()}@{ks[0]}–{ks[-1]}{label}", tuple(f"{task}/{prefix}{metric}@{k}" for k in ks))


def _alignment_headlines(task: str, prefix: str = "", label: str = "") -> tuple[Headline, ...]:
    """Table-1 style: mean CR@2–5, mean MOR@3–20, PPL."""
    return (_mean_of(task, prefix, "cr", (2, 3, 4, 5), label), _mean_of(task, prefix, "mor", (3, 5, 10, 20), label),
            Headline(f"PPL↓{label}", (f"{task}/{prefix}ppl",)))


# Table-2 style: each task's main score.
_DOWNSTREAM_HEADLINES = (Headline("GSM8K score", ("gsm8k/score",)), Headline("Dolly R-L", ("dolly/rougeL",)),
                         Headline("XSum R-L", ("xsum/rougeL",)))


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
    extra: dict[str, Any] = field(default_factory=dict)

    # -- placing cells ------------------------------------------------------------------------
    def row_label(self, cell: Cell) -> str:
        label = cell.method
        if self.split_by_correlation:
            label = label.replace(" (Pearson)", "")
        if self.column_sweep and self.column_sweep in cell.sweep:
            label = re.sub(r"^Rank-\d+", "Rank-k", label)
        hidden = {self.column_sweep} if self.column_sweep else set()
        if label.startswith("Rank-") or "Rank-k" in label:
            hidden.add("k")
        extras = [f"{k}={v}" for k, v in sorted(cell.sweep.items()) if k not in hidden]
        return f"{label} [{', '.join(extras)}]" if extras else label

    def column_key(self, cell: Cell, metric: str) -> str:
        key = f"{cell.task}/{metric}"
        if self.column_sweep and self.column_sweep in cell.sweep:
            key += f"|{self.column_sweep}={cell.sweep[self.column_sweep]}"
        if self.split_by_correlation:
            key = f"{'Pearson' if cell.ranking.get('correlation') == 'pearson' else 'SRCC'}:{key}"
        return key

    def entries(self, cell: Cell, metrics: dict[str, float]) -> Iterable[tuple[str, str, float]]:
        row = self.row_label(cell)
        for metric, value in metrics.items():
            yield row, self.column_key(cell, metric), float(value)

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


def _alignment_columns(task: str, prefix: str = "", with_ppl: bool = True, label: str = "") -> list[Column]:
    columns = [Column(f"{task}/{prefix}ppl", f"PPL↓{label}")] if with_ppl else []
    return columns + [Column(f"{task}/{prefix}{key}", f"{header}{label}") for key, header in ALIGNMENT]


_DOWNSTREAM = [Column("gsm8k/correct", "GSM8K correct"), Column("gsm8k/score", "GSM8K score"),
               Column("dolly/rouge1", "Dolly R-1"), Column("dolly/rouge2", "Dolly R-2"),
               Column("dolly/rougeL", "Dolly R-L"), Column("xsum/rouge1", "XSum R-1"),
               Column("xsum/rouge2", "XSum R-2"), Column("xsum/rougeL", "XSum R-L")]


def get_layout(name: str | None) -> Layout:
    if name is None or name == "generic":
        return Layout("generic", "Results", [])
    builders = {
        "table1": lambda: Layout("table1", "Table 1: pre-training task, multi-modal learning on data already learned",
                                 [Section("", _alignment_columns("pretrain"))], paper_table="table1",
                                 headlines=_alignment_headlines("pretrain")),
        "table7": lambda: Layout("table7", "Table 7: pre-training, out-of-distribution test slices",
                                 [Section("", _alignment_columns("pretrain"))], paper_table="table7",
                                 headlines=_alignment_headlines("pretrain")),
        "table3": lambda: Layout("table3", "Table 3: agreement of each model's peak predictions with the reference",
                                 [Section("", _alignment_columns("pretrain", with_ppl=False))], paper_table="table3",
                                 reference_rows=()),
        "table2": lambda: Layout("table2", "Table 2: downstream test sets", [Section("", list(_DOWNSTREAM))],
                                 paper_table="table2", headlines=_DOWNSTREAM_HEADLINES),
        "table6": lambda: Layout("table6", "Table 6: dynamic vs fixed allocation", [Section("", list(_DOWNSTREAM))],
                                 paper_table="table6", headlines=_DOWNSTREAM_HEADLINES),
        "table4": lambda: Layout("table4", "Table 4: total training time (s)",
                                 [Section("", [Column("gsm8k/train_seconds", "Time (s)↓")])], paper_table="table4"),
        "table5": lambda: Layout("table5", "Table 5: GSM8K correct count vs ranking range k",
                                 [Section("", [Column(f"gsm8k/correct|k={k}", f"k={k}") for k in (5, 10, 15, 20, 25, 30)])],
                                 paper_table="table5", column_sweep="k"),
        "table8": lambda: Layout("table8", "Table 8: ranking objective, Pearson vs SRCC (GSM8K correct)",
                                 [Section("", [Column("Pearson:gsm8k/correct", "Pearson"),
                                               Column("SRCC:gsm8k/correct", "SRCC")])],
                                 paper_table="table8", split_by_correlation=True),
        "default": lambda: Layout("default", "Embedded synthetic benchmark (multi-modal Markov source)", [
            Section("Alignment with the teacher (held-out sequences)", _alignment_columns("synthetic")),
            Section("Alignment with the true next-token distribution",
                    [Column("synthetic/true_kl", "KL(true‖student)↓")]
                    + _alignment_columns("synthetic", "true_", with_ppl=False, label=" (true)")),
            Section("Downstream: greedy continuation of the source's most likely path",
                    [Column("synthetic/exact_match", "Exact match"), Column("synthetic/token_accuracy", "Token acc."),
                     Column("synthetic/rouge1", "ROUGE-1"), Column("synthetic/rouge2", "ROUGE-2"),
                     Column("synthetic/rougeL", "ROUGE-L")]),
        ], headlines=(_mean_of("synthetic", "", "cr", (2, 3, 4, 5)), _mean_of("synthetic", "", "mor", (3, 5, 10, 20)),
                      Headline("KL(true‖student)↓", ("synthetic/true_kl",)),
                      Headline("Exact match", ("synthetic/exact_match",))),
           row_order=("Start", "Teacher", "KL", "KL+R", "RKL", "RKL+R", "JSD", "JSD+R", "TVD", "TVD+R", "AKL",
                      "AKL+R", "Rank-5")),
    }
    builders["mini_table1"] = lambda: Layout(
        "mini_table1", "Mini reproduction of Table 1 (SmolLM2-135M teacher, healed 16-layer student)",
        [Section("Trained-on sequences (the paper's Table 1 setting; paper: Llama-2-7B -> TinyLlama)",
                 _alignment_columns("pretrain")),
         Section("Held-out slices (not trained on; like the paper's Table 7)",
                 _alignment_columns("pretrain", "heldout_", label=" (held-out)"))],
        paper_table="table1", row_order=("Start", "Teacher"),
        headlines=_alignment_headlines("pretrain") + _alignment_headlines("pretrain", "heldout_", " (held-out)")[2:])
    builders["mini_table2"] = lambda: Layout(
        "mini_table2", "Mini reproduction of Table 2, Dolly (SmolLM2-135M teacher, healed 16-layer student)",
        [Section("Dolly test rows, rouge-score (paper: Llama-2-7B -> TinyLlama, all 800 rows)",
                 [c for c in _DOWNSTREAM if c.key.startswith("dolly/")]),
         Section("Same generations scored by the `rouge` package (the library the paper names)",
                 [Column("dolly/rouge_pkg_rouge1", "R-1 (rouge)"), Column("dolly/rouge_pkg_rouge2", "R-2 (rouge)"),
                  Column("dolly/rouge_pkg_rougeL", "R-L (rouge)")])],
        paper_table="table2", row_order=("Teacher", "Start", "SFT", "SeqKD"),
        # rouge-score is the primary ROUGE; the `rouge` package scores the same generations beside it.
        headlines=(Headline("Dolly R-L", ("dolly/rougeL",)),
                   Headline("Dolly R-L (rouge)", ("dolly/rouge_pkg_rougeL",), tested=False)))
    if name not in builders:
        raise KeyError(f"unknown table layout {name!r}; known: generic, {', '.join(builders)}")
    return builders[name]()
