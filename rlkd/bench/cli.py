"""`rlkd bench [SPEC] [--only FILTER] [--dry-run] [--jobs N] [--tiny] [--slurm]`.

Without SPEC it runs the embedded offline benchmark (rlkd.bench.default) into results/default/.
SPEC is a YAML file, or a name under the repository's benchmarks/ folder (``paper/table2``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rlkd.bench.spec import SpecError, expand, filter_cells, load_spec
from rlkd.bench.store import cell_status, is_done, write_json_atomic, write_text_atomic


def resolve_spec_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    from rlkd.paths import REPO_ROOT

    for candidate in (REPO_ROOT / "benchmarks" / name, REPO_ROOT / "benchmarks" / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise SpecError(f"{name}: no such spec file (looked in . and {REPO_ROOT / 'benchmarks'})")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise SpecError("--seeds: no seed given")
    return seeds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlkd bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", help="grid spec YAML or benchmarks/ name; omit for the embedded benchmark")
    parser.add_argument("--only", help="run a subset: method labels, task names, id globs/substrings, re:REGEX "
                                       "(comma-separated)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--jobs", type=int, default=None, help="cells run at once, each in its own process "
                                                               "(default: 1; the embedded benchmark: 2)")
    parser.add_argument("--tiny", action="store_true", help="apply the spec's tiny: override (tiny local models, "
                                                            "a few examples)")
    parser.add_argument("--results-dir", type=Path, help="default: results/<spec name>[-tiny]")
    parser.add_argument("--skip-failed", action="store_true", help="do not retry cells that failed before")
    parser.add_argument("--show-config", action="store_true", help="with --dry-run: print each cell's config")
    parser.add_argument("--slurm", action="store_true", help="with --dry-run: print one `rlkd launch slurm` "
                                                             "command per pending cell")
    parser.add_argument("--nodes", type=int, default=1, help="--slurm: nodes per cell job")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="--slurm: GPUs per node")
    parser.add_argument("--no-table", action="store_true", help="do not write tables after the run")
    parser.add_argument("--seeds", help="comma-separated seeds replacing the spec's (finished seeds are reused), "
                                        "e.g. --seeds 1,2,3")
    parser.add_argument("--quick", action="store_true", help="embedded benchmark only: a smaller, faster version")
    return parser


def _dry_run(cells, out_dir: Path, args) -> int:
    counts = {"done": 0, "failed": 0, "pending": 0}
    print(f"{len(cells)} cells -> {out_dir}/")
    for cell in cells:
        final = out_dir / cell["id"]
        status = "done" if is_done(final, cell["config_hash"]) else \
            ("failed" if (cell_status(final) or {}).get("status") == "failed" else "pending")
        counts[status] += 1
        print(f"  [{status:>7}] {cell['id']}")
        if args.show_config:
            print("            " + json.dumps({k: cell[k] for k in ("loss", "train", "eval")}, sort_keys=True))
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    problems = check_engine_configs(cells, out_dir)
    for cell_id, problem in problems:
        print(f"  engine config of {cell_id}: {problem}")
    if args.slurm:
        _print_slurm(cells, out_dir, args)
    return 1 if problems else 0


def check_engine_configs(cells, out_dir: Path) -> list[tuple[str, str]]:
    """Render every training cell to the engine's config and validate it, without building anything."""
    from rlkd.bench.cell import run_config, validate_run_config

    problems = []
    for cell in cells:
        if cell["kind"] != "distill":
            continue
        try:
            tree = run_config(cell, out_dir / ".staging" / cell["id"] / "train", cache_dir=out_dir / ".cache",
                              create_models=False)
            validate_run_config(tree)
        except Exception as exc:  # noqa: BLE001 - report every broken cell, not only the first
            problems.append((cell["id"], f"{type(exc).__name__}: {exc}"))
    return problems


def _print_slurm(cells, out_dir: Path, args) -> None:
    """One `rlkd launch slurm` job per pending cell; the engine config is written next to it. The
    jobs train into the cells' staging directories; running the spec again afterwards (without
    --slurm) evaluates and stores each cell whose training finished there, without retraining."""
    from rlkd.bench.cell import finished_stage, run_config

    print("\n# Slurm: one job per cell (run configs written under .slurm/); afterwards "
          "`rlkd bench SPEC` evaluates and stores the trained cells")
    for cell in cells:
        if is_done(out_dir / cell["id"], cell["config_hash"]) or cell["kind"] != "distill":
            continue
        train = dict(cell["train"])
        if train.get("teacher_generations"):
            print(f"# {cell['id']}: trains on teacher generations; run it locally (rlkd bench SPEC --only ...)")
            continue
        missing = []
        for role in ("teacher", "student"):
            if not train.get(f"{role}_sft"):
                continue
            stage_export = finished_stage(cell, role, out_dir / ".shared")
            if stage_export is None:
                missing.append(role)
            else:
                train[role] = stage_export
        if missing:
            print(f"# {cell['id']}: its {' and '.join(r + '_sft' for r in missing)} stage has not run yet; "
                  "run one cell locally first (rlkd bench SPEC --only ...), which runs the stage once")
            continue
        config_path = out_dir / ".slurm" / f"{cell['id']}.yaml"
        try:
            tree = run_config(cell, out_dir / ".staging" / cell["id"] / "train", cache_dir=out_dir / ".cache",
                              train=train, create_models=False)
        except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not stop
            print(f"# {cell['id']}: cannot render ({type(exc).__name__}: {exc})")
            continue
        import yaml

        write_text_atomic(config_path, yaml.safe_dump(tree, sort_keys=False))
        print(shlex.join(["rlkd", "launch", "slurm", "--nodes", str(args.nodes), "--gpus-per-node",
                          str(args.gpus_per_node), "--config", str(config_path), "--job-name", cell["id"][:60],
                          "--resume"]))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.spec is None:
        from rlkd.bench.default import run_default

        return run_default(args)
    try:
        path = resolve_spec_path(args.spec)
        spec = load_spec(path, tiny=args.tiny)
        if args.seeds:
            spec.seeds = parse_seeds(args.seeds)
        cells = filter_cells(expand(spec), args.only)
    except SpecError as exc:
        print(f"rlkd bench: {exc}", file=sys.stderr)
        return 2
    if not cells:
        print(f"rlkd bench: --only {args.only!r} selects no cell of {path}", file=sys.stderr)
        return 2
    name = spec.name + ("-tiny" if args.tiny else "")
    out_dir = args.results_dir or Path("results") / name
    if args.dry_run:
        return _dry_run(cells, out_dir, args)
    return run_cells(cells, out_dir, spec_source=str(path), layout=spec.layout, jobs=args.jobs or 1,
                     retry_failed=not args.skip_failed, tables=not args.no_table)


def run_cells(cells, out_dir: Path, *, spec_source: str, layout: str | None, jobs: int = 1,
              retry_failed: bool = True, tables: bool = True, executor=None, threads: int | None = None) -> int:
    from rlkd.bench.cell import LocalExecutor
    from rlkd.bench.runner import run_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "spec.json", {"source": spec_source, "layout": layout,
                                              "cells": [c["id"] for c in cells]})
    executor = executor or LocalExecutor(out_dir, threads=threads if threads else (None if jobs <= 1 else 1))
    summary = run_grid(cells, out_dir, executor, jobs=jobs, retry_failed=retry_failed)
    print(f"rlkd bench: {len(summary.done)} run, {len(summary.skipped)} already done, "
          f"{len(summary.failed)} failed, {len(summary.busy)} busy (another runner) of {summary.total} cells")
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
    return 0 if summary.ok and not summary.busy else 1
