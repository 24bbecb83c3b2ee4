"""Metrics sinks for `rlkd train` beyond metrics.jsonl: `report_to: [tensorboard, wandb, csv]`.

Each sink receives exactly the rows written to metrics.jsonl (every loss term separately,
rank-degenerate rows, top-k overlap, tokens/s, lr, grad norm, and CR@k where measured), keyed by
optimizer step, on rank 0 only. Each uses its library's standard writer:

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` under ``<output_dir>/tensorboard``,
  scalars tagged ``train/<metric>``. It is opened with ``purge_step`` (the first step this process
  logs), so TensorBoard readers drop what earlier files hold from that step on: the steps a killed
  run logged past its checkpoint, or an earlier run's curve when a run starts afresh.
* ``csv``: ``<output_dir>/metrics.csv`` through the csv module, one column per metric. A metric
  first seen in a later row (CR@k only on measured steps) rewrites the file with the wider
  header; on resume, rows past the checkpoint are dropped, as in metrics.jsonl.
* ``wandb``: ``wandb.init`` in ``<output_dir>``; offline unless ``WANDB_MODE`` says otherwise,
  so nothing leaves the machine until the user runs ``wandb sync``. A resumed run continues the
  same W&B run (its id is kept in ``<output_dir>/wandb_run_id``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import uuid
from pathlib import Path
from typing import Any

from rlkd.provenance import atomic_write_text
from rlkd.report_sinks import SINK_PACKAGES

TAG_PREFIX = "train/"
WANDB_ID_FILE = "wandb_run_id"


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value))}


class TensorBoardSink:
    def __init__(self, output_dir: Path, resumed_from: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers discard earlier files' events from this step on -- the steps a killed
        # run logged past its checkpoint, or all of an earlier run's steps on a fresh start.
        purge = (resumed_from or 0) + 1
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(TAG_PREFIX + key, value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvSink:
    def __init__(self, output_dir: Path, resumed_from: int | None):
        self.path = output_dir / "metrics.csv"
        self.rows: list[dict[str, str]] = []
        self.columns: list[str] = ["step"]
        if resumed_from is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if int(r["step"]) <= resumed_from]
        self._rewrite()

    def _rewrite(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        values = {"step": str(int(row["step"]))} | {k: repr(v) for k, v in _scalars(row).items()}
        new = [key for key in values if key not in self.columns]
        self.rows.append(values)
        if new:
            self.columns += new
            self._rewrite()
            return
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, restval="").writerow(values)

    def close(self) -> None:
        pass


class WandbSink:
    def __init__(self, output_dir: Path, resumed_from: int | None, config: dict[str, Any]):
        import wandb

        # A resumed run continues the W&B run it started, whose id is kept in the run directory.
        id_file = output_dir / WANDB_ID_FILE
        if resumed_from is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlkd"), dir=str(output_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), id=run_id, resume="allow",
                              name=output_dir.name, config=config)

    def write(self, row: dict[str, Any]) -> None:
        self.run.log({TAG_PREFIX + k: v for k, v in _scalars(row).items()}, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class Reporter:
    """Fans each logged metrics row out to the configured sinks; a no-op off rank 0."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_reporter(report_to: list[str], output_dir: Path, rank: int, resumed_from: int | None,
                  config: dict[str, Any] | None = None) -> Reporter:
    if rank != 0:
        return Reporter([])
    output_dir.mkdir(parents=True, exist_ok=True)
    sinks = []
    for name in dict.fromkeys(report_to):
        if name == "tensorboard":
            sinks.append(TensorBoardSink(output_dir, resumed_from))
        elif name == "csv":
            sinks.append(CsvSink(output_dir, resumed_from))
        elif name == "wandb":
            sinks.append(WandbSink(output_dir, resumed_from, config or {}))
        else:
            raise ValueError(f"report_to: unknown sink {name!r}; choose from {sorted(SINK_PACKAGES)}")
    return Reporter(sinks)
