"""Layouts are data: the shipped layouts are declarations (rlkd/bench/table_layouts/*.yaml), and a
spec may declare its own, so a metric rlkd has never heard of gets its verdict table and plot."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from scipy import stats

from rlkd.bench.layout_schema import LayoutDeclaration, shipped_layout, shipped_layout_names
from rlkd.bench.records import Provenance
from rlkd.bench.spec import SpecError, expand, load_spec
from rlkd.bench.store import publish, write_cell_config, write_done, write_spec_record
from rlkd.bench.table_cli import main as table_main

SPEC = """
name: mine
layout:
  name: mine
  title: My own benchmark
  sections:
    - title: Scores
      columns: [{key: t/my_score, header: my_score}, {key: t/my_cost, header: my_cost, better: lower}]
  headlines: [{header: my_score, keys: [t/my_score]}]
defaults: {models: {teacher: T, student: S}, data: {task: gsm8k}}
tasks: [{name: t}]
objectives: [kl]
variants: [none, R]
seeds: [1, 2, 3]
"""
# my_score of each arm per seed (chosen so that the differences vary: a real t statistic).
WITHOUT_R = {1: 0.50, 2: 0.61, 3: 0.55}
WITH_R = {1: 0.58, 2: 0.64, 3: 0.66}


def test_a_spec_with_its_own_layout_gets_its_own_verdict_and_plot(tmp_path):
    spec_path = tmp_path / "mine.yaml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    cells = expand(spec, source=str(spec_path))
    assert sorted((c.arm.variant, c.arm.seed) for c in cells) == [(v, s) for v in ("R", "none") for s in (1, 2, 3)]
    results = tmp_path / "results"
    for cell in cells:
        score = (WITH_R if cell.arm.variant == "R" else WITHOUT_R)[cell.arm.seed]
        staging = results / ".staging" / cell.id
        staging.mkdir(parents=True)
        write_cell_config(staging, cell)
        write_done(staging, cell, {"my_score": score, "my_cost": 10.0 + cell.arm.seed}, {}, Provenance(duration_s=1.0))
        publish(staging, results / cell.id)
    write_spec_record(results, source=str(spec_path), layout=spec.layout, cell_ids=[c.id for c in cells])
    spec_path.unlink()  # the folder renders from its own records

    assert table_main([str(results)]) == 0

    verdict = (results / "table.md").read_text().split("\n### ")[0]
    assert "| Comparison | seeds | my_score |" in verdict and "KL+R − KL" in verdict
    rows = [r for r in csv.DictReader(io.StringIO((results / "table.csv").read_text()))
            if r["table"] == "Effect of the ranking loss"]
    assert [(r["row"], r["header"], r["interval"]) for r in rows] == [("KL+R − KL", "my_score", "seeds")]
    expected = stats.ttest_rel([WITH_R[s] for s in (1, 2, 3)], [WITHOUT_R[s] for s in (1, 2, 3)])
    assert float(rows[0]["mean"]) == pytest.approx(sum(WITH_R.values()) / 3 - sum(WITHOUT_R.values()) / 3)
    assert float(rows[0]["p"]) == pytest.approx(expected.pvalue)
    png = (results / "effect.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # the declared table: its own title and section, my_cost marked best where it is lowest
    md = (results / "table.md").read_text()
    assert "My own benchmark — Scores" in md and "| KL | " in md


def test_rlkd_table_takes_a_layout_file_of_ones_own(tmp_path):
    """The same folder rendered by a layout in a YAML file: its own title, its cost as the headline
    (a paired t-test on my_cost), and a bad file refused with its name and field."""
    spec_path = tmp_path / "mine.yaml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    cells = expand(spec, source=str(spec_path))
    results = tmp_path / "results"
    cost = {("R", s): 10.0 + s * s for s in (1, 2, 3)} | {("none", s): 11.0 + s for s in (1, 2, 3)}
    for cell in cells:
        staging = results / ".staging" / cell.id
        staging.mkdir(parents=True)
        write_cell_config(staging, cell)
        write_done(staging, cell, {"my_score": 0.5, "my_cost": cost[cell.arm.variant, cell.arm.seed]}, {},
                   Provenance(duration_s=1.0))
        publish(staging, results / cell.id)
    write_spec_record(results, source=str(spec_path), layout=spec.layout, cell_ids=[c.id for c in cells])
    layout = tmp_path / "cost.yaml"
    layout.write_text(yaml.safe_dump({"name": "cost", "title": "What it costs", "sections": [
        {"title": "Cost", "columns": [{"key": "t/my_cost", "header": "cost", "better": "lower"}]}],
        "headlines": [{"header": "cost", "keys": ["t/my_cost"]}]}))
    out = tmp_path / "by_cost"
    assert table_main([str(results), "--layout", str(layout), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "What it costs — Cost" in md and "my_score" not in md.split("\n### ")[0]
    (row,) = [r for r in csv.DictReader(io.StringIO((out / "table.csv").read_text()))
              if r["table"] == "Effect of the ranking loss"]
    expected = stats.ttest_rel([cost["R", s] for s in (1, 2, 3)], [cost["none", s] for s in (1, 2, 3)])
    assert row["header"] == "cost" and float(row["p"]) == pytest.approx(expected.pvalue)

    layout.write_text(yaml.safe_dump({"name": "cost", "title": "T", "headlines": [{"header": "cost", "keys": []}]}))
    assert table_main([str(results), "--layout", str(layout), "--out", str(out)]) == 2
    from rlkd.bench.layout_schema import layout_file
    with pytest.raises(ValueError, match=r"cost\.yaml: invalid layout declaration\n  headlines\[0\]\.keys: "):
        layout_file(layout)


def test_a_contrast_pairs_cells_that_differ_in_one_sweep_key(tmp_path):
    """A layout's contrast: Δ = (temperature 2) − (temperature 1) per objective and variant over the
    shared seeds, against scipy's paired t-test and Holm over the table's two tests."""
    raw = yaml.safe_load(SPEC)
    raw["sweep"] = {"loss.temperature": [1.0, 2.0]}
    raw["layout"]["contrasts"] = [{"sweep": "temperature", "reference": 1.0, "title": "Hot − cold"}]
    spec_path = _write(tmp_path, yaml.safe_dump(raw))
    spec = load_spec(spec_path)
    cells = expand(spec, source=str(spec_path))
    assert len(cells) == 12
    score = {}
    for cell in cells:
        hot, ranked, seed = cell.arm.sweep["temperature"] == 2.0, cell.arm.variant == "R", cell.arm.seed
        score[cell.id] = 0.5 + 0.1 * ranked + (0.03 * seed * seed + 0.02 if hot else 0.0) + 0.01 * seed
    results = tmp_path / "results"
    for cell in cells:
        staging = results / ".staging" / cell.id
        staging.mkdir(parents=True)
        write_cell_config(staging, cell)
        write_done(staging, cell, {"my_score": score[cell.id], "my_cost": 1.0}, {}, Provenance(duration_s=1.0))
        publish(staging, results / cell.id)
    write_spec_record(results, source=str(spec_path), layout=spec.layout, cell_ids=[c.id for c in cells])
    assert table_main([str(results)]) == 0

    md = (results / "table.md").read_text()
    assert "### Hot − cold" in md and "| KL+R [temperature=2.0] − KL+R [temperature=1.0] | 3 |" in md
    rows = [r for r in csv.DictReader(io.StringIO((results / "table.csv").read_text())) if r["table"] == "Hot − cold"]
    assert sorted(r["row"] for r in rows) == ["KL [temperature=2.0] − KL [temperature=1.0]",
                                              "KL+R [temperature=2.0] − KL+R [temperature=1.0]"]
    hot = [0.03 * s * s + 0.02 for s in (1, 2, 3)]
    expected = stats.ttest_rel([h + 0.01 * s for h, s in zip(hot, (1, 2, 3))], [0.01 * s for s in (1, 2, 3)])
    for row in rows:
        assert float(row["mean"]) == pytest.approx(sum(hot) / 3)
        assert float(row["p"]) == pytest.approx(expected.pvalue)
        assert float(row["p_holm"]) == pytest.approx(min(1.0, 2 * expected.pvalue))  # Holm over 2 equal p
    # the ±R verdict still pairs within each temperature
    verdict = [r["row"] for r in csv.DictReader(io.StringIO((results / "table.csv").read_text()))
               if r["table"] == "Effect of the ranking loss"]
    assert sorted(verdict) == ["KL+R [temperature=1.0] − KL [temperature=1.0]",
                               "KL+R [temperature=2.0] − KL [temperature=2.0]"]


def test_shipped_layouts_are_declarations_and_a_spec_names_them(tmp_path):
    names = shipped_layout_names()
    assert ({"generic", "default", "mini_table1", "mini_table2", "sparse_teacher"} | {f"table{i}" for i in range(1, 9)}
            == set(names))
    for name in names:
        assert shipped_layout(name).name == name
    # the mean-of headline, written as data: Table 1's mean CR@2–5
    (mean_cr,) = [h for h in shipped_layout("table1").headlines if h.header == "mean CR@2–5"]
    assert mean_cr.keys == [f"pretrain/cr@{k}" for k in (2, 3, 4, 5)]
    raw = yaml.safe_load(SPEC)
    (tmp_path / "named.yaml").write_text(yaml.safe_dump({**raw, "layout": "table1"}))
    assert load_spec(tmp_path / "named.yaml").layout == "table1"
    assert isinstance(load_spec(_write(tmp_path, SPEC)).layout, LayoutDeclaration)


def _write(tmp_path, text, name="spec.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize("layout, field", [
    ("tabel1", "layout"),
    (json.dumps({"name": "x", "title": "X", "headlines": [{"header": "h", "keys": []}]}),
     "layout.declaration.headlines[0].keys"),
    (json.dumps({"name": "x", "title": "X", "sections": [{"columns": [{"key": "t/a", "header": "a",
                                                                         "better": "up"}]}]}),
     "layout.declaration.sections[0].columns[0].better"),
])
def test_a_bad_layout_is_refused_when_the_spec_is_read(tmp_path, layout, field):
    raw = yaml.safe_load(SPEC)
    raw["layout"] = yaml.safe_load(layout)
    with pytest.raises(SpecError) as error:
        load_spec(_write(tmp_path, yaml.safe_dump(raw)))
    assert field in str(error.value)


def test_column_keys_are_built_from_their_parts_and_metric_names_read_once():
    from rlkd.bench.report.layouts import AtK, ColumnKey, at_k

    # the key texts the shipped layouts and the paper's numbers use (e.g. Table 5, Table 8)
    swept = ColumnKey("gsm8k", "correct", ("k", 15))
    assert swept.text == "gsm8k/correct|k=15" and swept.without_sweep().text == "gsm8k/correct"
    assert ColumnKey("gsm8k", "correct", None, "Pearson").text == "Pearson:gsm8k/correct"
    assert at_k("heldout_cr@2") == AtK("heldout_", "cr", 2) and at_k("true_mor@20") == AtK("true_", "mor", 20)
    assert at_k("cr@5") == AtK("", "cr", 5) and at_k("ppl") is None and at_k("rouge_pkg_rougeL") is None
