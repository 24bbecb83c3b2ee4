"""The verdict on the ranking loss: Holm, the paired bootstrap, pairing by cell fields, the table."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy import stats

from rlkd.bench.report.effects import EXAMPLES, NONE, SEEDS, ranking_pairs, verdict
from rlkd.bench.report.layouts import get_layout
from rlkd.bench.runner import run_grid
from rlkd.bench.spec import expand, parse_spec
from rlkd.bench.report.paper import paper_table
from rlkd.bench.report.stats import BOOTSTRAP_RESAMPLES, holm, holm_bounds, paired_bootstrap, random_effects
from rlkd.bench.store import load_results
from rlkd.bench.table_cli import main as table_main
from rlkd.bench.report.tables import collect, row_order

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


def test_bootstrap_uses_enough_resamples_and_knows_its_floor():
    assert BOOTSTRAP_RESAMPLES >= 20000
    d = np.random.default_rng(11).normal(5.0, 1.0, size=300)  # the mean is 86 standard errors from 0
    result = paired_bootstrap(d)
    assert result.resamples == BOOTSTRAP_RESAMPLES
    assert result.at_floor and result.p == pytest.approx(1 / (BOOTSTRAP_RESAMPLES + 1))
    assert result.se == pytest.approx(d.std(ddof=0) / math.sqrt(d.size), rel=0.03)  # the bootstrap SE of a mean
    near_zero = paired_bootstrap(np.random.default_rng(12).normal(0.0, 1.0, size=300))
    assert not near_zero.at_floor and near_zero.p > 0.01


def test_holm_bounds_follow_the_term_that_sets_the_adjusted_p():
    floor = 1 / 20001
    # Sorted: floor·3 (a floor sets it: a bound), floor·2 < floor·3 (the running max is still the
    # floor term: a bound), 0.2·1 = 0.2 (an exact p sets it: exact).
    assert holm_bounds([floor, floor, 0.2], [True, True, False]) == [True, True, False]
    # 0.01·2 = 0.02 > floor·3: the second adjusted p is set by an exact p.
    assert holm_bounds([floor, 0.01], [True, False]) == [True, False]
    assert holm_bounds([0.01, 0.02], [False, False]) == [False, False]


# The BCG vaccine trials (Colditz et al. 1994), the standard example of metafor (Viechtbauer 2010):
# tpos, tneg, cpos, cneg per trial; effect = log risk ratio. metafor's rma(method="DL") reports
# estimate -0.7141, se 0.1787, 95% CI [-1.0644, -0.3638], tau^2 0.3088, I^2 92.12%, Q(12) 152.2330.
BCG = [(4, 119, 11, 128), (6, 300, 29, 274), (3, 228, 11, 209), (62, 13536, 248, 12619), (33, 5036, 47, 5761),
       (180, 1361, 372, 1079), (8, 2537, 10, 619), (505, 87886, 499, 87892), (29, 7470, 45, 7232),
       (17, 1699, 65, 1600), (186, 50448, 141, 27197), (5, 2493, 3, 2338), (27, 16886, 29, 17825)]


def test_random_effects_reproduces_metafor_on_the_bcg_trials():
    y = [math.log((a / (a + b)) / (c / (c + d))) for a, b, c, d in BCG]
    se = [math.sqrt(1 / a - 1 / (a + b) + 1 / c - 1 / (c + d)) for a, b, c, d in BCG]
    result = random_effects(y, se)
    assert result.k == 13
    assert result.mean == pytest.approx(-0.7141, abs=1e-4) and result.se == pytest.approx(0.1787, abs=1e-4)
    assert (result.low, result.high) == (pytest.approx(-1.0644, abs=1e-4), pytest.approx(-0.3638, abs=1e-4))
    assert result.tau2 == pytest.approx(0.3088, abs=1e-4) and result.i2 == pytest.approx(0.9212, abs=1e-4)
    assert result.q == pytest.approx(152.2330, abs=1e-3)


def test_random_effects_closed_forms():
    # Homogeneous (Q < k - 1): tau^2 = 0 and the estimate is the inverse-variance fixed effect.
    y, se = [1.0, 1.2, 0.9], [0.5, 0.4, 0.6]
    w = [1 / s ** 2 for s in se]
    result = random_effects(y, se)
    assert result.tau2 == 0.0 and result.i2 == 0.0
    assert result.mean == pytest.approx(sum(wi * yi for wi, yi in zip(w, y)) / sum(w))
    assert result.se == pytest.approx(1 / math.sqrt(sum(w)))
    # Equal standard errors s: tau^2 = sample variance - s^2, the mean is the plain mean and its
    # standard error the plain standard error of the mean.
    y = [0.47, 1.23, -1.04, 4.02, -0.73, 0.32]
    result = random_effects(y, [0.3] * 6)
    assert result.tau2 == pytest.approx(np.var(y, ddof=1) - 0.09)
    assert result.mean == pytest.approx(np.mean(y)) and result.se == pytest.approx(stats.sem(y))
    assert result.p == pytest.approx(2 * stats.norm.sf(np.mean(y) / stats.sem(y)))
    assert result.p_equals(1.46) == pytest.approx(2 * stats.norm.sf(abs(np.mean(y) - 1.46) / stats.sem(y)))
    assert result.high - result.low == pytest.approx(2 * stats.norm.ppf(0.975) * stats.sem(y))
    with pytest.raises(ValueError):
        random_effects([1.0, 2.0], [0.1, 0.0])


# ---------------------------------------------------------------------------------------------
# Pairing and the verdict table


def _grid(tmp_path, raw, executor):
    run_grid(expand(parse_spec(_with_base(raw))), tmp_path, executor, progress=False)
    layout = get_layout(raw.get("layout"))
    return layout, collect(load_results(tmp_path), layout)


def test_pairing_uses_cell_fields_so_a_user_label_may_contain_plus_r(tmp_path):
    # "KL+RKL" is a user's row label for kl: its ranked row is "KL+RKL+R". Stripping "+R" from labels
    # pairs nothing right here; the cells' objective_label and variant fields pair both rows.
    value = {("KL+RKL", "none"): [1.0, 2.0, 4.0], ("KL+RKL", "R"): [3.0, 5.0, 6.0],
             ("RKL", "none"): [10.0, 10.0, 10.0], ("RKL", "R"): [11.0, 12.0, 13.0]}

    class Executor:
        def run(self, cell, workdir):
            return {"ppl": value[(cell.arm.objective_label, cell.arm.variant)][cell.arm.seed - 1]}

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
            k = cell.run["loss"]["ranking"].get("k", 0) if cell.run["loss"]["ranking"]["enabled"] else 0
            return {"ppl": 10.0 - k / 10 + cell.arm.seed}

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
            return {"cr@2": {"none": [60.0, 61.0], "R": [70.0, 69.0]}[cell.arm.variant][cell.arm.seed - 1]}

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
            scores = ranked if cell.arm.variant == "R" else base
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
    assert (score.low, score.high) == (expected.low, expected.high)
    assert score.p is None and score.rows.p == expected.p  # one seed: no seed test, only the rows' bootstrap
    assert score.rows_p_holm == expected.p  # the secondary family holds this one bootstrap
    assert cells["gsm8k/correct"].interval == NONE  # its per-example values do not average to the count
    assert any("correct do not average" in note for note in grid.notes)
    assert table_main([str(tmp_path), "--layout", "generic"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert f"+37.50; rows† [{expected.low:+.2f}, {expected.high:+.2f}]" in md
    assert "bootstrap over the 8 evaluation examples" in md


def test_three_seeds_with_per_example_scores_also_get_the_bootstrap_over_evaluation_rows(tmp_path):
    """The t-interval over seeds is the verdict's test; the bootstrap over evaluation rows is given
    beside it (how much the difference moves with the test rows), Holm-adjusted as its own family."""
    rng = np.random.default_rng(3)
    scores = {(v, s): rng.integers(0, 2, 40).astype(float) * 100 + (15.0 if v == "R" else 0.0) * s
              for v in ("none", "R") for s in (1, 2, 3)}

    class Executor:
        def run(self, cell, workdir):
            values = scores[(cell.arm.variant, cell.arm.seed)].tolist()
            (workdir / "per_example.json").write_text(json.dumps({"score": values}))
            return {"score": sum(values) / len(values)}

    raw = {"name": "rows", "layout": "generic", "tasks": [{"name": "gsm8k"}], "objectives": ["kl", "rkl"],
           "variants": ["none", "R"], "seeds": [1, 2, 3]}
    layout, grid = _grid(tmp_path, raw, Executor())
    result = verdict(layout, grid)
    cells = {p.ranked_row: c for (p, _), c in result.cells.items()}
    differences = np.mean([scores[("R", s)] - scores[("none", s)] for s in (1, 2, 3)], axis=0)
    reference = stats.bootstrap((differences,), np.mean, n_resamples=20000, confidence_level=0.95,
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
            i = cell.arm.seed - 1
            metrics = {f"cr@{k}": cr[cell.arm.variant][i] + k for k in (2, 3, 4, 5)}
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
    assert "Holm-adjusted over the 2 seed tests of this table" in first  # MOR and PPL do not move: no test
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
        # as an rlkd of before both the fields and the record's schema version wrote it (v0: the arm's
        # other fields at the top level)
        arm = config.pop("arm")
        del config["schema_version"], arm["objective_label"], arm["variant"]
        config.update(arm)
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
            value = score[(cell.task, cell.arm.variant)] + cell.arm.seed / 10
            return {"score": value} if cell.task == "gsm8k" else {"rougeL": value}

    raw = {"name": "t2", "layout": "table2", "tasks": [{"name": "gsm8k"}, {"name": "dolly"}], "objectives": ["kl"],
           "variants": ["none", "R"], "seeds": [1, 2, 3]}
    layout, grid = _grid(tmp_path, raw, Executor())
    result = verdict(layout, grid)
    assert [h.header for h in result.headlines] == ["GSM8K score", "Dolly R-L"]  # no XSum cells: no column
    means = {h.header: c.mean for (_, h), c in result.cells.items()}
    assert means == {"GSM8K score": pytest.approx(3.0), "Dolly R-L": pytest.approx(-1.0)}


def test_mini_table2_verdict_families_floor_and_pooled_row(tmp_path):
    """The rendering rule on a small synthetic Dolly grid: KL and JSD over 3 seeds, RKL over 1.
    Primary family = the 2 seed t-tests; secondary = the 3 row bootstraps of rouge-score R-L; the
    `rouge` package column has no p; RKL's bootstrap sits at its floor; a pooled row with the paper."""
    rng = np.random.default_rng(5)
    n = 60
    shift = {"KL": [1.0, 1.5, 0.5], "JSD": [-0.2, 0.3, 0.1], "RKL": [40.0]}
    scores = {}
    for objective, shifts in shift.items():
        for seed, delta in enumerate(shifts, start=1):
            base = rng.uniform(0, 40, n)
            noise = rng.normal(0, 1.0 if objective != "RKL" else 0.5, n)
            scores[(objective, "none", seed)] = base
            scores[(objective, "R", seed)] = base + delta + noise

    class Executor:
        def run(self, cell, workdir):
            values = scores[(cell.arm.objective_label, cell.arm.variant, cell.arm.seed)]
            pkg = values * 0.9 + 1.0
            (workdir / "per_example.json").write_text(json.dumps({"rougeL": values.tolist(),
                                                                  "rouge_pkg_rougeL": pkg.tolist()}))
            return {"rougeL": float(values.mean()), "rouge_pkg_rougeL": float(pkg.mean())}

    raw = {"name": "m2", "layout": "mini_table2", "tasks": [{"name": "dolly"}], "objectives": ["kl", "rkl", "jsd"],
           "variants": ["none", "R"], "seeds": [1, 2, 3]}
    run_grid(expand(parse_spec(_with_base(raw))), tmp_path, Executor(), progress=False)
    for folder in list(tmp_path.glob("*-RKL-s[23]-*")) + list(tmp_path.glob("*-RKL+R-s[23]-*")):
        import shutil

        shutil.rmtree(folder)
    layout = get_layout("mini_table2")
    grid = collect(load_results(tmp_path), layout)
    result = verdict(layout, grid, row_order(layout, grid))
    primary, beside = result.headlines
    assert primary.tested and not beside.tested
    cells = {(p.ranked_row, h.header): c for (p, h), c in result.cells.items()}
    kl, jsd, rkl = (cells[(row, primary.header)] for row in ("KL+R", "JSD+R", "RKL+R"))
    # Primary family: the two seed t-tests, nothing else.
    assert result.family_size == 2 and rkl.p is None and rkl.interval == EXAMPLES
    raw_t = [stats.ttest_rel([scores[(o, "R", s)].mean() for s in (1, 2, 3)],
                             [scores[(o, "none", s)].mean() for s in (1, 2, 3)]).pvalue for o in ("KL", "JSD")]
    assert [kl.p, jsd.p] == pytest.approx(raw_t)
    assert [kl.p_holm, jsd.p_holm] == pytest.approx(holm(raw_t))
    # Secondary family: the three bootstraps over rows of the tested headline; the beside column has none.
    assert result.rows_family_size == 3
    assert [kl.rows_p_holm, jsd.rows_p_holm, rkl.rows_p_holm] == pytest.approx(
        holm([kl.rows.p, jsd.rows.p, rkl.rows.p]))
    assert all(cells[(row, beside.header)].p is None and cells[(row, beside.header)].rows_p_holm is None
               for row in ("KL+R", "JSD+R", "RKL+R"))
    # RKL: +40 with noise 0.5 on 60 rows never resamples near 0: its p sits at the floor, and as the
    # smallest of 3 its Holm factor is 3: 3/20001 = 1.5e-4, printed rounded up as "p < 2e-04".
    assert rkl.rows.at_floor and rkl.rows_p_bound
    # The pooled row: DL over (mean, SE) with SE = sd/sqrt(3) for the seed-tested pairs and the rows'
    # bootstrap SE for RKL; the paper's mean over the same three pairs from its Table 2.
    pooled = result.pooled[primary]
    diffs = {o: [scores[(o, "R", s)].mean() - scores[(o, "none", s)].mean() for s in (1, 2, 3)] for o in ("KL", "JSD")}
    expected = random_effects([np.mean(diffs["KL"]), rkl.rows.mean, np.mean(diffs["JSD"])],
                              [stats.sem(diffs["KL"]), rkl.rows.se,
                               stats.sem(diffs["JSD"])])
    assert pooled.effect.mean == pytest.approx(expected.mean) and pooled.effect.tau2 == pytest.approx(expected.tau2)
    assert [p.ranked_row for p in pooled.from_rows] == ["RKL+R"]
    table = paper_table("table2")
    paper = np.mean([table.value(f"{o}+R", "dolly/rougeL") - table.value(o, "dolly/rougeL")
                     for o in ("KL", "RKL", "JSD")])
    assert pooled.paper_mean == pytest.approx(paper) and pooled.paper_pairs == 3
    assert pooled.p_paper == pytest.approx(2 * stats.norm.sf(abs(expected.mean - paper) / expected.se))
    assert result.pooled[beside].p_paper is None  # no test on the beside column
    assert table_main([str(tmp_path), "--layout", "mini_table2"]) == 0
    md = (tmp_path / "table.md").read_text()
    verdict_md = md.split("\n### ")[0]
    rkl_line = next(line for line in verdict_md.splitlines() if line.startswith("| RKL+R − RKL |"))
    primary_text, beside_text = rkl_line.split(" | ")[2:4]
    assert primary_text == f"+{rkl.mean:.2f}; *rows† [{rkl.rows.low:+.2f}, {rkl.rows.high:+.2f}], p < 2e-04*"
    assert beside_text.startswith(f"+{cells[('RKL+R', beside.header)].mean:.2f}; rows† [") and "p" not in beside_text
    pooled_line = next(line for line in verdict_md.splitlines() if line.startswith("| **Pooled, all objectives"))
    assert f"paper {paper:+.2f}" in pooled_line and "τ² = " in pooled_line and "I² = " in pooled_line
    assert "Holm-adjusted over the 2 seed tests" in verdict_md and "3 bootstraps over rows" in verdict_md
    assert "20000 resamples" in verdict_md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    pooled_rows = [r for r in rows if r["interval"] == "random_effects_dl"]
    assert len(pooled_rows) == 2 and float(pooled_rows[0]["mean"]) == pytest.approx(expected.mean)
    tex = (tmp_path / "table.tex").read_text()
    assert "Pooled, all objectives" in tex and "\\textit{" in tex
