"""Entry point of a cell's child process: ``python -m rlkd.bench.cell WORKDIR CACHE_DIR SHARED_DIR``.

Reads ``WORKDIR/config.json`` (the cell), runs it with :func:`rlkd.bench.executor.run_cell_inprocess`
and writes its metrics and per-example scores to ``WORKDIR/cell_result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlkd.bench.executor import run_cell_inprocess


def main(argv: list[str]) -> int:
    workdir, cache_dir, shared_dir = (Path(a) for a in argv[:3])
    cell = json.loads((workdir / "config.json").read_text())
    run_cell_inprocess(cell, workdir, cache_dir=cache_dir, shared_dir=shared_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
