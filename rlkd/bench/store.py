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
from pathlib import Path
from typing import Any

from rlkd.provenance import atomic_write_json
from rlkd.provenance import atomic_write_text as write_text_atomic  # noqa: F401  (used by the CLI and tables)

STAGING = ".staging"


def write_json_atomic(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload, sort_keys=True)


def read_json(path: Path) -> Any:
    with path.open() as handle:
        return json.load(handle)


def cell_status(cell_dir: Path) -> dict[str, Any] | None:
    """The status record of a published cell directory, or None if there is none (or it is torn)."""
    try:
        return read_json(cell_dir / "status.json")
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None


def is_done(cell_dir: Path, config_hash: str) -> bool:
    status = cell_status(cell_dir)
    if not status or status.get("status") != "done" or status.get("config_hash") != config_hash:
        return False
    return (cell_dir / "metrics.json").is_file()


def publish(staging_dir: Path, final_dir: Path) -> None:
    """Move a complete cell directory into place, replacing an older (failed) record if any."""
    if final_dir.exists():
        # Rename the old record out of the way first: the final name is never half-written.
        graveyard = final_dir.parent / STAGING / f"{final_dir.name}.old.{os.getpid()}"
        os.replace(final_dir, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
    os.replace(staging_dir, final_dir)


def load_cells(results_dir: Path) -> list[dict[str, Any]]:
    """Every published cell under ``results_dir``: config, status and (for done cells) metrics."""
    cells = []
    for cell_dir in sorted(p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        status = cell_status(cell_dir)
        config_file = cell_dir / "config.json"
        if status is None or not config_file.is_file():
            continue
        entry = {"dir": cell_dir, "config": read_json(config_file), "status": status, "metrics": None}
        if status.get("status") == "done":
            entry["metrics"] = read_json(cell_dir / "metrics.json")
        cells.append(entry)
    return cells
