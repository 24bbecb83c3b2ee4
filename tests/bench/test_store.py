"""The results store: the one module that knows a cell's files. It reads records written before
records had a schema version (v0) by migrating them, and refuses a record it cannot trust with one
error naming the file and the field."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import rlkd
from rlkd.bench.records import SCHEMA_VERSION, Cell
from rlkd.bench.store import RecordError, load_results, read_record

REPO = Path(__file__).resolve().parents[2]

# A cell record exactly as rlkd wrote it before records carried a schema version (the committed
# results, and the benchmark still running from that code, write this).
V0_CONFIG = {
    "candidate": None, "config_hash": "ab" * 32, "eval": {"kind": "alignment"}, "id": "pretrain-KL+R-s2-abababab",
    "keep_checkpoints": False, "kind": "distill", "method": "KL+R", "objective_label": "KL", "reference": None,
    "run": {"loss": {"objective": "kl", "ranking": {"enabled": True, "k": 7}}, "seed": 2}, "seed": 2,
    "spec": "t", "stages": {}, "sweep": {}, "task": "pretrain", "teacher_cache": False, "teacher_generations": None,
    "variant": "R",
}


ARM_FIELDS = ("method", "objective_label", "variant", "seed", "sweep")


def as_v1(v0: dict) -> dict:
    """A v0 cell record as v1 writes it, spelled out here: the arm's fields grouped under ``arm``."""
    return {**{k: v for k, v in v0.items() if k not in ARM_FIELDS}, "arm": {k: v0[k] for k in ARM_FIELDS},
            "schema_version": 1}


def _write_v0(folder: Path, config=V0_CONFIG, metrics=None, status=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "status.json").write_text(json.dumps(status or {"status": "done", "config_hash": config["config_hash"],
                                                             "duration_s": 3.5}))
    (folder / "metrics.json").write_text(json.dumps(metrics or {"cr@2": 61.5, "ppl": 9}))
    (folder / "per_example.json").write_text(json.dumps({"cr@2": [60.0, 63.0]}))
    (folder / "provenance.json").write_text(json.dumps({"git_sha": "0123456789abcdef", "git_dirty": False,
                                                        "plugins": {}, "versions": {"python": "3.11"}}))
    return folder


def test_a_v0_record_is_read_migrated_to_the_current_version(tmp_path):
    result = read_record(_write_v0(tmp_path / "cell"))
    assert "schema_version" not in json.loads((tmp_path / "cell" / "config.json").read_text())  # not rewritten
    assert result.cell.schema_version == SCHEMA_VERSION == 1
    assert result.cell.record() == as_v1(V0_CONFIG)
    assert (result.cell.arm.method, result.cell.arm.seed, result.cell.ranking) == ("KL+R", 2, {"enabled": True, "k": 7})
    assert result.done and result.metrics == {"cr@2": 61.5, "ppl": 9.0}
    assert result.per_example == {"cr@2": [60.0, 63.0]}
    assert result.provenance.git_sha == "0123456789abcdef" and result.provenance.versions == {"python": "3.11"}
    assert result.status.duration_s == 3.5 and result.folder == tmp_path / "cell"


def test_a_v0_record_from_before_the_arm_fields_means_they_are_unknown(tmp_path):
    old = {k: v for k, v in V0_CONFIG.items() if k not in ("objective_label", "variant", "candidate")}
    cell = read_record(_write_v0(tmp_path / "cell", old)).cell
    assert (cell.arm.objective_label, cell.arm.variant, cell.candidate) == (None, None, None)


def test_every_committed_cell_record_reads_as_a_migrated_v0_record():
    folders = [p for name in ("default", "mini_table1") for p in sorted((REPO / "results" / name).iterdir())
               if (p / "status.json").is_file()]
    unreadable: list = []
    results = [r for name in ("default", "mini_table1") for r in load_results(REPO / "results" / name, unreadable)]
    assert not unreadable and len(results) == len(folders) == 89
    for result in results:
        raw = json.loads((result.folder / "config.json").read_text())
        assert "schema_version" not in raw and result.cell.record() == as_v1(raw)
        assert result.cell.id == result.folder.name


def test_a_record_of_a_future_version_is_refused_naming_file_and_field(tmp_path):
    folder = _write_v0(tmp_path / "cell", {**V0_CONFIG, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(RecordError) as error:
        read_record(folder)
    assert str(error.value).startswith(f"{folder / 'config.json'}: schema_version: 2 is not a version")
    unreadable: list = []
    assert load_results(tmp_path, unreadable) == [] and unreadable == [("cell", str(error.value))]


@pytest.mark.parametrize("field, value, file, where", [
    ("seed", "two", "config.json", "arm.seed"),
    ("kind", "train", "config.json", "kind"),
    ("stages", [], "config.json", "stages"),
])
def test_a_broken_cell_field_is_refused_naming_file_and_field(tmp_path, field, value, file, where):
    folder = _write_v0(tmp_path / "cell", {**V0_CONFIG, field: value})
    with pytest.raises(RecordError) as error:
        read_record(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / file}: {where}: ") and len(message.splitlines()) == 1


def test_broken_status_and_metrics_are_refused_naming_the_file(tmp_path):
    folder = _write_v0(tmp_path / "a", status={"status": "done", "config_hash": V0_CONFIG["config_hash"],
                                               "duration_s": "slow"})
    with pytest.raises(RecordError, match=rf"^{folder / 'status.json'}: duration_s: "):
        read_record(folder)
    folder = _write_v0(tmp_path / "b", metrics={"cr@2": True})
    with pytest.raises(RecordError, match=rf"^{folder / 'metrics.json'}: every metric must be a number"):
        read_record(folder)


def test_a_cell_written_today_carries_the_schema_version_and_reads_back_equal(tmp_path):
    from rlkd.bench.store import read_cell_config, write_cell_config

    cell = Cell.model_validate(as_v1(V0_CONFIG))
    write_cell_config(tmp_path, cell)
    assert json.loads((tmp_path / "config.json").read_text()) == as_v1(V0_CONFIG)
    assert read_cell_config(tmp_path) == cell


# Names of a cell's files in its results folder; only rlkd.bench.store may use them. A cached stage's
# folder is not a cell's: rlkd.bench.stages checks its export's own (model) config.json and writes the
# stage's training log.
CELL_FILES = {"config.json", "status.json", "metrics.json", "per_example.json", "provenance.json",
              "train_log.jsonl", "cell_result.json", "spec.json"}
ALLOWED = {("rlkd/bench/stages.py", "config.json"), ("rlkd/bench/stages.py", "train_log.jsonl")}


def test_only_the_store_names_a_cells_files():
    root = Path(rlkd.__file__).parent
    found = []
    for path in sorted((root / "bench").rglob("*.py")):
        where = str(path.relative_to(root.parent))
        if where == "rlkd/bench/store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # the name alone, or as the last part of a path or pattern ("*/provenance.json")
            name = node.value.rsplit("/", 1)[-1] if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            if name in CELL_FILES and (where, name) not in ALLOWED:
                found.append(f"{where}:{node.lineno}: {node.value}")
    assert not found, "cell files named outside rlkd.bench.store:\n" + "\n".join(found)


def test_per_example_scores_that_are_not_numbers_are_refused_naming_the_file(tmp_path):
    folder = _write_v0(tmp_path / "cell")
    (folder / "per_example.json").write_text(json.dumps({"cr@2": [60.0, "high"]}))
    with pytest.raises(RecordError, match=rf"^{folder / 'per_example.json'}: cr@2\.1: "):
        read_record(folder)
