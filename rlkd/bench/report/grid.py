"""Finished cells -> values per (row, column, seed), and per (arm, column, seed) for pairing.

A *row* is what a table prints (the layout's label). An *arm* is what a ±R comparison pairs: the
cell's own fields (objective label, variant, sweep values), never parsed from a label, because a
user's label may itself contain "+R". Metrics averaged over evaluation examples may come with their
per-example values (the record's ``per_example``); they are kept per arm too.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from rlkd.bench.report.layouts import ColumnKey, Layout
from rlkd.bench.records import Cell, CellResult
from rlkd.bench.report.stats import Estimate, mean_ci


@dataclass(frozen=True)
class Arm:
    """One side of a ±R comparison: the fields of a cell's arm (rlkd.bench.records.CellArm) that
    identify a trained configuration, its seed and row label left out (a pair is compared over seeds)."""

    objective_label: str | None  # None for Rank-only and reference rows
    variant: str | None  # "none", "R", "R_dynamic", "pearson", "rank_only", ...; None for references
    sweep: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs

    @classmethod
    def of(cls, cell: Cell) -> Arm:
        sweep = tuple(sorted((str(k), _hashable(v)) for k, v in cell.arm.sweep.items()))
        return cls(cell.arm.objective_label, cell.arm.variant, sweep)


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


@dataclass
class Grid:
    """Values per (row, column) keyed by seed, in first-seen row order; the same per arm."""

    rows: list[str] = field(default_factory=list)
    values: dict[tuple[str, str], dict[Any, float]] = field(default_factory=lambda: defaultdict(dict))
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell id, error)
    arm_values: dict[tuple[Arm, str], dict[Any, float]] = field(default_factory=lambda: defaultdict(dict))
    examples: dict[tuple[Arm, str], dict[Any, list[float]]] = field(default_factory=lambda: defaultdict(dict))
    arm_rows: dict[Arm, str] = field(default_factory=dict)
    ranking_keys: dict[Arm, frozenset[str]] = field(default_factory=dict)  # keys of the arm's loss.ranking
    keys: dict[str, ColumnKey] = field(default_factory=dict)  # column text -> its parts
    notes: list[str] = field(default_factory=list)
    without_fields: list[str] = field(default_factory=list)  # trained cells lacking objective_label/variant

    def add(self, row: str, column: str, seed: Any, value: float, arm: Arm | None = None) -> None:
        if row not in self.rows:
            self.rows.append(row)
        self.values[(row, column)][seed] = value
        if arm is not None:
            self.arm_values[(arm, column)][seed] = value
            self.arm_rows.setdefault(arm, row)

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for _, column in self.values:
            seen.setdefault(column, None)
        return list(seen)

    def estimate(self, row: str, column: str) -> Estimate | None:
        found = self.values.get((row, column))
        return mean_ci(list(found.values())) if found else None


def _reproduces(values: list[float], metric: float) -> bool:
    """Per-example values are used only if their mean is the cell's metric: then they are the
    examples that metric averaged (not, say, 0/1 flags behind a count)."""
    mean = math.fsum(values) / len(values)
    return math.isclose(mean, metric, rel_tol=1e-6, abs_tol=1e-9)


def collect(results: list[CellResult], layout: Layout) -> Grid:
    grid = Grid()
    for result in results:
        cell = result.cell
        if not result.done:
            grid.failed.append((cell.id, result.status.error or ""))
            continue
        arm = Arm.of(cell) if cell.arm.variant is not None else None
        if cell.kind == "distill" and cell.arm.variant is None:
            grid.without_fields.append(cell.id)  # written before cells carried the fields
        if arm is not None:
            grid.ranking_keys[arm] = grid.ranking_keys.get(arm, frozenset()) | frozenset(cell.ranking)
        metrics = result.metrics
        for row, column, value in layout.entries(cell, metrics):
            grid.keys[column.text] = column
            grid.add(row, column.text, cell.arm.seed, value, arm)
        if arm is None:
            continue
        for metric, values in result.per_example.items():
            if metric not in metrics:
                continue
            if not _reproduces(values, float(metrics[metric])):
                grid.notes.append(f"`{cell.id}`: per_example.json values for {metric} do not average to "
                                  "its metric; not used")
                continue
            grid.examples[(arm, layout.column_key(cell, metric))][cell.arm.seed] = values
    return grid
