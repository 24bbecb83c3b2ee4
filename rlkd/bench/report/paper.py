"""The paper's reported numbers: load the transcribed data file and re-parse the source Markdown.

``paper_numbers.yaml`` is the single place the tables of RLKD (Peng & Zhang, COLING 2025) live in
rlkd. Each table keeps the paper's row labels and row order; ``columns`` gives rlkd's metric key
for every numeric column, so a results table can put the paper's value beside ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

PAPER_NUMBERS_FILE = Path(__file__).with_name("paper_numbers.yaml")
_TABLE_HEADING = re.compile(r"^###\s+Table\s+(\d+)\b")
_LEADING_NUMBER = re.compile(r"^\s*\**\s*([-+]?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class PaperTable:
    table_id: str
    title: str
    columns: list[str]
    rows: dict[str, list[float]]
    row_axis: str  # what a row label names: "method", "model", "k-sweep row", ...

    def value(self, row: str, column: str) -> float | None:
        """The paper's number at (row, column), or None where the paper has no such cell."""
        if row not in self.rows or column not in self.columns:
            return None
        return self.rows[row][self.columns.index(column)]


@lru_cache(maxsize=1)
def load_paper_tables(path: str | None = None) -> dict[str, PaperTable]:
    file = Path(path) if path else PAPER_NUMBERS_FILE
    raw = yaml.safe_load(file.read_text())
    tables: dict[str, PaperTable] = {}
    for table_id, spec in raw["tables"].items():
        columns = list(spec["columns"])
        rows = {str(label): [float(v) for v in values] for label, values in spec["rows"].items()}
        for label, values in rows.items():
            if len(values) != len(columns):
                raise ValueError(
                    f"{file}: tables.{table_id}.rows.{label}: {len(values)} values "
                    f"for {len(columns)} columns"
                )
        tables[table_id] = PaperTable(
            table_id, spec.get("title", ""), columns, rows, spec.get("row_axis", "method")
        )
    return tables


def paper_table(table_id: str) -> PaperTable:
    tables = load_paper_tables()
    if table_id not in tables:
        raise KeyError(f"no paper table {table_id!r}; known: {sorted(tables)}")
    return tables[table_id]


def leading_number(cell: str) -> float | None:
    """``'267 (+48)'`` -> 267.0, ``'1441 (+1.19%)'`` -> 1441.0; None for a non-numeric cell."""
    match = _LEADING_NUMBER.match(cell)
    return float(match.group(1)) if match else None


def parse_markdown_tables(text: str) -> dict[str, tuple[list[str], list[tuple[str, list[str]]]]]:
    """The first pipe table under each ``### Table N`` heading: ``{"table1": (header, rows)}``.

    Each row is ``(first cell, remaining cells)``; cells are stripped strings as written.
    """
    found: dict[str, tuple[list[str], list[tuple[str, list[str]]]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        heading = _TABLE_HEADING.match(lines[i])
        i += 1
        if not heading:
            continue
        while i < len(lines) and not lines[i].lstrip().startswith("|"):
            if lines[i].startswith("#"):
                break
            i += 1
        if i >= len(lines) or not lines[i].lstrip().startswith("|"):
            continue
        block = []
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
            i += 1
        header, body = block[0], [r for r in block[1:] if not set("".join(r)) <= set("-: ")]
        found[f"table{heading.group(1)}"] = (header, [(r[0], r[1:]) for r in body])
    return found
