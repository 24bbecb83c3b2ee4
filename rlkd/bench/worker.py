"""A long-lived cell process: ``python -m rlkd.bench.worker CACHE_DIR SHARED_DIR`` runs one cell per
request, so that many small cells pay for Python, torch, transformers and DeepSpeed imports once.

Protocol (one JSON line each way): the runner writes ``{"workdir": DIR}`` to the worker's stdin; the
worker runs the cell of ``DIR/config.json`` exactly as ``python -m rlkd.bench.cell`` would (its
output goes to ``DIR/cell.log``, its result to ``DIR/cell_result.json``) and answers on its
original stdout ``{"ok": true}`` or ``{"ok": false, "error": "<the exception line>"}``. End of
input ends the worker. A worker that dies mid-cell leaves the cell's staging folder as a killed
cell process would, so the cell resumes cleanly the next time it runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path

from rlkd.bench.executor import last_error_line, run_cell_inprocess
from rlkd.bench.store import read_cell_config


def _serve(cache_dir: Path, shared_dir: Path) -> int:
    reply = os.fdopen(os.dup(1), "w", buffering=1)  # the channel back to the runner
    saved_err = os.dup(2)
    for line in sys.stdin:
        if not line.strip():
            continue
        workdir = Path(json.loads(line)["workdir"])
        with open(workdir / "cell.log", "a") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                cell = read_cell_config(workdir)
                run_cell_inprocess(cell, workdir, cache_dir=cache_dir, shared_dir=shared_dir)
                answer = {"ok": True}
            except Exception:  # noqa: BLE001 - reported to the runner, the worker serves the next cell
                text = traceback.format_exc()
                print(text, file=sys.stderr, flush=True)
                answer = {"ok": False, "error": last_error_line(text)}
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved_err, 1)
                os.dup2(saved_err, 2)
        gc.collect()
        reply.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_serve(Path(sys.argv[1]), Path(sys.argv[2])))
