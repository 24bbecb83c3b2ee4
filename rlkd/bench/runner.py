"""Run the cells of a grid: skip finished ones, record failures and go on, resume after a kill."""

from __future__ import annotations

import fcntl
import os
import platform
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Protocol

from tqdm import tqdm

from rlkd.bench.stages import stage_fingerprints
from rlkd.bench.store import STAGING, is_done, publish, write_json_atomic
from rlkd.plugins import current_hashes
from rlkd.provenance import git_state, package_versions


class CellExecutor(Protocol):
    def run(self, cell: dict[str, Any], workdir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Train/export/evaluate one cell inside ``workdir``; return its flat metrics and its
        per-example scores ({metric: [value per evaluation example]}, possibly empty).

        ``workdir`` survives a killed run, so an executor may resume from what it left there."""


@dataclass
class RunSummary:
    total: int
    skipped: list[str] = field(default_factory=list)  # finished before this run
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # id -> error line
    elsewhere: list[str] = field(default_factory=list)  # finished by another runner while this one waited

    @property
    def ok(self) -> bool:
        return not self.failed


def code_provenance() -> dict[str, Any]:
    """What ran a cell: git sha and dirty flag of rlkd, package versions, the machine's kind."""
    code = git_state()
    return {"git_sha": code["sha"], "git_dirty": code["dirty"], "versions": package_versions(),
            "machine": {"system": platform.system(), "arch": platform.machine(), "cpus": os.cpu_count()}}


@contextmanager
def _cell_lock(lock_path: Path, wait: bool = False) -> Iterator[bool]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_cell(cell: dict[str, Any], out_dir: Path, executor: CellExecutor, static: dict[str, Any],
             wait: bool = False) -> str:
    """Run one cell; returns "done", "done elsewhere" (another runner finished it while this one
    waited), "failed: <error>" or "busy" (another runner holds it and ``wait`` is False)."""
    staging_dir = out_dir / STAGING / cell["id"]
    final_dir = out_dir / cell["id"]
    with _cell_lock(out_dir / STAGING / f"{cell['id']}.lock", wait=wait) as locked:
        if not locked:
            return "busy"
        if is_done(final_dir, cell["config_hash"]):
            return "done elsewhere"
        staging_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(staging_dir / "config.json", cell)
        started = time.time()
        plugins = (cell.get("run") or {}).get("plugins") or []
        provenance = {**static, "plugins": current_hashes(plugins) if plugins else {},
                      "started": datetime.now(timezone.utc).isoformat(),
                      "resumed": any(p.name not in {"config.json"} for p in staging_dir.iterdir())}
        try:
            result = executor.run(cell, staging_dir)
            metrics, per_example = result if isinstance(result, tuple) else (result, {})
            if not isinstance(metrics, dict) or not metrics:
                raise TypeError(f"executor returned {type(metrics).__name__} {metrics!r}, expected non-empty metrics")
        except Exception as exc:  # a failed cell must not stop the grid
            error = f"{type(exc).__name__}: {exc}" if type(exc).__name__ != "CellProcessError" else str(exc)
            failed_dir = out_dir / STAGING / f"{cell['id']}.failed.{os.getpid()}.{threading.get_ident()}"
            failed_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(failed_dir / "config.json", cell)
            write_json_atomic(failed_dir / "status.json", {
                "status": "failed", "config_hash": cell["config_hash"], "error": error,
                "traceback": traceback.format_exc(), "duration_s": time.time() - started,
                "staging": f"{STAGING}/{cell['id']}"})
            write_json_atomic(failed_dir / "provenance.json", provenance)
            publish(failed_dir, final_dir)
            return f"failed: {error.splitlines()[0] if error else type(exc).__name__}"
        provenance["finished"] = datetime.now(timezone.utc).isoformat()
        provenance["duration_s"] = time.time() - started
        if cell.get("stages"):  # which exports of the cached stages this cell started from
            provenance["stages"] = stage_fingerprints(cell, out_dir / ".shared")
        write_json_atomic(staging_dir / "metrics.json", {k: float(v) for k, v in metrics.items()})
        if per_example:
            write_json_atomic(staging_dir / "per_example.json", per_example)
        write_json_atomic(staging_dir / "provenance.json", provenance)
        write_json_atomic(staging_dir / "status.json", {"status": "done", "config_hash": cell["config_hash"],
                                                        "duration_s": provenance["duration_s"]})
        publish(staging_dir, final_dir)
        return "done"


def run_grid(
    cells: list[dict[str, Any]],
    out_dir: Path,
    executor: CellExecutor,
    *,
    jobs: int = 1,
    retry_failed: bool = True,
    progress: bool = True,
) -> RunSummary:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(total=len(cells))
    pending = []
    for cell in cells:
        final_dir = out_dir / cell["id"]
        if is_done(final_dir, cell["config_hash"]):
            summary.skipped.append(cell["id"])
        elif not retry_failed and (final_dir / "status.json").is_file():
            summary.failed[cell["id"]] = "failed earlier (not retried)"
        else:
            pending.append(cell)
    static = code_provenance()
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), unit="cell", desc=out_dir.name,
               disable=not progress, dynamic_ncols=True)

    busy: list[dict[str, Any]] = []

    def record(cell: dict[str, Any], outcome: str) -> None:
        if outcome == "done":
            summary.done.append(cell["id"])
        elif outcome == "done elsewhere":
            summary.elsewhere.append(cell["id"])
        elif outcome == "busy":
            busy.append(cell)
            return
        else:
            summary.failed[cell["id"]] = outcome.removeprefix("failed: ")
            tqdm.write(f"[rlkd bench] cell {cell['id']} failed: {summary.failed[cell['id']]}")
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))

    try:
        if jobs <= 1:
            for cell in pending:
                bar.set_postfix_str(cell["id"])
                record(cell, run_cell(cell, out_dir, executor, static))
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(run_cell, cell, out_dir, executor, static): cell for cell in pending}
                for future in as_completed(futures):
                    record(futures[future], future.result())
        # Cells another runner was working on: wait for it, and run them here only if it stopped
        # without finishing them, so every cell is done exactly once.
        for cell in busy:
            record(cell, run_cell(cell, out_dir, executor, static, wait=True))
    finally:
        bar.close()
    return summary
