"""`rlkd bench [SPEC] [--only FILTER] [--dry-run] [--jobs N] [--tiny] [--slurm]`.

Without SPEC it runs the embedded offline benchmark (rlkd.bench.default) into results/default/.
SPEC is a YAML file, or a name under the repository's benchmarks/ folder (``paper/table2``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlkd.bench.spec import SpecError, expand, filter_cells, load_spec, parse_seeds


def resolve_spec_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    from rlkd.paths import REPO_ROOT

    for candidate in (REPO_ROOT / "benchmarks" / name, REPO_ROOT / "benchmarks" / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise SpecError(f"{name}: no such spec file (looked in . and {REPO_ROOT / 'benchmarks'})")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlkd bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", help="grid spec YAML or benchmarks/ name; omit for the embedded benchmark")
    parser.add_argument("--only", help="run a subset: method labels, task names, id globs/substrings, re:REGEX "
                                       "(comma-separated)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--jobs", type=_at_least_one, default=None, help="cells run at once, each in its own process "
                                                               "(default: 1; the embedded benchmark: 2)")
    parser.add_argument("--tiny", action="store_true", help="apply the spec's tiny: override (tiny local models, "
                                                            "a few examples)")
    parser.add_argument("--results-dir", type=Path, help="default: results/<spec name>[-tiny]")
    parser.add_argument("--skip-failed", action="store_true", help="do not retry cells that failed before")
    parser.add_argument("--show-config", action="store_true", help="with --dry-run: print each cell's config")
    parser.add_argument("--slurm", action="store_true", help="with --dry-run: print one `rlkd launch slurm` "
                                                             "command per pending cell")
    parser.add_argument("--nodes", type=_at_least_one, default=1, help="--slurm: nodes per cell job")
    parser.add_argument("--gpus-per-node", type=_at_least_one, default=8, help="--slurm: GPUs per node")
    parser.add_argument("--no-table", action="store_true", help="do not write tables after the run")
    parser.add_argument("--seeds", help="comma-separated seeds for every cell, replacing the spec's and each "
                                        "variant's own (finished seeds are reused), e.g. --seeds 1,2,3")
    parser.add_argument("--quick", action="store_true", help="embedded benchmark only: a smaller, faster version")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file that registers objectives (repeatable)")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="re-run finished cells that ran on other code (default: keep them, flagged in the table)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="embedded benchmark only: ignore committed results and run every cell again")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.spec is None:
            from rlkd.bench.default import run_default

            return run_default(args)
        path = resolve_spec_path(args.spec)
        spec = load_spec(path, tiny=args.tiny, plugins=args.plugin)
        if args.seeds:
            spec = spec.with_seeds(parse_seeds(args.seeds))
        spec_cells = expand(spec, source=str(path))
        cells = filter_cells(spec_cells, args.only)
    except SpecError as exc:
        print(f"rlkd bench: {exc}", file=sys.stderr)
        return 2
    if not cells:
        print(f"rlkd bench: --only {args.only!r} selects no cell of {path}", file=sys.stderr)
        return 2
    name = spec.name + ("-tiny" if args.tiny else "")
    out_dir = args.results_dir or Path("results") / name
    from rlkd.bench.orchestrate import dry_run, run_cells

    if args.dry_run:
        slurm = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node} if args.slurm else None
        return dry_run(cells, out_dir, show_config=args.show_config, slurm=slurm)
    return run_cells(cells, out_dir, spec_source=str(path), layout=spec.layout, jobs=args.jobs or 1,
                     retry_failed=not args.skip_failed, tables=not args.no_table, rerun_stale=args.rerun_stale,
                     spec_cells=spec_cells)
