"""Entry point of a cell's child process: ``python -m rlkd.bench.cell WORKDIR CACHE_DIR SHARED_DIR``.

Reads the cell the runner wrote into WORKDIR (:func:`rlkd.bench.store.read_cell_config`), runs it with
:func:`rlkd.bench.executor.run_cell_inprocess`, which leaves its metrics and per-example scores there
for the runner (:func:`rlkd.bench.store.write_cell_result`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlkd.bench.executor import run_cell_inprocess
from rlkd.bench.store import read_cell_config


def main(argv: list[str]) -> int:
    workdir, cache_dir, shared_dir = (Path(a) for a in argv[:3])
    cell = read_cell_config(workdir)
    run_cell_inprocess(cell, workdir, cache_dir=cache_dir, shared_dir=shared_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
