"""Metrics sinks (`report_to`) read back offline, and live CR@k on the training batch."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlkd.config import ConfigError, load_config
from rlkd.engine import reporting
from rlkd.engine.agreement import agreement_sums, due
from rlkd.engine.train import run_training


def _rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_cr_sums_match_a_position_by_position_count():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 6, 12, generator=generator)
    student = teacher + 0.3 * torch.randn(2, 6, 12, generator=generator)
    student[0, 0] = teacher[0, 0]  # one position agrees to every depth
    mask = torch.rand(2, 6, generator=generator) > 0.3
    mask[0, 0] = True
    sums = agreement_sums(student, teacher, mask)
    for k in range(1, 6):
        hits = sum(1 for b in range(2) for t in range(6) if mask[b, t] and
                   sorted(range(12), key=lambda i: -student[b, t, i])[:k] ==
                   sorted(range(12), key=lambda i: -teacher[b, t, i])[:k])
        assert sums[f"cr@{k}"] == pytest.approx(100.0 * hits)
    assert sums["cr@5"] >= 100.0  # the identical position
    assert agreement_sums(student, None, mask) == {}
    assert [due(3, s) for s in range(6)] == [False, False, True, False, False, True]
    assert not any(due(0, s) for s in range(6))


def test_unknown_sink_is_a_config_error_naming_the_key(run_config):
    with pytest.raises(ConfigError, match="report_to"):
        load_config(base=dict(run_config, report_to=["mlflow"]))


@pytest.mark.slow
def test_tensorboard_and_csv_carry_the_jsonl_rows_and_survive_a_resume(run_config, monkeypatch):
    pytest.importorskip("tensorboard")
    run_config.update(report_to=["tensorboard", "csv"], agreement_every=2,
                      loss={"objective": "kl", "ranking": {"enabled": True, "k": 5}},
                      checkpoint={"every_steps": 2}, export=False)
    run_config["train"]["max_steps"] = 4
    first = run_training(run_config)
    before = _rows(first.metrics_path)
    # Resuming from the step-2 checkpoint re-runs steps 3-4; each sink must hold each step once.
    again = run_training(run_config, resume=True)
    assert again.resumed_from == 2
    rows = _rows(again.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in before])

    for row in rows:
        for key in ("base", "rank", "rank_degenerate_rows", "topk_overlap", "tokens_per_s", "lr", "grad_norm"):
            assert key in row
        measured = [row.get(f"cr@{k}") for k in range(1, 6)]
        if row["step"] % 2:
            assert measured == [None] * 5
        else:
            assert all(0.0 <= v <= 100.0 for v in measured)
            assert measured == sorted(measured, reverse=True)  # equal top-k lists at depth k imply depth k-1

    scalars = _tensorboard_scalars(Path(run_config["output_dir"]) / "tensorboard")
    for key in ("loss", "base", "rank", "rank_degenerate_rows", "topk_overlap", "lr", "grad_norm", "tokens_per_s"):
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert scalars["train/cr@1"] == [(r["step"], pytest.approx(r["cr@1"], rel=1e-6)) for r in rows if "cr@1" in r]

    with (Path(run_config["output_dir"]) / "metrics.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4]
    for written, row in zip(table, rows):
        assert float(written["rank"]) == row["rank"] and float(written["lr"]) == row["lr"]
        assert written["cr@3"] == (repr(row["cr@3"]) if "cr@3" in row else "")

    # A fresh run in the same directory replaces the curves rather than adding to them (once the
    # old checkpoints are out of the way: a fresh run refuses a folder holding another run's).
    shutil.rmtree(Path(run_config["output_dir"]) / "checkpoints")
    run_training(dict(run_config, train=dict(run_config["train"], max_steps=2)))
    fresh = _tensorboard_scalars(Path(run_config["output_dir"]) / "tensorboard")
    assert [step for step, _ in fresh["train/loss"]] == [1, 2]
    assert fresh["train/loss"][0][1] == pytest.approx(rows[0]["loss"], rel=1e-6)
    with (Path(run_config["output_dir"]) / "metrics.csv").open(newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2]


def test_a_missing_sink_package_fails_before_any_model_loads(run_config, monkeypatch):
    from rlkd import report_sinks

    monkeypatch.setattr(report_sinks, "SINK_PACKAGES", {**report_sinks.SINK_PACKAGES, "wandb": "rlkd_no_such_package"})
    run_config["models"]["student"] = "/nonexistent/student"  # would fail to load, were it reached
    with pytest.raises(ConfigError, match="report_to: .*wandb not installed"):
        run_training(dict(run_config, report_to=["wandb"]))


def test_wandb_sink_logs_each_row_offline_by_default(tmp_path, monkeypatch):
    """wandb itself is optional and not installed for tests: a recording stand-in checks what the
    sink hands to wandb's API (init in the run directory, offline, one log call per row)."""
    import sys
    import types

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reporter = reporting.open_reporter(["wandb"], tmp_path / "run", 0, None, {"seed": 7})
    reporter.write({"step": 3, "loss": 1.5, "grad_norm": None, "cr@1": 25.0})
    reporter.close()
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline"
    assert calls[0][1]["dir"] == str(tmp_path / "run") and calls[0][1]["config"] == {"seed": 7}
    assert calls[1:] == [("log", {"train/loss": 1.5, "train/cr@1": 25.0}, 3), ("finish",)]
    # A resumed run continues the same W&B run; a fresh one starts another.
    first_id = calls[0][1]["id"]
    reporting.open_reporter(["wandb"], tmp_path / "run", 0, 3).close()
    reporting.open_reporter(["wandb"], tmp_path / "run", 0, None).close()
    assert calls[3][1]["id"] == first_id and calls[5][1]["id"] != first_id
    assert reporting.open_reporter(["wandb", "csv"], tmp_path / "other", 1, None).sinks == []
