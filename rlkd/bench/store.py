"""The results store: the one module that knows a cell's files. It writes them so that a kill at any
instant loses nothing, and reads them back as validated :class:`rlkd.bench.records.CellResult`s,
migrating records of older schema versions (config.json without ``schema_version`` is version 0).

    results/<spec>/
        spec.json                  the expanded spec (name, layout, cells) of the latest run
        <cell id>/                 a finished or failed cell, only ever appears whole
            config.json            the cell (rlkd.bench.records.Cell; its config hash is part of the id)
            status.json            {"status": "done"|"failed", ...; error + traceback if failed}
            metrics.json           flat {metric: value} (done cells only)
            provenance.json        versions, git sha, host, timings
            per_example.json       {metric: [value per evaluation example]} (optional)
            train_log.jsonl ...    the training log; whatever else the executor wrote (evaluation)
        .staging/<cell id>/        a cell being run; kept across restarts so training can resume

A cell becomes visible only by renaming its complete staging directory into place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from rlkd.bench.layout_schema import LayoutDeclaration
from rlkd.bench.records import SCHEMA_VERSION, Cell, CellResult, CellStatus, Provenance
from rlkd.provenance import atomic_write_json, atomic_write_jsonl
from rlkd.provenance import atomic_write_text as write_text_atomic  # noqa: F401  (used by the CLI and tables)

STAGING = ".staging"

# Test hook: ``RLKD_KILL_AT=<point>`` makes the bench die by SIGKILL, runner and cell processes
# together (their process group, as a killed job's would), the first time it reaches the named
# point, so tests can kill a run exactly where a crash or a kill would hurt most.
KILL_ENV = "RLKD_KILL_AT"
KILL_POINTS = ("stage-trained", "cell-trained", "cell-evaluated", "cell-result-written", "before-publish",
               "mid-publish")


def kill_point(name: str) -> None:
    assert name in KILL_POINTS, name
    if os.environ.get(KILL_ENV) == name:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def write_json_atomic(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload, sort_keys=True)


def read_json(path: Path) -> Any:
    with path.open() as handle:
        return json.load(handle)


# The files the runner commits into a cell's record (the executor's own files, e.g. an evaluation
# folder, are kept but not part of the record).
CONFIG, STATUS, METRICS, PER_EXAMPLE, PROVENANCE = ("config.json", "status.json", "metrics.json",
                                                    "per_example.json", "provenance.json")
RECORD_JSON = (CONFIG, STATUS, METRICS, PER_EXAMPLE, PROVENANCE)
TRAIN_LOG = "train_log.jsonl"  # the training's log rows, one JSON object a line
RECORD_JSONL = (TRAIN_LOG,)
SPEC = "spec.json"  # the results folder's expanded spec


class RecordError(ValueError):
    """A cell record that cannot be trusted; the message names the file (and field, if one)."""


def _json_problem(path: Path) -> tuple[Any, str | None]:
    try:
        return read_json(path), None
    except FileNotFoundError:
        return None, "missing"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


def _read_json_file(path: Path) -> Any:
    value, problem = _json_problem(path)
    if problem:
        raise RecordError(f"{path}: {problem}")
    return value


def _object(path: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# -- migration of older cell records -------------------------------------------------------------
# A record's version is its config.json's ``schema_version``; records written before it existed are
# version 0. Each step turns version n into n + 1; a record is read only at SCHEMA_VERSION.

# Fields that v0 cells gained over time, with the value their absence meant.
_V0_ABSENT_MEANS = {"objective_label": None, "variant": None, "reference": None, "candidate": None,
                    "teacher_generations": None, "teacher_cache": False, "keep_checkpoints": False, "stages": {}}
_V1_ARM = ("method", "objective_label", "variant", "seed", "sweep")


def _v0_to_v1(config: dict[str, Any]) -> dict[str, Any]:
    """v0 (no schema_version; some fields absent in the oldest records) kept the arm's fields at the
    top level; v1 groups them under ``arm``."""
    full = {**_V0_ABSENT_MEANS, **config}
    return {**{k: v for k, v in full.items() if k not in _V1_ARM},
            "arm": {k: full[k] for k in _V1_ARM if k in full}, "schema_version": 1}


MIGRATIONS = {0: _v0_to_v1}


def migrate_cell(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """A cell record as read from ``path``, brought to SCHEMA_VERSION; RecordError for a version
    this rlkd does not know (a newer rlkd wrote it)."""
    version = config.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version: {version!r} is not a version this rlkd reads "
                          f"(0 to {SCHEMA_VERSION}); a newer rlkd wrote it")
    while version < SCHEMA_VERSION:
        config = MIGRATIONS[version](config)
        version += 1
    return config


def _validated(model: type[BaseModel], value: Any, path: Path) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(record)"
        raise RecordError(f"{path}: {where}: {error['msg']}") from None


def read_record(cell_dir: Path) -> CellResult:
    """The published record in ``cell_dir``, migrated and validated; RecordError naming the file
    (and field) when it cannot be trusted: a record torn by a disk that filled up, a copy that
    stopped half-way or an edit by hand is not a finished cell."""
    status_path, config_path = cell_dir / STATUS, cell_dir / CONFIG
    raw_status = _read_json_file(status_path)
    if not isinstance(raw_status, dict) or raw_status.get("status") not in ("done", "failed"):
        raise RecordError(f"{status_path}: not a status record ({{\"status\": \"done\"|\"failed\", ...}})")
    status = _validated(CellStatus, raw_status, status_path)
    raw_config = _read_json_file(config_path)
    if not isinstance(raw_config, dict) or raw_config.get("config_hash") != status.config_hash:
        found = raw_config.get("config_hash") if isinstance(raw_config, dict) else raw_config
        raise RecordError(f"{config_path}: its config_hash does not match status.json's ({found!r} vs "
                          f"{status.config_hash})")
    cell = _validated(Cell, migrate_cell(raw_config, config_path), config_path)
    parts: dict[str, Any] = {}
    for name in (METRICS, PER_EXAMPLE, PROVENANCE):
        path = cell_dir / name
        if name == METRICS and status.status == "done" or path.exists():
            parts[name] = _object(path, _read_json_file(path))
    metrics = parts.get(METRICS)
    if status.status == "done" and not metrics:
        raise RecordError(f"{cell_dir / METRICS}: no metrics")
    if metrics is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in metrics.values()):
        raise RecordError(f"{cell_dir / METRICS}: every metric must be a number")
    # Lists of no values say nothing (a metric without per-example scores); they are left out.
    per_example = {k: v for k, v in parts.get(PER_EXAMPLE, {}).items() if not (isinstance(v, list) and not v)}
    for name in RECORD_JSONL:
        _check_jsonl(cell_dir / name)
    provenance = _validated(Provenance, parts.get(PROVENANCE, {}), cell_dir / PROVENANCE)
    try:
        return CellResult(cell=cell, status=status, metrics=metrics, per_example=per_example,
                          provenance=provenance, folder=cell_dir)
    except ValidationError as exc:
        error = exc.errors()[0]
        file = {"per_example": PER_EXAMPLE, "metrics": METRICS}.get(str(error["loc"][0]) if error["loc"] else "", CONFIG)
        where = ".".join(str(part) for part in error["loc"][1:])
        raise RecordError(f"{cell_dir / file}: {where + ': ' if where else ''}{error['msg']}") from None


def _check_jsonl(path: Path) -> None:
    if not path.exists():
        return
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    json.loads(line)
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def cell_status(cell_dir: Path) -> CellStatus | None:
    """The status record of a published cell directory, or None if there is none (or it is torn or
    not a status record)."""
    try:
        return CellStatus.model_validate(read_json(cell_dir / STATUS))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, ValidationError):
        return None


def has_failed(cell_dir: Path) -> bool:
    """Whether the published record in ``cell_dir`` is of a failed run."""
    status = cell_status(cell_dir)
    return status is not None and status.status == "failed"


def record_problem(cell_dir: Path) -> str | None:
    """Why the published record in ``cell_dir`` cannot be trusted, naming the file (None: it reads
    and validates, see :func:`read_record`)."""
    try:
        read_record(cell_dir)
    except RecordError as exc:
        return str(exc)
    return None


def is_done(cell_dir: Path, config_hash: str) -> bool:
    """A cell is done only when its record validates (:func:`record_problem`) and is a finished run
    of exactly this config."""
    status = cell_status(cell_dir)
    if status is None or status.status != "done" or status.config_hash != config_hash:
        return False
    return record_problem(cell_dir) is None


def invalid_done_record(cell_dir: Path, config_hash: str) -> str | None:
    """The problem of a record that claims this config finished but does not validate (None when
    there is no such claim, or the record is sound)."""
    status = cell_status(cell_dir)
    if status is not None and (status.status != "done" or status.config_hash != config_hash):
        return None
    if status is None and not (cell_dir / STATUS).exists():
        return None
    return record_problem(cell_dir)


def publish(staging_dir: Path, final_dir: Path) -> None:
    """Move a complete cell directory into place, replacing an older (failed) record if any."""
    if final_dir.exists():
        # Rename the old record out of the way first: the final name is never half-written.
        graveyard = final_dir.parent / STAGING / f"{final_dir.name}.old.{os.getpid()}"
        os.replace(final_dir, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
    os.replace(staging_dir, final_dir)


def is_cell_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and ((path / STATUS).exists() or (path / CONFIG).exists())


def load_results(results_dir: Path, unreadable: list[tuple[str, str]] | None = None) -> list[CellResult]:
    """Every published cell under ``results_dir``, in folder-name order, validated.

    A record that does not validate is left out; ``unreadable`` (if given) gets (cell folder name,
    problem naming the file) for each, so the caller can say which cells it could not read."""
    results = []
    for cell_dir in sorted(p for p in results_dir.iterdir() if is_cell_folder(p)):
        try:
            results.append(read_record(cell_dir))
        except RecordError as exc:
            if unreadable is not None:
                unreadable.append((cell_dir.name, str(exc)))
    return results


# -- writing a cell's record -------------------------------------------------------------------


def write_cell_config(cell_dir: Path, cell: Cell) -> None:
    """The cell's ``config.json`` in a (staging) cell folder."""
    write_json_atomic(cell_dir / CONFIG, cell.record())


def read_cell_config(cell_dir: Path) -> Cell:
    """The cell a (staging) cell folder runs (for the cell's own process), migrated and validated."""
    path = cell_dir / CONFIG
    return _validated(Cell, migrate_cell(_object(path, _read_json_file(path)), path), path)


def holds_only_config(cell_dir: Path) -> bool:
    """Whether a staging folder holds nothing but the cell's config (a run that never started)."""
    return all(p.name == CONFIG for p in cell_dir.iterdir())


def write_failed(cell_dir: Path, cell: Cell, status: dict[str, Any], provenance: Provenance) -> None:
    """A failed cell's whole record into ``cell_dir`` (to be published)."""
    write_cell_config(cell_dir, cell)
    write_json_atomic(cell_dir / STATUS, {"status": "failed", "config_hash": cell.config_hash, **status})
    write_json_atomic(cell_dir / PROVENANCE, provenance.to_json())


def write_done(cell_dir: Path, cell: Cell, metrics: dict[str, float], per_example: dict[str, list[float]],
               provenance: Provenance) -> None:
    """A finished cell's record into its staging folder, status last (a record is done only once
    every other file is complete)."""
    write_json_atomic(cell_dir / METRICS, {k: float(v) for k, v in metrics.items()})
    kill_point("mid-publish")
    if per_example:
        write_json_atomic(cell_dir / PER_EXAMPLE, per_example)
    write_json_atomic(cell_dir / PROVENANCE, provenance.to_json())
    write_json_atomic(cell_dir / STATUS, {"status": "done", "config_hash": cell.config_hash,
                                          "duration_s": provenance.duration_s})


def write_train_log(cell_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_jsonl(cell_dir / TRAIN_LOG, rows)


# -- a cell process's result, handed to the runner inside the staging folder ---------------------
RESULT = "cell_result.json"  # {"metrics": {...}, "per_example": {...}}; kept if a killed run wrote it


def write_cell_result(cell_dir: Path, metrics: dict[str, float], per_example: dict[str, list[float]]) -> None:
    atomic_write_json(cell_dir / RESULT, {"metrics": metrics, "per_example": per_example})


def read_cell_result(cell_dir: Path) -> tuple[dict[str, float], dict[str, list[float]]] | None:
    """The result a cell process wrote (None if there is none, or it is torn): the staging folder
    is keyed by the config hash, so it is this config's result, reused after a kill."""
    try:
        result = json.loads((cell_dir / RESULT).read_text(encoding="utf-8"))
        metrics, per_example = result["metrics"], result["per_example"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (metrics, per_example) if isinstance(metrics, dict) and metrics and isinstance(per_example, dict) else None


def remove_cell_result(cell_dir: Path) -> None:
    (cell_dir / RESULT).unlink()


# -- the results folder's spec record ------------------------------------------------------------


def write_spec_record(results_dir: Path, *, source: str, layout: str | LayoutDeclaration | None,
                      cell_ids: list[str]) -> None:
    """``spec.json``: the source, layout and cell ids of the spec that ran last into ``results_dir``.
    A spec's own layout is recorded whole, so the folder renders without the spec file."""
    recorded = layout.model_dump(mode="json") if isinstance(layout, LayoutDeclaration) else layout
    write_json_atomic(results_dir / SPEC, {"source": source, "layout": recorded, "cells": list(cell_ids)})


def spec_record_path(results_dir: Path) -> Path:
    return results_dir / SPEC


def read_spec_record(results_dir: Path) -> dict[str, Any]:
    """The folder's spec record ({} when there is none); ValueError naming the file when torn."""
    path = results_dir / SPEC
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record
