"""Run the cells of a grid: skip finished ones, record failures and go on, resume after a kill."""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import sys
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

from rlkd.bench.store import STAGING, is_done, publish, write_json_atomic


class CellExecutor(Protocol):
    def run(self, cell: dict[str, Any], workdir: Path) -> dict[str, float]:
        """Train/export/evaluate one cell inside ``workdir``; return its flat metrics.

        ``workdir`` survives a killed run, so an executor may resume from what it left there."""


@dataclass
class RunSummary:
    total: int
    skipped: list[str] = field(default_factory=list)  # finished before this run
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # id -> error line
    busy: list[str] = field(default_factory=list)  # locked by another runner

    @property
    def ok(self) -> bool:
        return not self.failed


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("rlkd", "torch", "transformers", "deepspeed", "rouge-score", "lm-eval"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


@contextmanager
def _cell_lock(lock_path: Path) -> Iterator[bool]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_cell(cell: dict[str, Any], out_dir: Path, executor: CellExecutor, static: dict[str, Any]) -> str:
    """Run one cell; returns "done", "failed: <error>" or "busy"."""
    staging_dir = out_dir / STAGING / cell["id"]
    final_dir = out_dir / cell["id"]
    with _cell_lock(out_dir / STAGING / f"{cell['id']}.lock") as locked:
        if not locked:
            return "busy"
        if is_done(final_dir, cell["config_hash"]):
            return "done"
        staging_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(staging_dir / "config.json", cell)
        started = time.time()
        provenance = {**static, "started": datetime.now(timezone.utc).isoformat(), "pid": os.getpid(),
                      "resumed": any(p.name not in {"config.json"} for p in staging_dir.iterdir())}
        try:
            metrics = executor.run(cell, staging_dir)
            if not isinstance(metrics, dict) or not metrics:
                raise TypeError(f"executor returned {type(metrics).__name__} {metrics!r}, expected non-empty metrics")
        except Exception as exc:  # a failed cell must not stop the grid
            error = f"{type(exc).__name__}: {exc}"
            failed_dir = out_dir / STAGING / f"{cell['id']}.failed.{os.getpid()}.{threading.get_ident()}"
            failed_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(failed_dir / "config.json", cell)
            write_json_atomic(failed_dir / "status.json", {
                "status": "failed", "config_hash": cell["config_hash"], "error": error,
                "traceback": traceback.format_exc(), "duration_s": time.time() - started,
                "staging": str(staging_dir)})
            write_json_atomic(failed_dir / "provenance.json", provenance)
            publish(failed_dir, final_dir)
            return f"failed: {error.splitlines()[0] if error else type(exc).__name__}"
        provenance["finished"] = datetime.now(timezone.utc).isoformat()
        provenance["duration_s"] = time.time() - started
        write_json_atomic(staging_dir / "metrics.json", {k: float(v) for k, v in metrics.items()})
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
    static = {"git_sha": _git_sha(), "versions": _versions(), "host": platform.node(), "argv": sys.argv}
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), unit="cell", desc=out_dir.name,
               disable=not progress, dynamic_ncols=True)

    def record(cell: dict[str, Any], outcome: str) -> None:
        if outcome == "done":
            summary.done.append(cell["id"])
        elif outcome == "busy":
            summary.busy.append(cell["id"])
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
    finally:
        bar.close()
    return summary
