"""benchmarks/sparse_cache_cost.py --quick: one row per format, sizes by the formats' closed forms."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_mode_reports_each_formats_size_and_build_time(tmp_path):
    script = runpy.run_path(str(REPO / "benchmarks" / "sparse_cache_cost.py"))
    assert script["main"](["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cache_cost.json").read_text())
    rows = {row["format"]: row for row in result["rows"]}
    assert list(rows) == ["exact", "top-32", "top-128"]
    vocab = 512  # the quick teacher's: ids fit uint16 (2 bytes), values float32, one float32 tail per position
    assert rows["exact"]["bytes_per_position"] == 4 * vocab
    for k in (32, 128):
        row = rows[f"top-{k}"]
        assert row["bytes_per_position"] == k * (2 + 4) + 4
        assert row["fraction_of_exact"] == row["bytes_per_position"] / (4 * vocab)
    positions = rows["exact"]["positions"]
    assert positions == 24 + 17 + 31 + 9
    for row in rows.values():  # the entry holds the arrays (and the shared sequence index)
        assert row["entry_bytes"] >= row["bytes_per_position"] * positions
        assert row["build_seconds"] > 0 and len(row["build_seconds_all"]) == 1
    assert "| top-128 | 772 |" in (tmp_path / "cache_cost.md").read_text()
