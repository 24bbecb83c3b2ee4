"""The grid runner: atomic cells, skip by config hash, failures recorded, kill-and-restart safe.

A fake executor stands in for training, so these tests exercise only the bookkeeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlkd.bench.runner import run_grid
from rlkd.bench.spec import expand, parse_spec
from rlkd.bench.store import STAGING, load_results

BASE = {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"}}


def _cells(seeds=(1, 2), objectives=("kl", "rkl"), **extra):
    raw = {"name": "t", "tasks": [{"name": "toy"}], "objectives": list(objectives),
           "variants": ["none", "R"], "seeds": list(seeds), "defaults": BASE, **extra}
    return expand(parse_spec(raw))


class FakeExecutor:
    """Deterministic metrics from the cell config; counts calls; can fail chosen cells."""

    def __init__(self, fail=(), delay=0.0):
        self.delay = delay
        self.calls: list[str] = []
        self.fail = set(fail)
        self.lock = threading.Lock()

    def run(self, cell, workdir):
        with self.lock:
            self.calls.append(cell.id)
        (workdir / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
        if cell.arm.method in self.fail:
            raise RuntimeError(f"boom in {cell.arm.method}")
        if self.delay:
            time.sleep(self.delay)
        return {"score": float(cell.arm.seed) + (0.5 if cell.run["loss"]["ranking"]["enabled"] else 0.0)}


def test_every_cell_is_stored_with_config_metrics_log_provenance(tmp_path):
    cells = _cells()
    summary = run_grid(cells, tmp_path, FakeExecutor(), progress=False)
    assert summary.ok and len(summary.done) == len(cells) == 8
    for cell in cells:
        d = tmp_path / cell.id
        assert json.loads((d / "config.json").read_text())["config_hash"] == cell.config_hash
        assert json.loads((d / "status.json").read_text())["status"] == "done"
        expected = cell.arm.seed + (0.5 if "+R" in cell.arm.method else 0.0)
        assert json.loads((d / "metrics.json").read_text()) == {"score": expected}
        assert (d / "train_log.jsonl").is_file()
        provenance = json.loads((d / "provenance.json").read_text())
        assert provenance["versions"]["python"] and provenance["duration_s"] >= 0
        # exactly the fields set: no null "stages" for a cell without cached stages
        assert set(provenance) == {"git_sha", "git_dirty", "versions", "machine", "plugins", "started",
                                   "finished", "duration_s", "resumed"}
        assert provenance["machine"]["cpu_model"] and provenance["resumed"] is False
        assert provenance["started"] <= provenance["finished"]
    assert not (tmp_path / STAGING).exists()  # no staging folder, no lock files left by a finished run


def test_finished_cells_are_skipped_by_config_hash(tmp_path):
    cells = _cells()
    run_grid(cells, tmp_path, FakeExecutor(), progress=False)
    again = FakeExecutor()
    summary = run_grid(cells, tmp_path, again, progress=False)
    assert again.calls == [] and len(summary.skipped) == len(cells)
    # Changing a setting changes the hash, so only the changed cells run again.
    changed = _cells(defaults={**BASE, "train": {"lr": 1e-4}})
    assert {c.id for c in changed}.isdisjoint({c.id for c in cells})
    third = FakeExecutor()
    run_grid(changed, tmp_path, third, progress=False)
    assert sorted(third.calls) == sorted(c.id for c in changed)


def test_a_failed_cell_is_recorded_and_the_grid_continues(tmp_path):
    cells = _cells()
    summary = run_grid(cells, tmp_path, FakeExecutor(fail={"RKL+R"}), progress=False)
    failed = [c for c in cells if c.arm.method == "RKL+R"]
    assert set(summary.failed) == {c.id for c in failed}
    assert len(summary.done) == len(cells) - len(failed)
    for cell in failed:
        status = json.loads((tmp_path / cell.id / "status.json").read_text())
        assert status["status"] == "failed" and "boom in RKL+R" in status["error"]
        assert "RuntimeError" in status["traceback"]
        assert not (tmp_path / cell.id / "metrics.json").exists()
    # By default the next run retries only the failed cells, and a success replaces the record.
    retry = FakeExecutor()
    summary = run_grid(cells, tmp_path, retry, progress=False)
    assert sorted(retry.calls) == sorted(c.id for c in failed) and summary.ok
    loaded = load_results(tmp_path)
    assert len(loaded) == len(cells) and all(e.done for e in loaded)


def test_skip_failed_leaves_failed_cells_alone(tmp_path):
    cells = _cells()
    run_grid(cells, tmp_path, FakeExecutor(fail={"KL"}), progress=False)
    later = FakeExecutor()
    summary = run_grid(cells, tmp_path, later, retry_failed=False, progress=False)
    assert later.calls == [] and len(summary.failed) == 2


def test_parallel_jobs_run_every_cell_once(tmp_path):
    cells = _cells(seeds=(1, 2, 3))
    executor = FakeExecutor()
    summary = run_grid(cells, tmp_path, executor, jobs=3, progress=False)
    assert summary.ok and sorted(executor.calls) == sorted(c.id for c in cells)


def test_returning_no_metrics_is_a_failure(tmp_path):
    class Empty:
        def run(self, cell, workdir):
            return {}

    cells = _cells(seeds=(1,), objectives=("kl",))
    summary = run_grid(cells, tmp_path, Empty(), progress=False)
    assert len(summary.failed) == len(cells)
    assert all("expected non-empty metrics" in e for e in summary.failed.values())


_KILLABLE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from rlkd.bench.runner import run_grid
    from rlkd.bench.spec import expand, parse_spec

    out, hang_on = Path(sys.argv[1]), sys.argv[2]
    raw = {"name": "t", "tasks": [{"name": "toy"}], "objectives": ["kl", "rkl"],
           "variants": ["none", "R"], "seeds": [1],
           "defaults": {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"}}}
    cells = expand(parse_spec(raw))

    class Executor:
        def run(self, cell, workdir):
            with open(out.parent / "calls.txt", "a") as f:
                f.write(cell.id + "\\n")
            checkpoint = workdir / "checkpoint.json"
            resumed_from = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
            checkpoint.write_text(json.dumps({"step": 5}))
            (workdir / "metrics_partial.json").write_text("{")  # a torn file the kill leaves behind
            if cell.arm.method == hang_on and resumed_from == 0:
                print("HANGING", flush=True)
                time.sleep(600)
            return {"resumed_from": resumed_from}

    run_grid(cells, out, Executor(), progress=False)
""")


@pytest.mark.slow
def test_kill_and_restart_loses_nothing_and_repeats_no_finished_cell(tmp_path, cli_env):
    script = tmp_path / "runner.py"
    script.write_text(_KILLABLE)
    out = tmp_path / "results"
    # cli_env: this checkout's rlkd first on the path, not whichever one is installed
    proc = subprocess.Popen([sys.executable, str(script), str(out), "RKL"], stdout=subprocess.PIPE, text=True,
                            env=cli_env())
    assert proc.stdout.readline().strip() == "HANGING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    calls_before = (tmp_path / "calls.txt").read_text().split()
    published = {e.cell.arm.method: e for e in load_results(out)}
    assert set(published) == {"KL"}  # the cell that was running is not visible, even partially
    assert published["KL"].metrics == {"resumed_from": 0.0}
    hung_id = calls_before[-1]
    assert (out / STAGING / hung_id / "checkpoint.json").is_file()

    subprocess.run([sys.executable, str(script), str(out), "RKL"], check=True, timeout=120, env=cli_env())
    calls_after = (tmp_path / "calls.txt").read_text().split()[len(calls_before):]
    assert published["KL"].cell.id not in calls_after  # finished cell not repeated
    final = {e.cell.arm.method: e.metrics for e in load_results(out)}
    assert set(final) == {"KL", "KL+R", "RKL", "RKL+R"}
    assert final["RKL"] == {"resumed_from": 5.0}  # picked up the killed cell's checkpoint


def test_two_runners_on_one_folder_do_every_cell_exactly_once_and_both_succeed(tmp_path):
    """A cell the other runner holds is waited for, not counted as a failure, and not run twice."""
    cells = _cells(seeds=(1, 2, 3))
    executor = FakeExecutor(delay=0.2)  # shared: counts the calls of both runners
    summaries = []
    threads = [threading.Thread(target=lambda: summaries.append(run_grid(cells, tmp_path, executor, progress=False)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(executor.calls) == sorted(c.id for c in cells)  # each cell ran once, in one runner
    assert len(summaries) == 2 and all(s.ok for s in summaries)
    assert sum(len(s.done) for s in summaries) == len(cells)
    assert sum(len(s.elsewhere) for s in summaries) >= 1  # the second runner waited for the first's cell


@pytest.mark.slow
def test_a_failed_cell_process_reports_its_last_error_line(tmp_path):
    from rlkd.bench.executor import LocalExecutor, last_error_line

    log = ("Traceback (most recent call last):\n  File x\n[rank0]: ValueError: teacher path /nope not found\n"
           "[rank0]: see the docs for more\n")
    assert last_error_line(log) == "ValueError: teacher path /nope not found"
    assert last_error_line("just one line\n") == "just one line"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [1, 5, 6, 2], "loss_mask": [0, 1, 1, 1]}\n')
    missing = {"models": {"teacher": str(tmp_path / "no-such-teacher"), "student": str(tmp_path / "no-such-student")},
               "data": {"task": "tokenized", "path": str(rows)}}
    cells = _cells(seeds=(1,), objectives=("kl",), defaults=missing)[:1]
    summary = run_grid(cells, tmp_path / "out", LocalExecutor(tmp_path / "out"), progress=False)
    (error,) = summary.failed.values()
    reason, _, rest = error.partition(" (cell process exited with 1")
    assert rest and "no-such-" in reason and ":" in reason  # the exception line itself, not a log pointer
    status = json.loads((tmp_path / "out" / cells[0].id / "status.json").read_text())
    assert status["error"] == error
