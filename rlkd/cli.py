"""`rlkd` command line: one sub-command per stage of the pipeline.

Each sub-command lives in its own module exposing ``main(argv: list[str]) -> int``; the modules are
imported only when their command runs, so `rlkd objectives` does not pay for DeepSpeed's import.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "objectives": ("rlkd.objectives.cli", "list the registered KD objectives and their parameters"),
    "train": ("rlkd.engine.cli", "distil a student from a teacher with DeepSpeed ZeRO-3"),
    "launch": ("rlkd.launch.cli", "render and submit multi-node launches (Slurm)"),
    "eval": ("rlkd.eval.cli", "score a checkpoint on a task, alignment metrics or lm-eval tasks"),
    "bench": ("rlkd.bench.cli", "run a benchmark grid (default: the embedded offline benchmark)"),
    "table": ("rlkd.bench.table_cli", "turn a results directory into Markdown/CSV/LaTeX tables and plots"),
    "plan": ("rlkd.plan.cli", "per-GPU memory of a run or spec from model configs alone: does it fit?"),
    "config": ("rlkd.config_reference", "print the configuration reference: every field, default, bounds (--reference [--spec])"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlkd <command> [options]   (rlkd <command> --help for its options; rlkd --version)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def version() -> str:
    """The version of the rlkd package that is running (pyproject's `version`)."""
    import rlkd

    return rlkd.__version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a command is required: help on stderr, a usage error's exit code
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(f"rlkd {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlkd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
