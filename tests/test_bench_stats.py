"""The verdict on the ranking loss: Holm, the paired bootstrap, pairing by cell fields, the table."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy import stats

from rlkd.bench.effects import EXAMPLES, NONE, SEEDS, ranking_pairs, verdict
from rlkd.bench.layouts import get_layout
from rlkd.bench.runner import run_grid
from rlkd.bench.spec import expand, parse_spec
from rlkd.bench.stats import holm, paired_bootstrap
from rlkd.bench.store import load_cells
from rlkd.bench.table_cli import main as table_main
from rlkd.bench.tables import collect, row_order

BASE_RUN = {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"}}


def _with_base(raw):
    """A test spec with the run settings every cell needs (models and data) filled in."""
    from rlkd.bench.spec import deep_merge

    return {**raw, "defaults": deep_merge(BASE_RUN, raw.get("defaults") or {})}


def test_holm_against_a_hand_computed_case():
    # m = 4. Sorted: 0.005·4 = 0.02; 0.01·3 = 0.03; 0.03·2 = 0.06; 0.04·1 = 0.04 -> raised to 0.06
    # (step-down adjusted p never decrease); a p of 0.5·... capped at 1.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([]) == []


def test_bootstrap_of_a_two_point_sample_has_a_known_answer():
    # Resampling {0, 1} twice gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% percentiles are 0 and 1. Under the centred null, |mean* - 1/2| >= 1/2 has probability 1/2.
    result = paired_bootstrap([0.0, 1.0], resamples=4000)
    assert (result.mean, result.low, result.high) == (0.5, 0.0, 1.0)
    assert result.p == pytest.approx(0.5, abs=0.04)  # 4 binomial standard errors of 1/2 at 4000 draws


def test_bootstrap_matches_the_normal_interval_for_a_large_sample():
    d = np.random.default_rng(7).normal(0.8, 2.0, size=600)
    result = paired_bootstrap(d)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert result.resamples >= 1000 and result.n_examples == 600
    assert result.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert result.high == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert result.p < 0.001  # mean 0.8 is 10 standard errors from 0
    assert paired_bootstrap(d) == result  # fixed seed: the same table renders the same intervals
    constant = paired_bootstrap([2.0] * 10)
    assert (constant.low, constant.high) == (2.0, 2.0)
    assert paired_bootstrap([1.0, -1.0] * 50).p == 1.0


# ---------------------------------------------------------------------------------------------
# Pairing and the verdict table


def _grid(tmp_path, raw, executor):
    run_grid(expand(parse_spec(_with_base(raw))), tmp_path, executor, progress=False)
    layout = get_layout(raw.get("layout"))
    return layout, collect(load_cells(tmp_path), layout)


def test_pairing_uses_cell_fields_so_a_user_label_may_contain_plus_r(tmp_path):
    # "KL+RKL" is a user's row label for kl: its ranked row is "KL+RKL+R". Stripping "+R" from labels
    # pairs nothing right here; the cells' objective_label and variant fields pair both rows.
    value = {("KL+RKL", "none"): [1.0, 2.0, 4.0], ("KL+RKL", "R"): [3.0, 5.0, 6.0],
             ("RKL", "none"): [10.0, 10.0, 10.0], ("RKL", "R"): [11.0, 12.0, 13.0]}

    class Executor:
        def run(self, cell, workdir):
            return {"ppl": value[(cell["objective_label"], cell["variant"])][cell["seed"] - 1]}

    raw = {"name": "p", "tasks": [{"name": "pretrain"}], "seeds": [1, 2, 3],
           "objectives": [{"name": "kl", "label": "KL+RKL"}, {"name": "rkl", "label": "RKL"}]}
    layout, grid = _grid(tmp_path, raw, Executor())
    pairs = {(p.base_row, p.ranked_row) for p in ranking_pairs(grid)}
    assert pairs == {("KL+RKL", "KL+RKL+R"), ("RKL", "RKL+R")}
    result = verdict(layout, grid)
    cells = {p.ranked_row: c for (p, _), c in result.cells.items()}
    assert cells["KL+RKL+R"].per_seed == {1: 2.0, 2: 3.0, 3: 2.0}
    assert cells["KL+RKL+R"].interval == SEEDS
    reference = stats.ttest_rel([3.0, 5.0, 6.0], [1.0, 2.0, 4.0])
    assert cells["KL+RKL+R"].p == pytest.approx(reference.pvalue)
    low, high = stats.t.interval(0.95, 2, loc=7 / 3, scale=stats.sem([2.0, 3.0, 2.0]))
    assert (cells["KL+RKL+R"].low, cells["KL+RKL+R"].high) == (pytest.approx(low), pytest.approx(high))
    raw_p = [cells["KL+RKL+R"].p, cells["RKL+R"].p]
    assert [cells["KL+RKL+R"].p_holm, cells["RKL+R"].p_holm] == pytest.approx(holm(raw_p))


def test_a_ranking_sweep_pairs_each_k_with_the_same_base(tmp_path):
    class Executor:
        def run(self, cell, workdir):
            k = cell["run"]["loss"]["ranking"].get("k", 0) if cell["run"]["loss"]["ranking"]["enabled"] else 0
            return {"ppl": 10.0 - k / 10 + cell["seed"]}

    raw = {"name": "k", "tasks": [{"name": "pretrain"}], "objectives": ["kl"], "variants": ["none", "R"],
           "sweep": {"k": [5, 10]}, "seeds": [1]}
    layout, grid = _grid(tmp_path, raw, Executor())
    result = verdict(layout, grid)
    deltas = {p.ranked_row: c.per_seed for (p, _), c in result.cells.items()}
    assert deltas == {"KL+R [k=5]": {1: pytest.approx(-0.5)}, "KL+R [k=10]": {1: pytest.approx(-1.0)}}
    assert {p.base_row for p in result.pairs} == {"KL"}


def test_too_few_seeds_prints_the_per_seed_differences(tmp_path):
    class Executor:
        def run(self, cell, workdir):
            return {"cr@2": {"none": [60.0, 61.0], "R": [70.0, 69.0]}[cell["variant"]][cell["seed"] - 1]}

    raw = {"name": "few", "layout": "generic", "tasks": [{"name": "pretrain"}], "objectives": ["kl"],
           "variants": ["none", "R"], "seeds": [1, 2]}
    layout, grid = _grid(tmp_path, raw, Executor())
    (cell,) = verdict(layout, grid).cells.values()
    assert cell.interval == NONE and cell.low is None and cell.p is None
    assert table_main([str(tmp_path), "--layout", "generic"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "| KL+R − KL | 2 | +10.00, +8.00 (per seed) |" in md
    assert "too few seeds for an interval" in md
    assert "t-interval of the per-seed differences" not in md.split("###")[1]  # no t-interval claimed
    assert "| KL+R | **69.50** |" in md and "(no interval: fewer than 3 seeds)" in md  # not 69.50 ± 6.35
    assert "| KL+R vs KL | pretrain/cr@2 | 2 | 9.00 | per seed: 10.00, 8.00 |" in md


def test_one_seed_with_per_example_scores_gets_a_bootstrap_interval(tmp_path):
    base = [0.0, 100.0, 0.0, 100.0, 0.0, 0.0, 100.0, 0.0]
    ranked = [100.0, 100.0, 0.0, 100.0, 100.0, 0.0, 100.0, 100.0]

    class Executor:
        def run(self, cell, workdir):
            scores = ranked if cell["variant"] == "R" else base
            per_example = {"score": scores, "correct": [s / 100 for s in scores]}  # correct: a count, not a mean
            (workdir / "per_example.json").write_text(json.dumps(per_example))
            return {"score": sum(scores) / len(scores), "correct": sum(s / 100 for s in scores)}

    raw = {"name": "boot", "layout": "generic", "tasks": [{"name": "gsm8k"}], "objectives": ["kl"],
           "variants": ["none", "R"], "seeds": [72]}
    layout, grid = _grid(tmp_path, raw, Executor())
    cells = {h.keys[0]: c for (_, h), c in verdict(layout, grid).cells.items()}
    expected = paired_bootstrap(np.subtract(ranked, base))
    score = cells["gsm8k/score"]
    assert score.interval == EXAMPLES and score.n_examples == 8 and score.mean == pytest.approx(37.5)
    assert (score.low, score.high, score.p) == (expected.low, expected.high, expected.p)
    assert cells["gsm8k/correct"].interval == NONE  # its per-example values do not average to the count
    assert any("correct do not average" in note for note in grid.notes)
    assert table_main([str(tmp_path), "--layout", "generic"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert f"+37.50 [{expected.low:+.2f}, {expected.high:+.2f}]†" in md
    assert "bootstrap over the 8 evaluation examples" in md


def test_three_seeds_with_per_example_scores_also_get_the_bootstrap_over_evaluation_rows(tmp_path):
    """The t-interval over seeds is the verdict's test; the bootstrap over evaluation rows is given
    beside it (how much the difference moves with the test rows), Holm-adjusted as its own family."""
    rng = np.random.default_rng(3)
    scores = {(v, s): rng.integers(0, 2, 40).astype(float) * 100 + (15.0 if v == "R" else 0.0) * s
              for v in ("none", "R") for s in (1, 2, 3)}

    class Executor:
        def run(self, cell, workdir):
            values = scores[(cell["variant"], cell["seed"])].tolist()
            (workdir / "per_example.json").write_text(json.dumps({"score": values}))
            return {"score": sum(values) / len(values)}

    raw = {"name": "rows", "layout": "generic", "tasks": [{"name": "gsm8k"}], "objectives": ["kl", "rkl"],
           "variants": ["none", "R"], "seeds": [1, 2, 3]}
    layout, grid = _grid(tmp_path, raw, Executor())
    result = verdict(layout, grid)
    cells = {p.ranked_row: c for (p, _), c in result.cells.items()}
    differences = np.mean([scores[("R", s)] - scores[("none", s)] for s in (1, 2, 3)], axis=0)
    reference = stats.bootstrap((differences,), np.mean, n_resamples=2000, confidence_level=0.95,
                                method="percentile", rng=np.random.default_rng(20240913), vectorized=True)
    for row in ("KL+R", "RKL+R"):  # both objectives got the same scores here
        cell = cells[row]
        assert cell.interval == SEEDS  # the verdict's own test stays the one over seeds
        assert cell.rows.n_examples == 40 and cell.rows.mean == pytest.approx(differences.mean())
        low, high = reference.confidence_interval
        assert (cell.rows.low, cell.rows.high) == (pytest.approx(low), pytest.approx(high))
    assert [cells["KL+R"].rows_p_holm, cells["RKL+R"].rows_p_holm] == pytest.approx(
        holm([cells["KL+R"].rows.p, cells["RKL+R"].rows.p]))
    assert [cells["KL+R"].p_holm, cells["RKL+R"].p_holm] == pytest.approx(holm([cells["KL+R"].p, cells["RKL+R"].p]))
    assert table_main([str(tmp_path), "--layout", "generic"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert f"rows [{cells['KL+R'].rows.low:+.2f}, {cells['KL+R'].rows.high:+.2f}]" in md
    assert "bootstrap over the 40 evaluation examples" in md


def _table1_results(tmp_path, seeds=(1, 2, 3)):
    cr = {"none": [60.0, 61.0, 65.0], "R": [70.0, 69.0, 74.0]}

    class Executor:
        def run(self, cell, workdir):
            i = cell["seed"] - 1
            metrics = {f"cr@{k}": cr[cell["variant"]][i] + k for k in (2, 3, 4, 5)}
            metrics.update({f"mor@{k}": 50.0 + k + i for k in (3, 5, 10, 20)}, ppl=8.0 + i)
            return metrics

    raw = {"name": "t1", "layout": "table1", "tasks": [{"name": "pretrain"}], "objectives": ["kl", "rkl"],
           "variants": ["none", "R"], "seeds": list(seeds)}
    return _grid(tmp_path, raw, Executor())


def test_the_verdict_comes_first_with_the_layouts_headlines(tmp_path):
    layout, grid = _table1_results(tmp_path)
    result = verdict(layout, grid, row_order(layout, grid))
    assert [h.header for h in result.headlines] == ["mean CR@2–5", "mean MOR@3–20", "PPL↓"]
    assert [p.label for p in result.pairs] == ["KL+R − KL", "RKL+R − RKL"]  # the paper's row order
    cr = result.cells[(result.pairs[0], result.headlines[0])]
    assert cr.per_seed == {1: pytest.approx(10.0), 2: pytest.approx(8.0), 3: pytest.approx(9.0)}
    assert table_main([str(tmp_path), "--layout", "table1"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert md.startswith("### Effect of the ranking loss\n")
    first = md.split("\n### ")[0]
    assert "| Comparison | seeds | mean CR@2–5 | mean MOR@3–20 | PPL↓ |" in first
    assert "Holm-adjusted over the 2 tests of this table" in first  # MOR and PPL do not move: no test
    assert md.index("Effect of the ranking loss") < md.index("Table 1:") < md.index("paired ±R t-tests")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert rows[0]["table"] == "Effect of the ranking loss" and rows[0]["interval"] == "seeds"
    assert float(rows[0]["mean"]) == pytest.approx(9.0)
    tex = (tmp_path / "table.tex").read_text()
    assert tex.index("Effect of the ranking loss") < tex.index("Table 1:")
    png = (tmp_path / "effect.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_cells_without_the_fields_are_not_paired_by_their_labels(tmp_path):
    _table1_results(tmp_path, seeds=(1,))
    for config_file in tmp_path.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        del config["objective_label"], config["variant"]
        config_file.write_text(json.dumps(config))
    assert table_main([str(tmp_path), "--layout", "table1"]) == 0
    verdict_section = (tmp_path / "table.md").read_text().split("\n### ")[0]
    assert "4 trained cell(s) lack the `objective_label`/`variant` fields" in verdict_section
    assert "No ±R comparison here" in verdict_section and "KL+R − KL" not in verdict_section
    assert not (tmp_path / "effect.png").exists()


def test_table2_verdict_pairs_within_each_task(tmp_path):
    # Distinct values per task: a Δ computed across tasks would mix 20s with 40s.
    score = {("gsm8k", "none"): 20.0, ("gsm8k", "R"): 23.0, ("dolly", "none"): 40.0, ("dolly", "R"): 39.0}

    class Executor:
        def run(self, cell, workdir):
            value = score[(cell["task"], cell["variant"])] + cell["seed"] / 10
            return {"score": value} if cell["task"] == "gsm8k" else {"rougeL": value}

    raw = {"name": "t2", "layout": "table2", "tasks": [{"name": "gsm8k"}, {"name": "dolly"}], "objectives": ["kl"],
           "variants": ["none", "R"], "seeds": [1, 2, 3]}
    layout, grid = _grid(tmp_path, raw, Executor())
    result = verdict(layout, grid)
    assert [h.header for h in result.headlines] == ["GSM8K score", "Dolly R-L"]  # no XSum cells: no column
    means = {h.header: c.mean for (_, h), c in result.cells.items()}
    assert means == {"GSM8K score": pytest.approx(3.0), "Dolly R-L": pytest.approx(-1.0)}
