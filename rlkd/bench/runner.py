"""Run the cells of a grid: skip finished ones, record failures and go on, resume after a kill."""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from tqdm import tqdm

from rlkd.bench.records import Cell, Machine, Provenance
from rlkd.bench.stages import stage_fingerprints
from rlkd.bench.store import (STAGING, has_failed, holds_only_config, invalid_done_record, is_done, kill_point,
                              publish, write_cell_config, write_done, write_failed)
from rlkd.plugins import current_hashes
from rlkd.provenance import cpu_identity, git_state, package_versions, removable_lock


class CellExecutor(Protocol):
    def run(self, cell: Cell, workdir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
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


def code_provenance() -> Provenance:
    """What ran a cell: git sha and dirty flag of rlkd, package versions, the machine's kind."""
    code = git_state()
    return Provenance(git_sha=code["sha"], git_dirty=code["dirty"], versions=package_versions(),
                      machine=Machine(system=platform.system(), arch=platform.machine(), cpus=os.cpu_count(),
                                      **cpu_identity()))


class ResultsNotWritable(OSError):
    """The results folder cannot be written: the grid stops (what is done stays done)."""


def _not_writable(out_dir: Path, exc: OSError) -> ResultsNotWritable:
    where = f" ({exc.filename})" if exc.filename else ""
    return ResultsNotWritable(f"results folder {out_dir} is not writable: {exc.strerror or exc}{where}; "
                              "the cells already done are kept: make it writable (or free space) and run again")


def run_cell(cell: Cell, out_dir: Path, executor: CellExecutor, static: Provenance,
             wait: bool = False) -> str:
    """Run one cell; returns "done", "done elsewhere" (another runner finished it while this one
    waited), "failed: <error>" or "busy" (another runner holds it and ``wait`` is False)."""
    staging_dir = out_dir / STAGING / cell.id
    final_dir = out_dir / cell.id
    with removable_lock(out_dir / STAGING / f"{cell.id}.lock", wait=wait) as locked:
        if not locked:
            return "busy"
        if is_done(final_dir, cell.config_hash):
            return "done elsewhere"
        try:
            staging_dir.mkdir(parents=True, exist_ok=True)
            write_cell_config(staging_dir, cell)
        except OSError as exc:
            raise _not_writable(out_dir, exc) from None
        started = time.time()
        plugins = cell.run.get("plugins") or []
        provenance = static.model_copy(update={"plugins": current_hashes(plugins) if plugins else {},
                                               "started": datetime.now(timezone.utc).isoformat(),
                                               "resumed": not holds_only_config(staging_dir)})
        try:
            result = executor.run(cell, staging_dir)
            metrics, per_example = result if isinstance(result, tuple) else (result, {})
            if not isinstance(metrics, dict) or not metrics:
                raise TypeError(f"executor returned {type(metrics).__name__} {metrics!r}, expected non-empty metrics")
        except Exception as exc:  # a failed cell must not stop the grid
            error = f"{type(exc).__name__}: {exc}" if type(exc).__name__ != "CellProcessError" else str(exc)
            failed_dir = out_dir / STAGING / f"{cell.id}.failed.{os.getpid()}.{threading.get_ident()}"
            try:
                failed_dir.mkdir(parents=True, exist_ok=True)
                write_failed(failed_dir, cell, {"error": error, "traceback": traceback.format_exc(),
                                                "duration_s": time.time() - started,
                                                "staging": f"{STAGING}/{cell.id}"}, provenance)
                publish(failed_dir, final_dir)
            except OSError as write_error:
                shutil.rmtree(failed_dir, ignore_errors=True)
                raise _not_writable(out_dir, write_error) from None
            return f"failed: {error.splitlines()[0] if error else type(exc).__name__}"
        kill_point("before-publish")
        try:
            _commit(cell, metrics, per_example, provenance, staging_dir, final_dir, out_dir, started)
        except OSError as exc:
            raise _not_writable(out_dir, exc) from None
        return "done"


def _commit(cell: Cell, metrics, per_example, provenance: Provenance, staging_dir: Path, final_dir: Path,
            out_dir: Path, started: float) -> None:
    """Write the cell's record into its staging folder and publish it (status.json last)."""
    finished = {"finished": datetime.now(timezone.utc).isoformat(), "duration_s": time.time() - started}
    if cell.stages:  # which exports of the cached stages this cell started from
        finished["stages"] = stage_fingerprints(cell, out_dir / ".shared")
    provenance = provenance.model_copy(update=finished)
    write_done(staging_dir, cell, metrics, per_example, provenance)
    publish(staging_dir, final_dir)


def run_grid(
    cells: list[Cell],
    out_dir: Path,
    executor: CellExecutor,
    *,
    jobs: int = 1,
    retry_failed: bool = True,
    progress: bool = True,
    on_cell_done: Callable[[Cell], None] | None = None,
) -> RunSummary:
    """Run the cells of ``cells`` not done yet into ``out_dir``, ``jobs`` at a time; ``on_cell_done``
    is called (in this thread) after each cell this call finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(total=len(cells))
    pending = []
    for cell in cells:
        final_dir = out_dir / cell.id
        if is_done(final_dir, cell.config_hash):
            summary.skipped.append(cell.id)
            continue
        problem = invalid_done_record(final_dir, cell.config_hash)
        if problem is not None:  # a torn or edited record is not a result: the cell runs again
            print(f"[rlkd bench] cell {cell.id}: invalid record, running the cell again: {problem}", flush=True)
            pending.append(cell)
        elif not retry_failed and has_failed(final_dir):
            summary.failed[cell.id] = "failed earlier (not retried)"
        else:
            pending.append(cell)
    static = code_provenance()
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), unit="cell", desc=out_dir.name,
               disable=not progress, dynamic_ncols=True)

    busy: list[Cell] = []

    def record(cell: Cell, outcome: str) -> None:
        if outcome == "done":
            summary.done.append(cell.id)
            if on_cell_done is not None:
                on_cell_done(cell)
        elif outcome == "done elsewhere":
            summary.elsewhere.append(cell.id)
        elif outcome == "busy":
            busy.append(cell)
            return
        else:
            summary.failed[cell.id] = outcome.removeprefix("failed: ")
            tqdm.write(f"[rlkd bench] cell {cell.id} failed: {summary.failed[cell.id]}")
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))

    try:
        if jobs <= 1:
            for cell in pending:
                bar.set_postfix_str(cell.id)
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
        try:  # an empty staging folder is not left behind by a finished run
            (out_dir / STAGING).rmdir()
        except OSError:
            pass
    return summary
