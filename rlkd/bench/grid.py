"""Finished cells -> values per (row, column, seed), and per (arm, column, seed) for pairing.

A *row* is what a table prints (the layout's label). An *arm* is what a ±R comparison pairs: the
cell's own fields (objective label, variant, sweep values), never parsed from a label, because a
user's label may itself contain "+R". Metrics averaged over evaluation examples may come with their
per-example values (``per_example.json`` in the cell directory); they are kept per arm too.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlkd.bench.layouts import Layout
from rlkd.bench.stats import Estimate, mean_ci

PER_EXAMPLE_FILE = "per_example.json"  # {metric: [value per evaluation example, fixed example order]}


@dataclass(frozen=True)
class Arm:
    """One side of a ±R comparison: the cell fields that identify a trained configuration."""

    objective_label: str | None  # None for Rank-only and reference rows
    variant: str | None  # "none", "R", "R_dynamic", "pearson", "rank_only", ...; None for references
    sweep: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs

    @classmethod
    def of(cls, config: dict[str, Any]) -> Arm:
        sweep = tuple(sorted((str(k), _hashable(v)) for k, v in (config.get("sweep") or {}).items()))
        return cls(config.get("objective_label"), config.get("variant"), sweep)


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


def _read_per_example(cell_dir: Path | None) -> dict[str, list[float]]:
    if cell_dir is None or not (Path(cell_dir) / PER_EXAMPLE_FILE).is_file():
        return {}
    with (Path(cell_dir) / PER_EXAMPLE_FILE).open() as handle:
        raw = json.load(handle)
    return {str(k): [float(x) for x in v] for k, v in raw.items() if isinstance(v, list) and v}


def _reproduces(values: list[float], metric: float) -> bool:
    """Per-example values are used only if their mean is the cell's metric: then they are the
    examples that metric averaged (not, say, 0/1 flags behind a count)."""
    mean = math.fsum(values) / len(values)
    return math.isclose(mean, metric, rel_tol=1e-6, abs_tol=1e-9)


def collect(cells: list[dict[str, Any]], layout: Layout) -> Grid:
    grid = Grid()
    for entry in cells:
        config = entry["config"]
        if entry["status"].get("status") != "done":
            grid.failed.append((config["id"], entry["status"].get("error", "")))
            continue
        arm = Arm.of(config) if config.get("variant") is not None else None
        if config.get("kind") == "distill" and "variant" not in config:
            grid.without_fields.append(config["id"])  # written before cells carried the fields
        if arm is not None:
            ranking = ((config.get("run") or {}).get("loss") or {}).get("ranking") or {}
            grid.ranking_keys[arm] = grid.ranking_keys.get(arm, frozenset()) | frozenset(ranking)
        metrics = entry["metrics"]
        for row, column, value in layout.entries(config, metrics):
            grid.add(row, column, config.get("seed"), value, arm)
        if arm is None:
            continue
        for metric, values in _read_per_example(entry.get("dir")).items():
            if metric not in metrics:
                continue
            if not _reproduces(values, float(metrics[metric])):
                grid.notes.append(f"`{config['id']}`: {PER_EXAMPLE_FILE} values for {metric} do not average to "
                                  "its metric; not used")
                continue
            grid.examples[(arm, layout.column_key(config, metric))][config.get("seed")] = values
    return grid
