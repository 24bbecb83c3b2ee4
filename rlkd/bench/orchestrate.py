"""Run, dry-run or hand to Slurm a list of cells in a results folder, then render its tables."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from rlkd.bench.executor import LocalExecutor, cell_engine_tree
from rlkd.bench.layout_schema import LayoutDeclaration
from rlkd.bench.records import Cell
from rlkd.bench.runner import ResultsNotWritable, code_provenance, run_grid
from rlkd.bench.stages import finished_stage, finished_stage_models, stage_dir
from rlkd.bench.store import (STAGING, cell_status, has_failed, is_done, read_json, read_record, write_json_atomic,
                              write_spec_record, write_text_atomic)


def stale_cells(cells: list[Cell], out_dir: Path) -> list[str]:
    """Finished cells whose recorded code (git sha, dirty flag, plug-in sources) differs from the
    code running now; a dirty checkout counts as different, since it cannot be identified."""
    from rlkd.plugins import current_hashes

    now = code_provenance()
    stale = []
    for cell in cells:
        final = out_dir / cell.id
        if not is_done(final, cell.config_hash):
            continue
        recorded = read_record(final).provenance  # a done record validates (is_done)
        plugins = cell.run.get("plugins") or []
        if (recorded.git_sha != now.git_sha or recorded.git_dirty or now.git_dirty
                or (plugins and recorded.plugins != current_hashes(plugins))):
            stale.append(cell.id)
    return stale


def run_cells(cells, out_dir: Path, *, spec_source: str, layout: str | LayoutDeclaration | None, jobs: int = 1,
              retry_failed: bool = True, tables: bool = True, executor=None, threads: int | None = None,
              rerun_stale: bool = False, reuse_processes: bool = False, spec_cells=None) -> int:
    """Run ``cells`` (a subset of the spec's ``spec_cells`` under ``--only``; all of them by default)
    into ``out_dir`` and render its tables from the spec's cells."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_spec_record(out_dir, source=_repo_relative(spec_source), layout=layout,
                      cell_ids=[c.id for c in (spec_cells or cells)])
    if rerun_stale:
        stale = set(stale_cells(cells, out_dir))
        if stale:
            print(f"rlkd bench: re-running {len(stale)} cell(s) that ran on other code (--rerun-stale)")
        for cell in cells:
            if cell.id in stale:
                _retire(out_dir, cell.id)
    started = time.time()
    # This invocation's entry in run_times.json, rewritten after every cell it finishes: a run killed
    # (e.g. at the end of a sitting) keeps its wall time up to its last cell.
    from rlkd.provenance import utc_now

    # to the millisecond: the entry's key, and two invocations of one grid may start in one second
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    this_run = {"started": now, "finished": None, "wall_minutes": 0.0, "jobs": jobs, "cells_run": 0}

    def cell_done(_cell: Cell) -> None:
        this_run.update(cells_run=this_run["cells_run"] + 1, wall_minutes=round((time.time() - started) / 60, 2))
        record_run_times(spec_cells or cells, out_dir, run=this_run)

    leaders = stage_leaders(cells, out_dir) if executor is None and jobs > 1 and not threads else []
    first_done: list[str] = []
    if leaders:
        # A stage runs inside the first cell that needs it, with that cell's threads; in a parallel
        # run that is one core while the other cells wait for it. Run those cells first, alone,
        # with every core.
        print(f"rlkd bench: {len(leaders)} cell(s) first, one at a time with every core, for the stages "
              "the others wait for")
        try:
            first_done = run_grid(leaders, out_dir, LocalExecutor(out_dir), jobs=1, retry_failed=retry_failed,
                                  on_cell_done=cell_done).done
        except ResultsNotWritable as exc:
            print(f"rlkd bench: {exc}", file=sys.stderr)
            return 1
    executor = executor or LocalExecutor(out_dir, threads=threads if threads else (None if jobs <= 1 else 1),
                                         reuse_processes=reuse_processes)
    try:
        summary = run_grid(cells, out_dir, executor, jobs=jobs, retry_failed=retry_failed, on_cell_done=cell_done)
    except ResultsNotWritable as exc:
        print(f"rlkd bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if hasattr(executor, "close"):
            executor.close()
    summary.done[:0] = first_done
    summary.skipped = [c for c in summary.skipped if c not in first_done]
    # Every spec cell's minutes, not only this invocation's: a grid resumed with --only keeps the others'.
    this_run.update(finished=utc_now(), wall_minutes=round((time.time() - started) / 60, 2))
    record_run_times(spec_cells or cells, out_dir, run=this_run if this_run["cells_run"] else None)
    print(f"rlkd bench: {len(summary.done)} run, {len(summary.skipped)} already done, "
          f"{len(summary.elsewhere)} done by another runner, {len(summary.failed)} failed of {summary.total} cells")
    for cell_id, error in summary.failed.items():
        print(f"  failed: {cell_id}: {error}")
    if tables:
        from rlkd.bench.table_cli import make_tables

        try:
            paths = make_tables(out_dir, layout)
        except FileNotFoundError as exc:
            print(f"rlkd bench: no table: {exc}")
        else:
            for kind, path in paths.items():
                print(f"  {kind:>14}: {path}")
    return 0 if summary.ok else 1


def stage_leaders(cells: list[Cell], out_dir: Path) -> list[Cell]:
    """Pending cells that together need every stage not run yet, the first such cell for each."""
    shared, covered, leaders = out_dir / ".shared", set(), []
    for cell in cells:
        if is_done(out_dir / cell.id, cell.config_hash):
            continue
        missing = {str(stage_dir(cell, role, shared)) for role in cell.stages
                   if finished_stage(cell, role, shared) is None}
        if missing - covered:
            leaders.append(cell)
            covered |= missing
    return leaders


RUN_TIMES = "run_times.json"


def record_run_times(cells, out_dir: Path, *, run: dict | None = None) -> None:
    """``run_times.json``: the measured minutes of each finished cell and cached stage, and the wall
    time of every invocation that ran cells (a resumed grid has several). ``run``: this invocation's
    entry (``started``, ``finished``, ``wall_minutes``, ``jobs``, ``cells_run``), added or, if its
    ``started`` is there already, replaced; an entry whose ``finished`` is null is a run that was
    killed (or is still running), its wall time counted to its last finished cell. A cell's minutes
    include the stages, teacher generations and teacher-logit cache it happened to build first. A
    ``note`` written by hand (contention, machine) is kept. Runners sharing the folder take turns."""
    from rlkd.bench.stages import stage_seconds
    from rlkd.provenance import file_lock

    path = out_dir / RUN_TIMES
    with file_lock(out_dir / f".{RUN_TIMES}.lock"):
        previous = read_json(path) if path.is_file() else {}
        runs = [r for r in previous.get("runs") or [] if run is None or r.get("started") != run["started"]]
        if run is not None:
            runs.append(dict(run))
        stages: dict[str, float] = {}
        minutes: dict[str, float] = {}
        for cell in cells:
            for name, seconds in stage_seconds(cell, out_dir / ".shared").items():
                stages[name] = round(seconds / 60, 2)
            status = cell_status(out_dir / cell.id)
            if status is not None and status.status == "done" and status.duration_s is not None:
                minutes[cell.id] = round(status.duration_s / 60, 2)
        if not (runs or minutes):
            return
        note = {"note": previous["note"]} if previous.get("note") else {}
        write_json_atomic(path, {"stage_minutes": stages, "cell_minutes": minutes,
                                 "cell_minutes_total": round(sum(minutes.values()), 1),
                                 "wall_minutes_total": round(sum(r["wall_minutes"] for r in runs), 1), "runs": runs,
                                 **note})


def _repo_relative(source: str) -> str:
    """A spec path inside the repository as a repository-relative path: no machine path in results/."""
    from rlkd.paths import REPO_ROOT

    try:
        return str(Path(source).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return source


def _retire(out_dir: Path, cell_id: str) -> None:
    """Move a finished cell's record aside so that the runner runs the cell again."""
    import os

    final = out_dir / cell_id
    target = out_dir / STAGING / f"{cell_id}.stale.{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(final, target)


def dry_run(cells, out_dir: Path, *, show_config: bool = False, slurm: dict[str, int] | None = None) -> int:
    counts = {"done": 0, "failed": 0, "pending": 0}
    stale = set(stale_cells(cells, out_dir))
    print(f"{len(cells)} cells -> {out_dir}/")
    for cell in cells:
        final = out_dir / cell.id
        status = "done" if is_done(final, cell.config_hash) else \
            ("failed" if has_failed(final) else "pending")
        counts[status] += 1
        note = " (ran on other code)" if cell.id in stale else ""
        print(f"  [{status:>7}] {cell.id}{note}")
        if show_config:
            shown = {"run": cell.run, "stages": cell.stages, "eval": cell.eval}
            print("            " + json.dumps(shown, sort_keys=True))
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    if slurm is not None:
        print_slurm(cells, out_dir, nodes=slurm["nodes"], gpus_per_node=slurm["gpus_per_node"])
    return 0


def print_slurm(cells, out_dir: Path, *, nodes: int, gpus_per_node: int) -> None:
    """One `rlkd launch slurm` job per pending cell; the engine config is written next to it. The
    jobs train into the cells' staging directories; running the spec again afterwards (without
    --slurm) evaluates and stores each cell whose training finished there, without retraining."""
    import yaml

    print("\n# Slurm: one job per cell (run configs written under .slurm/); afterwards "
          "`rlkd bench SPEC` evaluates and stores the trained cells")
    for cell in cells:
        if is_done(out_dir / cell.id, cell.config_hash) or cell.kind != "distill":
            continue
        if cell.teacher_generations:
            print(f"# {cell.id}: trains on teacher generations; run it locally (rlkd bench SPEC --only ...)")
            continue
        run = dict(cell.run)
        exports, missing = finished_stage_models(cell, out_dir / ".shared")
        run["models"] = {**run.get("models", {}), **exports}
        if missing:
            print(f"# {cell.id}: its {' and '.join(missing)} stage has not run yet; "
                  "run one cell locally first (rlkd bench SPEC --only ...), which runs the stage once")
            continue
        config_path = out_dir / ".slurm" / f"{cell.id}.yaml"
        tree = cell_engine_tree(cell.model_copy(update={"run": run}), out_dir / STAGING / cell.id / "train",
                                cache_dir=out_dir / ".cache", shared_dir=out_dir / ".shared", create_models=False)
        write_text_atomic(config_path, yaml.safe_dump(tree, sort_keys=False))
        print(shlex.join(["rlkd", "launch", "slurm", "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node),
                          "--config", str(config_path), "--job-name", cell.id[:60], "--resume"]))
