"""On-disk layout of a benchmark's results, written so that a kill at any instant loses nothing.

    results/<spec>/
        spec.json                  the expanded spec (name, layout, cells) of the latest run
        <cell id>/                 a finished or failed cell, only ever appears whole
            config.json            the cell (its config hash is part of the id)
            status.json            {"status": "done"|"failed", ...; error + traceback if failed}
            metrics.json           flat {metric: value} (done cells only)
            provenance.json        versions, git sha, host, timings
            train_log.jsonl ...    whatever the executor wrote (training log, predictions)
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

from rlkd.provenance import atomic_write_json
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


def cell_status(cell_dir: Path) -> dict[str, Any] | None:
    """The status record of a published cell directory, or None if there is none (or it is torn)."""
    try:
        status = read_json(cell_dir / "status.json")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, NotADirectoryError):
        return None
    return status if isinstance(status, dict) else None


# The files the runner commits into a cell's record (the executor's own files, e.g. an evaluation
# folder, are kept but not part of the record).
RECORD_JSON = ("config.json", "status.json", "metrics.json", "per_example.json", "provenance.json")
RECORD_JSONL = ("train_log.jsonl",)


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


def record_problem(cell_dir: Path) -> str | None:
    """Why the published record in ``cell_dir`` cannot be trusted, naming the file (None: every
    committed file parses, and config, status and metrics agree). A record torn by a disk that
    filled up, a copy that stopped half-way or an edit by hand is not a finished cell."""
    status, problem = _json_problem(cell_dir / "status.json")
    if problem:
        return f"{cell_dir / 'status.json'}: {problem}"
    if not isinstance(status, dict) or status.get("status") not in ("done", "failed"):
        return f"{cell_dir / 'status.json'}: not a status record ({{\"status\": \"done\"|\"failed\", ...}})"
    config, problem = _json_problem(cell_dir / "config.json")
    if problem:
        return f"{cell_dir / 'config.json'}: {problem}"
    if not isinstance(config, dict) or config.get("config_hash") != status.get("config_hash"):
        return (f"{cell_dir / 'config.json'}: its config_hash does not match status.json's "
                f"({(config or {}).get('config_hash') if isinstance(config, dict) else config!r} vs "
                f"{status.get('config_hash')})")
    for name in RECORD_JSON[2:]:
        path = cell_dir / name
        if name == "metrics.json" and status["status"] == "done" or path.exists():
            value, problem = _json_problem(path)
            if problem:
                return f"{path}: {problem}"
            if not isinstance(value, dict):
                return f"{path}: expected a JSON object, got {type(value).__name__}"
            if name == "metrics.json" and not value:
                return f"{path}: no metrics"
            if name == "metrics.json" and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value.values()):
                return f"{path}: every metric must be a number"
    for name in RECORD_JSONL:
        path = cell_dir / name
        if not path.exists():
            continue
        try:
            with path.open(encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, start=1):
                    if line.strip():
                        json.loads(line)
        except UnicodeDecodeError:
            return f"{path}: not UTF-8 text"
        except json.JSONDecodeError as exc:
            return f"{path}:{lineno}: not valid JSON ({exc.msg})"
    return None


def is_done(cell_dir: Path, config_hash: str) -> bool:
    """A cell is done only when its record validates (:func:`record_problem`) and is a finished run
    of exactly this config."""
    status = cell_status(cell_dir)
    if not status or status.get("status") != "done" or status.get("config_hash") != config_hash:
        return False
    return record_problem(cell_dir) is None


def invalid_done_record(cell_dir: Path, config_hash: str) -> str | None:
    """The problem of a record that claims this config finished but does not validate (None when
    there is no such claim, or the record is sound)."""
    status = cell_status(cell_dir)
    if status is not None and (status.get("status") != "done" or status.get("config_hash") != config_hash):
        return None
    if status is None and not (cell_dir / "status.json").exists():
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


def load_cells(results_dir: Path, unreadable: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every published cell under ``results_dir``: config, status and (for done cells) metrics.

    A record that does not validate is left out; ``unreadable`` (if given) gets (cell id, problem
    naming the file) for each, so the caller can say which cells it could not read."""
    cells = []
    for cell_dir in sorted(p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (cell_dir / "status.json").exists() and not (cell_dir / "config.json").exists():
            continue  # not a cell folder
        problem = record_problem(cell_dir)
        if problem is not None:
            if unreadable is not None:
                unreadable.append((cell_dir.name, problem))
            continue
        status = read_json(cell_dir / "status.json")
        entry = {"dir": cell_dir, "config": read_json(cell_dir / "config.json"), "status": status, "metrics": None}
        if status.get("status") == "done":
            entry["metrics"] = read_json(cell_dir / "metrics.json")
        cells.append(entry)
    return cells
