"""benchmarks/sparse_bias.py --quick: one row per objective x ranking x K, and the figures obey what
the bucketed loss must (data processing: never above the exact loss for the f-divergences)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MONOTONE = {"kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"}


def test_quick_mode_writes_the_report(tmp_path):
    script = runpy.run_path(str(REPO / "benchmarks" / "sparse_bias.py"))
    assert script["main"](["--quick", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bias.json").read_text())["students"]
    assert {(r["objective"], r["ranking"], r["k"]) for r in result["rows"]} == {
        (o, r, k) for o in script["OBJECTIVES"] for r in (False, True) for k in (8, 32, 128)}
    for row in result["rows"]:
        assert -1.0 - 1e-6 <= row["grad_cosine"] <= 1.0 + 1e-6
        if row["objective"] in MONOTONE and not row["ranking"]:
            assert row["sparse"] <= row["exact"] + 1e-6, row
    assert len(result["truncation"]) == 7 * 3
    assert "## Without the tail bucket" in (tmp_path / "bias.md").read_text()
