"""`rlkd table RESULTS_DIR`: Markdown, CSV and LaTeX tables beside the paper (the verdict on the
ranking loss first), plus plots: the verdict's forest plot (effect.png) and CR@k/MOR@k curves."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlkd.bench.layout_schema import LayoutDeclaration, layout_file, shipped_layout_names
from rlkd.bench.report.effects import verdict
from rlkd.bench.report.grid import collect
from rlkd.bench.report.layouts import at_k, get_layout
from rlkd.bench.report.plots import alignment_curves, forest_plot, k_sweep
from rlkd.bench.report.tables import row_order, write_tables
from rlkd.bench.store import load_results, read_spec_record


def make_tables(results_dir: Path, layout_name: str | LayoutDeclaration | None = None,
                out_dir: Path | None = None) -> dict[str, Path]:
    """Tables and plots of a results folder, laid out by ``layout_name`` (a shipped layout's name or a
    declaration), else by the layout its spec record names or declares."""
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such results directory")
    try:
        spec = read_spec_record(results_dir)
    except ValueError as exc:  # torn: the cells carry their own records, render them all
        print(f"rlkd table: {exc}; rendering every cell folder", file=sys.stderr)
        spec = {}
    if layout_name is None:
        layout_name = spec.get("layout")
    layout = get_layout(layout_name)
    unreadable: list[tuple[str, str]] = []
    results = load_results(results_dir, unreadable)
    if spec.get("cells"):
        # A revised spec writing into the same folder leaves the superseded spec's cells there (their
        # config hashes differ): the tables show the cells of the spec that ran last, and say so.
        keep = set(spec["cells"])
        other = [r for r in results if r.folder.name not in keep]
        if other:
            print(f"rlkd table: {len(other)} cell folder(s) in {results_dir} belong to no cell of its latest "
                  f"spec ({spec.get('source')}); left out of the tables", file=sys.stderr)
            results = [r for r in results if r.folder.name in keep]
        unreadable = [(cell_id, problem) for cell_id, problem in unreadable if cell_id in keep]
    for cell_id, problem in unreadable:
        # One bad record must not cost the whole table: name it, render the rest.
        print(f"rlkd table: cell {cell_id}: cannot read its record, left out of the tables: {problem}",
              file=sys.stderr)
    if not results:
        raise FileNotFoundError(f"{results_dir}: no finished or failed cells (nothing has run yet?)")
    out_dir = out_dir or results_dir
    paths = write_tables(results_dir, layout, results, out_dir, unreadable)
    grid = collect(results, layout)
    effect = forest_plot(verdict(layout, grid, row_order(layout, grid)), out_dir / "effect.png",
                         title=f"{layout.title}: effect of the ranking loss, Δ(+R) = with R − without R")
    if effect:
        paths["effect.png"] = effect
    # one plot per alignment set: the set prefixes of the CR@k columns (not a sweep's)
    prefixes = sorted({found.prefix for key in grid.keys.values() if key.sweep is None
                       for found in [at_k(key.metric)] if found is not None and found.family == "cr"})
    for prefix in prefixes:
        name = f"alignment_{prefix.rstrip('_')}.png" if prefix else "alignment.png"
        label = ("against the true distribution" if prefix == "true_" else "against the teacher"
                 + (f", {prefix.rstrip('_')} set" if prefix else ""))
        plot = alignment_curves(grid, out_dir / name, prefix=prefix,
                                title=f"{layout.title}: top-k agreement {label} (solid: +R, dashed: without R, "
                                      "dash-dot: ranking loss only, dotted: reference models)")
        if plot:
            paths[name] = plot
    sweep = k_sweep(grid, out_dir / "k_sweep.png", title=layout.title)
    if sweep:
        paths["k_sweep"] = sweep
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkd table", description=__doc__)
    parser.add_argument("results", type=Path, help="a results directory written by `rlkd bench`, e.g. results/default")
    parser.add_argument("--layout", help="a table layout instead of the one the spec named or declared: a YAML file "
                        "declaring one (rlkd/bench/layout_schema.py) or a shipped layout's name: "
                        + ", ".join(shipped_layout_names()) + " (rlkd/bench/table_layouts/)")
    parser.add_argument("--out", type=Path, help="where to write the tables (default: the results directory)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file that registers objectives (repeatable)")
    args = parser.parse_args(argv)
    try:
        from rlkd.plugins import load_plugins, resolve_plugin_names

        load_plugins(resolve_plugin_names(args.plugin, Path.cwd()))
        layout = args.layout
        if layout is not None and layout.endswith((".yaml", ".yml")):
            layout = layout_file(Path(layout))
        paths = make_tables(args.results, layout, args.out)
    except (FileNotFoundError, KeyError, ImportError, ValueError) as exc:
        print(f"rlkd table: {exc}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0
