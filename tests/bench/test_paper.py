"""The transcribed paper numbers match the Markdown report and the paper's own arithmetic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlkd.bench.report.paper import leading_number, load_paper_tables, paper_table, parse_markdown_tables

REPO = Path(__file__).resolve().parents[2]


def _paper_markdown() -> Path | None:
    for candidate in (os.environ.get("RLKD_PAPER_MD"), REPO.parent / "shared/papers/rlkd.md"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def test_every_number_matches_the_markdown_tables():
    md = _paper_markdown()
    if md is None:
        pytest.skip("../shared/papers/rlkd.md not present")
    parsed = parse_markdown_tables(md.read_text())
    tables = load_paper_tables()
    assert set(parsed) == set(tables) == {f"table{i}" for i in range(1, 9)}
    checked = 0
    for table_id, (header, rows) in parsed.items():
        ours = tables[table_id]
        assert len(ours.columns) == len(header) - 1, table_id
        assert list(ours.rows) == [label for label, _ in rows], table_id
        for label, cells in rows:
            expected = [leading_number(c) for c in cells]
            assert None not in expected, (table_id, label, cells)
            assert ours.rows[label] == pytest.approx(expected, abs=0, rel=0), (table_id, label)
            checked += len(expected)
    assert checked == 11 * 10 + 17 * 8 + 6 * 9 + 3 + 4 * 6 + 7 * 8 + 11 * 10 + 2 * 9


@pytest.mark.parametrize("table_id", ["table2", "table6"])
def test_gsm8k_score_is_correct_over_1319(table_id):
    table = paper_table(table_id)
    for label, values in table.rows.items():
        correct = table.value(label, "gsm8k/correct")
        score = table.value(label, "gsm8k/score")
        assert round(100 * correct / 1319, 2) == pytest.approx(score, abs=1e-9), label


def test_table8_average_is_the_row_mean():
    table = paper_table("table8")
    for label, values in table.rows.items():
        assert sum(values[:-1]) / 8 == pytest.approx(values[-1], abs=5e-3), label


def test_rows_shared_between_tables_agree():
    # Table 6 repeats Table 2's Teacher, KL, KL+R, RKL, RKL+R rows; Table 5's k=5 column repeats
    # Table 2's correct counts and Table 8's SRCC row repeats them again.
    t2, t5, t6, t8 = (paper_table(f"table{i}") for i in (2, 5, 6, 8))
    for label in ("Teacher", "KL", "KL+R", "RKL", "RKL+R"):
        assert t6.rows[label] == t2.rows[label]
    for label in ("KL+R", "RKL+R", "TVD+R"):
        assert t5.value(label, "gsm8k/correct|k=5") == t2.value(label, "gsm8k/correct")
    assert t5.value("Rank-k", "gsm8k/correct|k=5") == t2.value("Rank-5", "gsm8k/correct")
    for method in ("Rank-5", "Rank-15", "KL+R", "RKL+R", "JSD+R", "TVD+R", "FD+R", "AKL+R"):
        assert t8.value("SRCC", method) == t2.value(method, "gsm8k/correct")


def test_leading_number_handles_annotated_cells():
    assert leading_number("267 (+48)") == 267.0
    assert leading_number("1441 (+1.19%)") == 1441.0
    assert leading_number("−3.79") is None  # a typographic minus is not a number here
    assert leading_number("n/a") is None
