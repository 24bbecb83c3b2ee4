"""Grid specs: one schema (partial run configs validated by RunConfig), errors that name the file
and the dotted field before any work, expansion that matches a hand count."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rlkd.bench.cli import main as bench_main
from rlkd.bench.spec import SpecError, canonical_run, config_hash, expand, filter_cells, load_spec, parse_spec

BASE = "defaults: {models: {teacher: T, student: S}, data: {task: gsm8k}}\n"
BASE_TREE = {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"}}


def _write(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _raw(**fields):
    return {"name": "s", "tasks": [{"name": "t"}], "defaults": BASE_TREE, **fields}


def test_expansion_is_the_cartesian_product_with_rank_only_shared(tmp_path):
    path = _write(tmp_path, BASE + """
tasks: [{name: gsm8k}, {name: dolly, run: {data: {task: dolly}}}]
objectives: [kl, rkl, jsd]
variants: [none, R, {name: rank_only, sweep: {k: [5, 15]}}]
seeds: [1, 2]
""")
    spec = load_spec(path)
    assert spec.name == "grid"  # default name: the file stem
    cells = expand(spec)
    # per task: 3 objectives x {none, R} x 2 seeds + Rank-{5,15} x 2 seeds (one per k, not per objective)
    assert len(cells) == 2 * (3 * 2 * 2 + 2 * 2)
    assert len({c.id for c in cells}) == len({c.config_hash for c in cells}) == len(cells)
    methods = {c.arm.method for c in cells}
    assert methods == {"KL", "RKL", "JSD", "KL+R", "RKL+R", "JSD+R", "Rank-5", "Rank-15"}
    rank15 = [c for c in cells if c.arm.method == "Rank-15"]
    assert all(c.run["loss"]["ranking"]["mode"] == "rank_only" and c.run["loss"]["ranking"]["k"] == 15
               for c in rank15)
    assert {c.run["data"]["task"] for c in cells if c.task == "dolly"} == {"dolly"}
    # the fields tables pair rows by: objective and variant, never the label
    kl_r = next(c for c in cells if c.arm.method == "KL+R")
    assert (kl_r.arm.objective_label, kl_r.arm.variant) == ("KL", "R")
    assert (rank15[0].arm.objective_label, rank15[0].arm.variant) == (None, "rank_only")


def test_sweep_does_not_multiply_cells_without_ranking():
    raw = _raw(objectives=["kl"], variants=["none", "R", "R_dynamic"], seeds=[7],
               sweep={"k": [5, 10, 15], "train.lr": [1e-5, 2e-5]})
    cells = expand(parse_spec(raw))
    by_method = {m: [c for c in cells if c.arm.method == m] for m in {c.arm.method for c in cells}}
    assert len(by_method["KL"]) == 2  # lr only
    assert len(by_method["KL+R"]) == len(by_method["KL+R (Dynamic)"]) == 6
    combos = {(c.arm.sweep["k"], c.run["train"]["lr"]) for c in by_method["KL+R"]}
    assert combos == set(itertools.product([5, 10, 15], [1e-5, 2e-5]))
    assert {c.run["loss"]["ranking"]["mode"] for c in by_method["KL+R (Dynamic)"]} == {"dynamic"}


def test_cell_ids_are_stable_and_follow_the_config():
    raw = _raw(objectives=["kl"], seeds=[7], defaults={**BASE_TREE, "train": {"lr": 2e-5}})
    first = expand(parse_spec(raw))
    again = expand(parse_spec(dict(raw)))
    assert [c.id for c in first] == [c.id for c in again]
    assert first[0].id.endswith(first[0].config_hash[:10])
    changed = expand(parse_spec({**raw, "defaults": {**BASE_TREE, "train": {"lr": 3e-5}}}))
    assert {c.id for c in changed}.isdisjoint({c.id for c in first})
    # spelling out a default value does not change the hash (the canonical form leaves defaults out)
    spelled = expand(parse_spec({**raw, "defaults": {**BASE_TREE, "train": {"lr": 2e-5, "grad_clip": 1.0}}}))
    assert [c.config_hash for c in spelled] == [c.config_hash for c in first]
    assert canonical_run(first[0].run) == canonical_run({**first[0].run, "log_every": 1})
    assert first[0].config_hash != config_hash({})


def test_the_real_registry_is_used():
    from rlkd.objectives import list_objectives

    names = list_objectives()
    cells = expand(parse_spec(_raw(objectives=names, seeds=[1])))
    assert {c.run["loss"]["objective"] for c in cells} == set(names)


def test_a_partial_run_config_is_merged_in_order():
    raw = _raw(defaults={**BASE_TREE, "train": {"lr": 1e-5, "max_steps": 9}},
               tasks=[{"name": "t", "run": {"train": {"lr": 2e-5}}}],
               objectives=[{"name": "kl", "run": {"train": {"max_steps": 3}}}],
               variants=[{"name": "R", "run": {"loss": {"ranking": {"k": 7}}}}], seeds=[1])
    (cell,) = expand(parse_spec(raw))
    assert cell.run["train"] == {"lr": 2e-5, "max_steps": 3}
    assert cell.run["loss"]["ranking"]["k"] == 7 and cell.arm.method == "KL+R"


def test_composed_losses_are_rows_too():
    raw = _raw(objectives=[{"label": "KL+0.5CE", "run": {"loss": {"terms": [{"objective": "kl"},
                                                                           {"objective": "ce", "weight": 0.5}]}}}],
               seeds=[1])
    cells = expand(parse_spec(raw))
    assert {c.arm.method for c in cells} == {"KL+0.5CE", "KL+0.5CE+R"}
    assert all("objective" not in c.run["loss"] for c in cells)


BAD_VALUES = [
    ("loss.ranking.k: 0", "defaults: {models: {teacher: T, student: S}, data: {task: gsm8k},"
     " loss: {ranking: {k: 0}}}\ntasks: [{name: t}]\nobjectives: [kl]\n", "loss.ranking.k"),
    ("unknown key deep down", BASE + "tasks: [{name: t, run: {train: {lrr: 1}}}]\nobjectives: [kl]\n",
     "train.lrr: unknown key"),
    ("unknown objective", BASE + "tasks: [{name: t}]\nobjectives: [my_div]\n", "unknown objective 'my_div'"),
    ("hyperparameter out of bounds", BASE + "tasks: [{name: t}]\nobjectives: [{name: jsd, params: {beta: 2}}]\n",
     "beta"),
    ("sweep over a missing path", BASE + "tasks: [{name: t}]\nobjectives: [kl]\nsweep: {train.lrate: [1]}\n",
     "sweep.train.lrate: 'train.lrate' is not a setting"),
    ("variant sweep over a missing path", BASE + "tasks: [{name: t}]\nobjectives: [kl]\n"
     "variants: [{name: R, sweep: {loss.ranking.kk: [1]}}]\n", "variants.0.sweep.loss.ranking.kk"),
    ("bad eval key", BASE + "tasks: [{name: t}]\nobjectives: [kl]\neval: {kind: task, limt: 3}\n", "eval.limt: unknown key"),
    ("bad stage", BASE + "tasks: [{name: t}]\nobjectives: [kl]\nstages: {student_sft: {train: {lr: -1}}}\n",
     "stages.student_sft"),
]


@pytest.mark.parametrize("what, text, fragment", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bench_refuses_bad_values_before_any_work(what, text, fragment, tmp_path, capsys):
    path = _write(tmp_path, text)
    for extra in ([], ["--dry-run"]):
        results = tmp_path / "results"
        assert bench_main([str(path), "--results-dir", str(results), *extra]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and fragment in err, err
        assert not results.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("text, fragment", [
    ("tasks: []\n", "tasks: List should have at least 1 item"),
    (BASE + "tasks: [{name: t}]\nobjectives: [kl]\nvariants: [sideways]\n", "variants[0].name: unknown variant 'sideways'"),
    (BASE + "tasks: [{name: t}]\nseeds: [one]\n", "seeds[0]: Input should be a valid integer"),
    (BASE + "tasks: [{name: t}]\ntypo_field: 1\n", "typo_field: unknown key"),
    (BASE + "tasks: [{name: t}]\nobjectives: [kl, {name: kl}]\n", "duplicate row label"),
    (BASE + "tasks: [{name: 'a b'}]\n", "tasks[0].name"),
    ("tasks: [{name: t}\n", "grid.yaml:"),
    ("- just a list\n", "must be a mapping"),
    ("tasks: [{name: t}]\nobjectives: [kl]\n", "models: Field required"),
])
def test_errors_name_the_file_and_the_field(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_and_tiny_without_section(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    path = _write(tmp_path, BASE + "tasks: [{name: t}]\nobjectives: [kl]\n")
    with pytest.raises(SpecError, match="no 'tiny:' section"):
        load_spec(path, tiny=True)


def test_tiny_deep_merges_over_the_spec(tmp_path):
    path = _write(tmp_path, """
defaults: {models: {teacher: big/teacher, student: big/student}, data: {task: gsm8k}, train: {lr: 2.0e-5, epochs: 2}}
tasks: [{name: t}]
objectives: [kl]
tiny: {defaults: {models: {teacher: "@tiny/teacher", student: "@tiny/student"}, data: {limit: 8}}}
""")
    cell = expand(load_spec(path, tiny=True))[0]
    assert cell.run["models"] == {"teacher": "@tiny/teacher", "student": "@tiny/student"}
    assert cell.run["data"] == {"task": "gsm8k", "limit": 8} and cell.run["train"]["epochs"] == 2


def test_references_and_filters():
    raw = _raw(objectives=["kl", "rkl"], seeds=[1], references=["teacher", "student"],
               defaults={**BASE_TREE, "train": {"lr": 1e-5}})
    cells = expand(parse_spec(raw))
    refs = [c for c in cells if c.kind == "reference"]
    assert [c.arm.method for c in refs] == ["Teacher", "Start"]
    assert refs[0].run == {"models": {"teacher": "T", "student": "S"}}  # scores the base models only
    assert {c.arm.method for c in filter_cells(cells, "KL+R")} == {"KL+R"}
    assert {c.arm.method for c in filter_cells(cells, "KL+R,Teacher")} == {"KL+R", "Teacher"}
    assert {c.arm.method for c in filter_cells(cells, r"re:^t-R?KL\+R-")} == {"KL+R", "RKL+R"}
    assert {c.arm.method for c in filter_cells(cells, "t-Rank*,*-RKL-*")} == {"RKL"}
    with pytest.raises(SpecError, match="bad regex"):
        filter_cells(cells, "re:(")


def test_non_default_hyperparameters_are_part_of_the_row_label():
    from rlkd.bench.spec import ObjectiveRef, objective_label

    assert objective_label(ObjectiveRef(name="jsd", params={"beta": 0.1})) == "JSD(beta=0.1)"
    assert objective_label(ObjectiveRef(name="jsd", params={"beta": 0.5})) == "JSD"
    assert objective_label(ObjectiveRef(name="akl")) == "AKL"
    assert objective_label(ObjectiveRef(name="jsd", params={"beta": 0.1}, label="GKD")) == "GKD"


def test_bad_seeds_on_the_command_line_are_one_clear_line(capsys):
    assert bench_main(["--seeds", "1,a", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rlkd bench: --seeds: expected comma-separated integers, got '1,a'"


def test_seeds_on_the_command_line_replace_each_variants_own_seeds_too(capsys):
    # mini Table 2 sets seeds per variant (1-5 for the ±R pairs, 1-3 for SFT): --seeds 2 leaves seed 2
    # of every trained row and the seedless reference rows, nothing else.
    spec_cells = expand(load_spec(Path(__file__).parents[2] / "benchmarks" / "mini" / "table2_dolly.yaml"))
    assert bench_main(["mini/table2_dolly", "--seeds", "2", "--dry-run", "--results-dir", "/nonexistent"]) == 0
    listed = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("  [")]
    expected = [c.id for c in spec_cells if c.arm.seed in (2, None)]
    assert listed == expected and len(expected) == 2 + 15
    assert {c.arm.method for c in spec_cells if c.id in listed} == {c.arm.method for c in spec_cells}


def test_a_top_k_teacher_cache_sweep_validates_with_the_benchmark_cache_and_hashes_without_it(tmp_path):
    # The cache folder is the benchmark's (filled in when a cell runs): a top-K sweep validates with
    # `teacher_cache: true`, its exact (None) cells hash as the same cells without the sweep's
    # setting would (the same config hash ends their ids), and without `teacher_cache: true` the spec is refused, naming the setting.
    grid = (BASE + "tasks: [{name: t}]\nobjectives: [kl]\nvariants: [none]\n"
            "sweep: {teacher_cache_top_k: [null, 32]}\n")
    cells = expand(load_spec(_write(tmp_path, grid + "teacher_cache: true\n")))
    by_k = {cell.arm.sweep["teacher_cache_top_k"]: cell for cell in cells}
    assert set(by_k) == {None, 32}
    assert by_k[32].run["teacher_cache_top_k"] == 32 and "teacher_cache" not in by_k[32].run
    plain_grid = BASE + "tasks: [{name: t}]\nobjectives: [kl]\nvariants: [none]\nteacher_cache: true\n"
    plain = expand(load_spec(_write(tmp_path, plain_grid, "plain.yaml")))
    assert by_k[None].id.rsplit("-", 1)[1] == plain[0].id.rsplit("-", 1)[1]
    assert by_k[32].id.rsplit("-", 1)[1] != plain[0].id.rsplit("-", 1)[1]
    with pytest.raises(SpecError, match="teacher_cache_top_k needs the spec's `teacher_cache: true`"):
        load_spec(_write(tmp_path, grid, "no_cache.yaml"))
