"""Tables beside the paper: seed statistics vs hand computation, paper columns, best marks, plots."""

from __future__ import annotations

import csv
import io
import math

import pytest
from scipy import stats

from rlkd.bench.report.layouts import get_layout
from rlkd.bench.report.paper import paper_table
from rlkd.bench.runner import run_grid
from rlkd.bench.spec import expand, parse_spec
from rlkd.bench.report.stats import mean_ci, paired_t
from rlkd.bench.store import load_results
from rlkd.bench.table_cli import main as table_main
from rlkd.bench.report.tables import build_tables, collect, ranking_effects

BASE_RUN = {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"}}


def _with_base(raw):
    """A test spec with the run settings every cell needs (models and data) filled in."""
    from rlkd.bench.spec import deep_merge

    return {**raw, "defaults": deep_merge(BASE_RUN, raw.get("defaults") or {})}

# Hand-chosen per-seed values: PPL and CR@2 of each method for seeds 1, 2, 3.
PPL = {"KL": [8.0, 8.2, 8.4], "KL+R": [7.9, 8.0, 8.4], "RKL": [9.0, 9.5, 10.0], "RKL+R": [8.5, 8.6, 8.7]}
CR2 = {"KL": [60.0, 61.0, 65.0], "KL+R": [70.0, 69.0, 74.0], "RKL": [50.0, 52.0, 54.0], "RKL+R": [66.0, 65.0, 67.0]}


class TableExecutor:
    def run(self, cell, workdir):
        i = cell.arm.seed - 1
        return {"ppl": PPL[cell.arm.method][i], "cr@2": CR2[cell.arm.method][i]}


@pytest.fixture()
def table1_results(tmp_path):
    raw = {"name": "t1", "layout": "table1", "tasks": [{"name": "pretrain"}], "objectives": ["kl", "rkl"],
           "seeds": [1, 2, 3]}
    cells = expand(parse_spec(_with_base(raw)))
    run_grid(cells, tmp_path, TableExecutor(), progress=False)
    return tmp_path


def test_mean_ci_matches_the_t_interval():
    assert mean_ci([1.0, 2.0, 3.0]).half_width == pytest.approx(4.302652729911275 / math.sqrt(3))
    values = [3.1, 2.7, 3.8, 3.3]
    est = mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert (est.low, est.high) == (pytest.approx(low), pytest.approx(high))
    single = mean_ci([5.0])
    assert single.mean == 5.0 and single.half_width is None


def test_paired_t_against_hand_formula():
    with_r, without = [70.0, 69.0, 74.0], [60.0, 61.0, 65.0]
    d = [10.0, 8.0, 9.0]
    mean = 9.0
    sd = math.sqrt(((1.0) ** 2 + (1.0) ** 2 + 0.0) / 2)
    t = mean / (sd / math.sqrt(3))
    p = 2 * stats.t.sf(abs(t), 2)
    result = paired_t(with_r, without)
    assert result.diff.mean == pytest.approx(mean) and result.t == pytest.approx(t) and result.p == pytest.approx(p)
    assert sum(d) / 3 == mean
    constant = paired_t([2.0, 3.0], [1.0, 2.0])
    assert constant.t is None and constant.p == 0.0
    # equal differences that floating point leaves a hair apart (1/8160 of a percentage scale)
    rounded = paired_t([0.1 + 1 / 81.6, 0.3 + 1 / 81.6, 0.7 + 1 / 81.6], [0.1, 0.3, 0.7])
    assert 0 < rounded.diff.sd < 1e-15 and rounded.t is None and rounded.p == 0.0
    assert paired_t([1.0], [0.5]).p is None


def test_table1_cells_paper_columns_and_best(table1_results):
    layout = get_layout("table1")
    grid = collect(load_results(table1_results), layout)
    (table,) = build_tables(layout, grid)
    assert table.rows == ["KL", "KL+R", "RKL", "RKL+R"]  # the paper's row order
    est = table.estimates[("KL", "pretrain/ppl")]
    assert est.mean == pytest.approx(8.2) and est.half_width == pytest.approx(4.302652729911275 * 0.2 / math.sqrt(3))
    paper = paper_table("table1")
    assert table.paper[("KL+R", "pretrain/cr@2")] == paper.value("KL+R", "pretrain/cr@2") == 69.08
    # PPL: lower is better -> KL+R (mean 8.1); CR@2: higher is better -> KL+R (71.0)
    assert ("KL+R", "pretrain/ppl") in table.best and ("KL+R", "pretrain/cr@2") in table.best
    assert ("KL", "pretrain/ppl") not in table.best


def test_ranking_effects_are_paired_over_seeds(table1_results):
    layout = get_layout("table1")
    grid = collect(load_results(table1_results), layout)
    effects = {(e.ranked_row, e.column.key): e for e in ranking_effects(layout, grid)}
    assert set(effects) == {(r, c) for r in ("KL+R", "RKL+R") for c in ("pretrain/ppl", "pretrain/cr@2")}
    kl = effects[("KL+R", "pretrain/cr@2")]
    reference = stats.ttest_rel(CR2["KL+R"], CR2["KL"])
    assert kl.seeds == 3 and kl.test.p == pytest.approx(reference.pvalue)
    assert kl.test.diff.mean == pytest.approx(9.0)


def test_table_cli_writes_markdown_csv_latex_and_plot(table1_results, capsys):
    assert table_main([str(table1_results), "--layout", "table1"]) == 0
    md = (table1_results / "table.md").read_text()
    assert "| KL+R | **8.10 ± " in md  # best PPL in bold, with its CI
    assert "| 7.81 | 0.29 |" in md  # paper's KL+R PPL and ours − paper = 8.10 − 7.81
    assert "KL+R vs KL | CR@2 | 3 | 9.00 |" in md
    rows = list(csv.DictReader(io.StringIO((table1_results / "table.csv").read_text())))
    kl_r = next(r for r in rows if r["row"] == "RKL+R" and r["column"] == "pretrain/cr@2")
    assert float(kl_r["mean"]) == pytest.approx(66.0) and float(kl_r["paper"]) == 67.27
    assert float(kl_r["diff_vs_paper"]) == pytest.approx(66.0 - 67.27)
    assert "\\textbf{8.10$\\pm$" in (table1_results / "table.tex").read_text()
    png = (table1_results / "alignment.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "table.md" in capsys.readouterr().out


def test_table5_k_columns_and_table8_transposed_paper(tmp_path):
    class Correct:
        def run(self, cell, workdir):
            return {"correct": 100.0 + cell.run["loss"]["ranking"].get("k", 0)}

    raw = {"name": "t5", "tasks": [{"name": "gsm8k"}], "objectives": ["kl"], "variants": ["R", "rank_only"],
           "sweep": {"k": [5, 10]}, "seeds": [72]}
    out5 = tmp_path / "t5"
    run_grid(expand(parse_spec(_with_base(raw))), out5, Correct(), progress=False)
    layout = get_layout("table5")
    (table,) = build_tables(layout, collect(load_results(out5), layout))
    assert table.rows == ["Rank-k", "KL+R"]
    assert table.estimates[("Rank-k", "gsm8k/correct|k=10")].mean == 110.0
    assert table.paper[("Rank-k", "gsm8k/correct|k=10")] == 240 and table.paper[("KL+R", "gsm8k/correct|k=5")] == 267
    assert table_main([str(out5), "--layout", "table5"]) == 0 and (out5 / "k_sweep.png").is_file()

    raw8 = {"name": "t8", "tasks": [{"name": "gsm8k"}], "objectives": ["kl"], "variants": ["R", "pearson"],
            "seeds": [72]}
    out8 = tmp_path / "t8"
    run_grid(expand(parse_spec(_with_base(raw8))), out8, Correct(), progress=False)
    layout = get_layout("table8")
    (table,) = build_tables(layout, collect(load_results(out8), layout))
    assert table.rows == ["KL+R"]
    assert table.paper[("KL+R", "Pearson:gsm8k/correct")] == 230 and table.paper[("KL+R", "SRCC:gsm8k/correct")] == 267


def test_failed_cells_are_listed_not_tabulated(tmp_path):
    class Half:
        def run(self, cell, workdir):
            if cell.arm.method == "RKL":
                raise ValueError("diverged")
            return {"ppl": 9.0}

    raw = {"name": "f", "tasks": [{"name": "pretrain"}], "objectives": ["kl", "rkl"], "variants": ["none"],
           "seeds": [1]}
    run_grid(expand(parse_spec(_with_base(raw))), tmp_path, Half(), progress=False)
    assert table_main([str(tmp_path), "--layout", "table1"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "Failed cells" in md and "ValueError: diverged" in md and "| RKL |" not in md


def test_table_cli_errors(tmp_path, capsys):
    assert table_main([str(tmp_path / "missing")]) == 2
    assert "no such results directory" in capsys.readouterr().err
    assert table_main([str(tmp_path)]) == 2
    assert "nothing has run yet" in capsys.readouterr().err


def test_mini_table1_layout_puts_the_paper_beside_the_trained_on_section_only():
    layout = get_layout("mini_table1")
    trained, heldout = layout.sections
    assert [c.key for c in trained.columns][:2] == ["pretrain/ppl", "pretrain/cr@1"]
    assert all(c.key.startswith("pretrain/heldout_") for c in heldout.columns)
    assert layout.paper_value("KL+R", "pretrain/cr@5") == paper_table("table1").value("KL+R", "pretrain/cr@5") == 12.65
    assert layout.paper_value("KL+R", "pretrain/heldout_cr@5") is None
    assert trained.columns[0].lower_is_better and heldout.columns[0].lower_is_better  # PPL
    assert all(c.header.endswith("(held-out)") for c in heldout.columns)  # effects rows stay unambiguous


def test_curves_leave_out_a_model_scored_against_itself(tmp_path):
    from rlkd.bench.report.plots import curve_series

    class Executor:
        def run(self, cell, workdir):
            if cell.arm.method == "Teacher":
                return {"cr@1": 100.0, "cr@2": 100.0, "mor@3": 100.0}
            return {"cr@1": 50.0 + cell.arm.seed, "cr@2": 20.0, "mor@3": 40.0}

    raw = {"name": "c", "layout": "table1", "tasks": [{"name": "pretrain"}], "objectives": ["kl"],
           "variants": ["none"], "seeds": [1, 2], "references": ["teacher"],
           "defaults": {"models": {"teacher": "T", "student": "S"}}}
    run_grid(expand(parse_spec(_with_base(raw))), tmp_path, Executor(), progress=False)
    series = curve_series(collect(load_results(tmp_path), get_layout("table1")))
    assert series == {("KL", "cr"): {1: 51.5, 2: 20.0}, ("KL", "mor"): {3: 40.0}}


def test_a_revised_spec_in_the_same_folder_tabulates_only_its_own_cells(tmp_path, capsys):
    """The superseded spec's cells stay on disk (other config hashes) but must not be averaged into
    the revised spec's rows; cells of the revised spec not run yet (--only) are simply absent."""
    from rlkd.bench.orchestrate import run_cells

    class Ppl:
        def __init__(self, value):
            self.value = value

        def run(self, cell, workdir):
            return {"ppl": self.value}

    raw = {"name": "v", "layout": "table1", "tasks": [{"name": "pretrain"}], "objectives": ["kl"],
           "variants": ["none"], "seeds": [1, 2]}
    old = expand(parse_spec(_with_base(raw)))
    run_cells(old, tmp_path, spec_source="v.yaml", layout="table1", executor=Ppl(50.0), tables=False)
    revised = expand(parse_spec(_with_base({**raw, "defaults": {"train": {"lr": 3e-4}}})))
    assert {c.id for c in revised}.isdisjoint(c.id for c in old)
    assert run_cells(revised[:1], tmp_path, spec_source="v.yaml", layout="table1", executor=Ppl(10.0),
                     spec_cells=revised) == 0  # --only: one of the revised spec's two cells
    assert "2 cell folder(s)" in capsys.readouterr().err
    assert len(load_results(tmp_path)) == 3
    md = (tmp_path / "table.md").read_text()
    assert "| KL | **10.00** | 7.85 |" in md and "50.00" not in md and "30.00" not in md


@pytest.mark.parametrize("width", [6.0, 8.2, 11.0])
def test_plot_titles_are_wrapped_inside_the_figure(width):
    """A spec's long title once ran off both edges of a 2-panel forest plot: wrapped by the figure's
    width, every line must lie inside it, measured by matplotlib's own text extents."""
    import matplotlib.pyplot as plt

    from rlkd.bench.report.plots import _fitted

    title = ("Mini reproduction of Table 2, Dolly (SmolLM2-135M teacher, healed 16-layer student): effect of "
             "the ranking loss, Δ(+R) = with R − without R; every objective, with and without the ranking loss")
    fig = plt.figure(figsize=(width, 3))
    try:
        text = fig.suptitle(_fitted(title, fig, 10), fontsize=10)
        renderer = fig.canvas.get_renderer()
        box, frame = text.get_window_extent(renderer), fig.bbox
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1
        assert len(text.get_text().splitlines()) >= 2  # it did wrap
    finally:
        plt.close(fig)
