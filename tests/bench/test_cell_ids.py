"""Cell ids never change: each ends in a hash of the cell's canonical config, and the committed
results folders (and any benchmark still running) find their cells by it.

``shipped_cell_ids.json`` was written by the code of commit d01433e, before cells became typed
(a spec added later is pinned by the commit that adds it): the
ids of every shipped spec (benchmarks/**.yaml), with and without its ``tiny`` overrides, and of the
embedded benchmark with and without --quick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlkd.bench.default import default_spec
from rlkd.bench.spec import expand, load_spec

REPO = Path(__file__).resolve().parents[2]
PINNED = json.loads((Path(__file__).parent / "shipped_cell_ids.json").read_text())


def _ids(key: str) -> list[str]:
    if key.startswith("embedded default"):
        return [cell.id for cell in expand(default_spec(quick=key.endswith("--quick")))]
    path, _, flag = key.partition(" ")
    return [cell.id for cell in expand(load_spec(REPO / path, tiny=flag == "--tiny"), source=path)]


def test_every_shipped_spec_is_pinned():
    shipped = {str(p.relative_to(REPO)) for p in REPO.glob("benchmarks/**/*.yaml")}
    assert shipped == {key.partition(" ")[0] for key in PINNED if not key.startswith("embedded")}
    for path in shipped:
        assert (f"{path} --tiny" in PINNED) == bool(yaml.safe_load((REPO / path).read_text()).get("tiny"))


@pytest.mark.parametrize("key", sorted(PINNED))
def test_shipped_spec_ids_are_unchanged(key):
    assert _ids(key) == PINNED[key]


@pytest.mark.parametrize("folder", ["default", "mini_table1", "mini_table2", "sparse_teacher"])
def test_committed_results_name_the_cells_of_their_spec(folder):
    """Each committed folder's spec.json lists exactly the cells its spec still expands to, in order
    (mini Table 2's rerun records all 71 and the sparse teacher's run all 36, finished or not)."""
    recorded = json.loads((REPO / "results" / folder / "spec.json").read_text())
    source = recorded["source"]
    ids = _ids("embedded default") if source.startswith("embedded default") else _ids(source)
    assert ids == recorded["cells"]
