"""Table layouts as data: the declaration a spec's ``layout:`` names (a shipped layout) or writes out.

A layout declares the columns a results table shows (metric keys with headers and a direction), the
headline metrics of the verdict on the ranking loss (one column, or the mean of several per cell,
e.g. mean CR@2–5), the paper table its numbers sit beside, and the row order. The shipped layouts
are such declarations, one YAML file each in ``rlkd/bench/table_layouts/``; a spec may declare its
own inline, so a new metric gets its tables and plots without an edit of rlkd.

A column key is ``task/metric``; a layout whose columns are a sweep's values (``column_sweep: k``)
keys them ``task/metric|k=K``; ``split_by_correlation`` prefixes ``Pearson:`` or ``SRCC:``.

This module is the schema only (the spec validates against it); :mod:`rlkd.bench.report.layouts` turns a
declaration into the layout that reporting uses.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SHIPPED_LAYOUT_DIR = Path(__file__).with_name("table_layouts")
GENERIC = "generic"  # every metric tabulated, every column a headline

Better = Literal["higher", "lower"]


class _Declaration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnDeclaration(_Declaration):
    key: str = Field(description="The column's key: task/metric (task/metric|k=K under column_sweep; "
                     "Pearson:/SRCC: prefixed under split_by_correlation).")
    header: str = Field(description="The column's header in the tables.")
    better: Better | None = Field(None, description="Which values are better (marks the best row, the sign of "
                                  "an improvement); None: lower for keys naming ppl, seconds, loss or kl, else "
                                  "higher.")


class HeadlineDeclaration(_Declaration):
    header: str = Field(description="The headline's header in the verdict table and plot.")
    keys: list[str] = Field(min_length=1, description="Column keys; the headline is their mean per cell (one key: "
                            "that column).")
    tested: bool = Field(True, description="false: shown beside the tested headlines with intervals and no p "
                         "(e.g. the same generations scored by a second library).")
    better: Better | None = Field(None, description="Which values are better; None: as the first key's column.")


class SectionDeclaration(_Declaration):
    title: str = Field("", description="The section's title, appended to the layout's title.")
    columns: list[ColumnDeclaration] = Field(description="The section's columns, in order; a column no cell has "
                                             "is left out.")


class ContrastDeclaration(_Declaration):
    sweep: str = Field(description="A sweep key of the spec (the last part of its path, as in cell ids).")
    reference: str | int | float | bool | None = Field(None, description="The swept value every other value is "
                                                      "compared with (null: the sweep's null entry, e.g. the exact "
                                                      "teacher cache).")
    title: str | None = Field(None, description="The contrast table's title; None: 'Effect of <sweep>'.")


class LayoutDeclaration(_Declaration):
    """How a results folder's cells are laid out as tables, verdict and plots."""

    name: str = Field(description="The layout's name (a shipped layout's file name).")
    title: str = Field(description="The tables' title.")
    sections: list[SectionDeclaration] = Field(default_factory=list, description="The tables, each a list of "
                                               "columns; none: one table of every metric. A metric no section "
                                               "lists goes to a last 'Other metrics' section.")
    headlines: list[HeadlineDeclaration] = Field(default_factory=list, description="The verdict's metrics; none: "
                                                 "every tabulated column.")
    paper_table: str | None = Field(None, description="The paper table (rlkd/bench/report/paper_numbers.yaml) whose "
                                    "numbers sit beside ours; None: none.")
    column_sweep: str | None = Field(None, description="A sweep key whose values become columns (Table 5: k).")
    split_by_correlation: bool = Field(False, description="Pearson and SRCC cells in separate columns, the paper "
                                       "table transposed (Table 8).")
    reference_rows: list[str] = Field(default_factory=lambda: ["Teacher", "Start"], description="Rows never "
                                      "marked best (models scored without distillation).")
    row_order: list[str] = Field(default_factory=list, description="Rows first, in this order (then the paper "
                                 "table's rows, then the rest).")
    contrasts: list[ContrastDeclaration] = Field(default_factory=list, description="Tables of Δ = (a swept value) "
                                                 "− (the reference value) per headline, pairing the cells that "
                                                 "differ in that sweep key alone, over their shared seeds (e.g. "
                                                 "sparse − exact teacher cache).")


def shipped_layout_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_LAYOUT_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def shipped_layout(name: str) -> LayoutDeclaration:
    """A shipped layout's declaration; KeyError naming the known ones for an unknown name."""
    path = SHIPPED_LAYOUT_DIR / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or not path.is_file():
        raise KeyError(f"unknown table layout {name!r}; known: {', '.join(shipped_layout_names())}")
    return layout_file(path)


def layout_file(path: Path) -> LayoutDeclaration:
    """A layout declared in a YAML file (a shipped one, or one's own: ``rlkd table --layout
    my_layout.yaml``); a ValueError naming the file and the field for an invalid one."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the layout: {exc}") from None
    try:
        return LayoutDeclaration.model_validate(raw)
    except ValidationError as exc:
        from rlkd.config import validation_lines

        raise ValueError("\n".join([f"{path}: invalid layout declaration"] + validation_lines(exc))) from None


def resolve_layout(layout: str | LayoutDeclaration | dict | None) -> LayoutDeclaration:
    """A layout as a spec or a results folder's spec record names it: None (generic), a shipped
    layout's name, or a declaration (a mapping, as read from JSON or YAML)."""
    if layout is None:
        return shipped_layout(GENERIC)
    if isinstance(layout, str):
        return shipped_layout(layout)
    if isinstance(layout, LayoutDeclaration):
        return layout
    return LayoutDeclaration.model_validate(layout)
