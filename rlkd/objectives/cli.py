"""`rlkd objectives`: the registered objectives, their hyperparameters and the ranking options."""

from __future__ import annotations

import argparse
import json
import sys

from rlkd.objectives.config import RankingConfig
from rlkd.objectives.registry import get_objective, list_objectives


def describe() -> list[dict]:
    rows = []
    for name in list_objectives():
        spec = get_objective(name)
        params = {
            key: {"default": default, **({"range": list(spec.bounds[key])} if key in spec.bounds else {})}
            for key, default in spec.defaults.items()
        }
        rows.append({"name": name, "summary": spec.summary, "params": params, "module": spec.fn.__module__,
                     "needs_teacher": spec.needs_teacher, "needs_labels": spec.needs_labels, "counts": spec.counts,
                     "sparse_teacher": spec.supports_sparse_teacher})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlkd objectives", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file that registers objectives first (repeatable)")
    args = parser.parse_args(argv)
    from rlkd.plugins import PluginError, load_plugins, resolve_plugin_names

    try:
        load_plugins(resolve_plugin_names(args.plugin, None))
    except PluginError as exc:
        print(f"rlkd objectives: {exc}", file=sys.stderr)
        return 2
    rows = describe()
    if args.json:
        print(json.dumps({"objectives": rows, "ranking": RankingConfig.model_json_schema()["properties"]}, indent=2))
        return 0
    for row in rows:
        params = ", ".join(
            f"{k}={v['default']:g}" + (f" in [{v['range'][0]:g}, {v['range'][1]:g}]" if "range" in v else "")
            for k, v in row["params"].items()
        )
        print(f"{row['name']:<10} {row['summary']}" + (f"\n{'':<10} params: {params}" if params else ""))
    print("\nranking (any objective, or alone with mode=rank_only):")
    for key, prop in RankingConfig.model_json_schema()["properties"].items():
        choices = prop.get("enum") or [a.get("const") for a in prop.get("anyOf", []) if "const" in a]
        extra = f" one of {choices}" if choices else ""
        print(f"  {key:<24} default {prop.get('default')!r}{extra}")
    return 0
