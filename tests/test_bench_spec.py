"""Grid specs: validation errors name the file and field, expansion matches a hand count."""

from __future__ import annotations

import itertools

import pytest

from rlkd.bench.spec import SpecError, config_hash, expand, filter_cells, load_spec, parse_spec

REGISTRY = lambda: ["kl", "rkl", "jsd", "tvd", "akl", "ce"]  # noqa: E731


def _write(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_expansion_is_the_cartesian_product_with_rank_only_shared(tmp_path):
    path = _write(tmp_path, """
tasks: [{name: gsm8k}, {name: dolly}]
objectives: [kl, rkl, jsd]
variants: [none, R, {name: rank_only, sweep: {k: [5, 15]}}]
seeds: [1, 2]
""")
    spec = load_spec(path, registry=REGISTRY)
    assert spec.name == "grid"  # default name: the file stem
    cells = expand(spec)
    # per task: 3 objectives x {none, R} x 2 seeds + Rank-{5,15} x 2 seeds (one per k, not per objective)
    assert len(cells) == 2 * (3 * 2 * 2 + 2 * 2)
    assert len({c["id"] for c in cells}) == len({c["config_hash"] for c in cells}) == len(cells)
    methods = {c["method"] for c in cells}
    assert methods == {"KL", "RKL", "JSD", "KL+R", "RKL+R", "JSD+R", "Rank-5", "Rank-15"}
    rank15 = [c for c in cells if c["method"] == "Rank-15"]
    assert all(c["loss"]["ranking"]["mode"] == "rank_only" and c["loss"]["ranking"]["k"] == 15 for c in rank15)


def test_sweep_does_not_multiply_cells_without_ranking():
    raw = {"name": "s", "tasks": [{"name": "t"}], "objectives": ["kl"], "variants": ["none", "R", "R_dynamic"],
           "seeds": [7], "sweep": {"k": [5, 10, 15], "train.lr": [1e-5, 2e-5]}}
    cells = expand(parse_spec(raw, registry=REGISTRY))
    by_method = {m: [c for c in cells if c["method"] == m] for m in {c["method"] for c in cells}}
    assert len(by_method["KL"]) == 2  # lr only
    assert len(by_method["KL+R"]) == len(by_method["KL+R (Dynamic)"]) == 6
    combos = {(c["sweep"]["k"], c["train"]["lr"]) for c in by_method["KL+R"]}
    assert combos == set(itertools.product([5, 10, 15], [1e-5, 2e-5]))
    assert {c["loss"]["ranking"]["mode"] for c in by_method["KL+R (Dynamic)"]} == {"dynamic"}


def test_cell_ids_are_stable_and_follow_the_config():
    raw = {"name": "s", "tasks": [{"name": "t"}], "objectives": ["kl"], "seeds": [7], "defaults": {"lr": 2e-5}}
    first = expand(parse_spec(raw, registry=REGISTRY))
    again = expand(parse_spec(dict(raw), registry=REGISTRY))
    assert [c["id"] for c in first] == [c["id"] for c in again]
    semantic = {k: first[0][k] for k in ("task", "kind", "reference", "seed", "loss", "train", "eval")}
    assert first[0]["config_hash"] == config_hash(semantic)
    assert first[0]["id"].endswith(first[0]["config_hash"][:10])
    changed = expand(parse_spec({**raw, "defaults": {"lr": 3e-5}}, registry=REGISTRY))
    assert {c["id"] for c in changed}.isdisjoint({c["id"] for c in first})


def test_a_newly_registered_objective_appears_by_name():
    raw = {"name": "s", "tasks": [{"name": "t"}], "objectives": ["my_div"], "seeds": [1]}
    with pytest.raises(SpecError, match="unknown objective 'my_div'"):
        parse_spec(raw, registry=REGISTRY)
    cells = expand(parse_spec(raw, registry=lambda: REGISTRY() + ["my_div"]))
    assert {c["method"] for c in cells} == {"MY_DIV", "MY_DIV+R"}


def test_the_real_registry_is_used_by_default():
    objectives = pytest.importorskip("rlkd.objectives")
    if not hasattr(objectives, "list_objectives"):
        pytest.skip("objective library not importable yet")
    names = objectives.list_objectives()
    cells = expand(parse_spec({"name": "s", "tasks": [{"name": "t"}], "objectives": names, "seeds": [1]}))
    assert {c["loss"]["objective"] for c in cells} == set(names)
    with pytest.raises(SpecError, match=r"objectives\.0\.params"):
        parse_spec({"name": "s", "tasks": [{"name": "t"}], "objectives": [{"name": "kl", "params": {"nope": 1}}]})


@pytest.mark.parametrize("text, fragment", [
    ("tasks: []\n", "tasks: List should have at least 1 item"),
    ("tasks: [{name: t}]\nobjectives: [kl]\nvariants: [sideways]\n", "variants.0.name: Value error, unknown variant 'sideways'"),
    ("tasks: [{name: t}]\nseeds: [one]\n", "seeds.0: Input should be a valid integer"),
    ("tasks: [{name: t}]\nsweep: {lr: [1]}\n", "sweep: Value error, sweep key 'lr'"),
    ("tasks: [{name: t}]\nranking: {kk: 3}\n", "unknown key(s) ['kk']"),
    ("tasks: [{name: t}]\ntypo_field: 1\n", "typo_field: Extra inputs are not permitted"),
    ("tasks: [{name: t}]\nobjectives: [kl, {name: kl}]\n", "duplicate row label"),
    ("tasks: [{name: 'a b'}]\n", "tasks.0.name"),
    ("tasks: [{name: t}\n", "grid.yaml:"),
    ("- just a list\n", "must be a mapping"),
])
def test_errors_name_the_file_and_the_field(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, registry=REGISTRY)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_and_tiny_without_section(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml", registry=REGISTRY)
    path = _write(tmp_path, "tasks: [{name: t}]\nobjectives: [kl]\n")
    with pytest.raises(SpecError, match="no 'tiny:' section"):
        load_spec(path, tiny=True, registry=REGISTRY)


def test_tiny_deep_merges_over_the_spec(tmp_path):
    path = _write(tmp_path, """
defaults: {teacher: big/teacher, student: big/student, lr: 2.0e-5, epochs: 2}
tasks: [{name: t}]
objectives: [kl]
tiny: {defaults: {teacher: "@tiny/teacher", student: "@tiny/student", max_examples: 8}}
""")
    cell = expand(load_spec(path, tiny=True, registry=REGISTRY))[0]
    assert cell["train"] == {"teacher": "@tiny/teacher", "student": "@tiny/student", "lr": 2e-5, "epochs": 2,
                             "max_examples": 8}


def test_references_and_filters():
    raw = {"name": "s", "tasks": [{"name": "t"}], "objectives": ["kl", "rkl"], "seeds": [1],
           "references": ["teacher", "student"], "defaults": {"teacher": "T", "student": "S", "lr": 1}}
    cells = expand(parse_spec(raw, registry=REGISTRY))
    refs = [c for c in cells if c["kind"] == "reference"]
    assert [c["method"] for c in refs] == ["Teacher", "Start"] and refs[0]["train"] == {"teacher": "T", "student": "S"}
    assert {c["method"] for c in filter_cells(cells, "KL+R")} == {"KL+R"}
    assert {c["method"] for c in filter_cells(cells, "KL+R,Teacher")} == {"KL+R", "Teacher"}
    assert {c["method"] for c in filter_cells(cells, r"re:^t-R?KL\+R-")} == {"KL+R", "RKL+R"}
    assert {c["method"] for c in filter_cells(cells, "t-Rank*,*-RKL-*")} == {"RKL"}
    with pytest.raises(SpecError, match="bad regex"):
        filter_cells(cells, "re:(")


def test_non_default_hyperparameters_are_part_of_the_row_label():
    from rlkd.bench.spec import ObjectiveRef, objective_label

    assert objective_label(ObjectiveRef(name="jsd", params={"beta": 0.1})) == "JSD(beta=0.1)"
    assert objective_label(ObjectiveRef(name="jsd", params={"beta": 0.5})) == "JSD"
    assert objective_label(ObjectiveRef(name="akl")) == "AKL"
    assert objective_label(ObjectiveRef(name="jsd", params={"beta": 0.1}, label="GKD")) == "GKD"
