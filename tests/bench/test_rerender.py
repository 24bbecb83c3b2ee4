"""Every committed results folder re-renders its committed tables byte for byte: reporting reads the
cells' records only, so a change to how records are read or laid out must not move one character."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlkd.bench.table_cli import make_tables

RESULTS = Path(__file__).resolve().parents[2] / "results"
RENDERED = [d.name for d in sorted(RESULTS.iterdir()) if (d / "table.md").is_file() and (d / "spec.json").is_file()]


def test_the_committed_folders_with_tables_are_found():
    assert {"default", "mini_table1"} <= set(RENDERED)


@pytest.mark.parametrize("folder", RENDERED)
def test_committed_tables_re_render_byte_identical(folder, tmp_path):
    make_tables(RESULTS / folder, out_dir=tmp_path)
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / name).read_bytes() == (RESULTS / folder / name).read_bytes(), name
