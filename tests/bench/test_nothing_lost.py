"""Issue 27, the benchmark side: a killed bench never wedges a cell, a torn record is run again and
never crashes the tables, bad command-line values are refused (tiny CPU runs, fake executors)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlkd.bench.orchestrate import run_cells
from rlkd.bench.runner import run_grid
from rlkd.bench.spec import expand, parse_spec
from rlkd.bench.store import KILL_ENV, KILL_POINTS, STAGING, is_done, load_results

REPO = Path(__file__).resolve().parents[2]
TIMINGS = {"train_seconds", "train_step_seconds"}  # wall times: the only metrics a rerun may change


def _fake_cells(seeds=(1, 2)):
    raw = {"name": "t", "tasks": [{"name": "toy"}], "objectives": ["kl"], "variants": ["none", "R"],
           "seeds": list(seeds), "defaults": {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"}}}
    return expand(parse_spec(raw))


class Executor:
    def __init__(self):
        self.calls: list[str] = []

    def run(self, cell, workdir):
        self.calls.append(cell.id)
        return {"score": float(cell.arm.seed)}


# ---------------------------------------------------------------------------------------------
# F2, F3: a record is done only when it validates; the table names what it cannot read


def test_a_truncated_metrics_file_is_run_again_with_a_line_naming_it(tmp_path, capsys):
    cells = _fake_cells()
    assert run_cells(cells, tmp_path, spec_source="t.yaml", layout="generic", executor=Executor(), tables=False) == 0
    torn = tmp_path / cells[1].id / "metrics.json"
    torn.write_text(torn.read_text()[:5])
    assert not is_done(torn.parent, cells[1].config_hash)
    capsys.readouterr()

    again = Executor()
    assert run_cells(cells, tmp_path, spec_source="t.yaml", layout="generic", executor=again) == 0
    out = capsys.readouterr()
    assert again.calls == [cells[1].id]  # only the torn cell ran, once
    assert f"cell {cells[1].id}: invalid record, running the cell again: {torn}: not valid JSON" in out.out
    assert "1 run, 3 already done" in out.out and "Traceback" not in out.out + out.err
    assert json.loads(torn.read_text()) == {"score": 2.0}
    assert (tmp_path / "table.md").is_file()


def test_a_record_whose_config_disagrees_with_its_status_is_not_done(tmp_path):
    cells = _fake_cells(seeds=(1,))
    run_grid(cells, tmp_path, Executor(), progress=False)
    config = tmp_path / cells[0].id / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "config_hash": "0" * 64}))
    assert not is_done(config.parent, cells[0].config_hash)
    again = Executor()
    run_grid(cells, tmp_path, again, progress=False)
    assert again.calls == [cells[0].id]


def test_rlkd_table_names_the_cell_and_file_it_cannot_read_and_renders_the_rest(tmp_path, capsys):
    from rlkd.bench.table_cli import main as table_main

    cells = _fake_cells()
    run_cells(cells, tmp_path, spec_source="t.yaml", layout="generic", executor=Executor(), tables=False)
    torn = tmp_path / cells[0].id / "metrics.json"
    torn.write_text('{"score": 1.')
    capsys.readouterr()
    assert table_main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"rlkd table: cell {cells[0].id}: cannot read its record" in err and str(torn) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    table = (tmp_path / "table.md").read_text()
    assert cells[0].id in table and "record unreadable" in table  # listed, not in the rows
    assert "| KL |" in table and "| KL+R |" in table  # the other cells are rendered


# ---------------------------------------------------------------------------------------------
# requirement 5: no lock files or empty folders left behind


def test_a_finished_or_failed_grid_leaves_no_lock_files_or_empty_staging(tmp_path):
    class Failing(Executor):
        def run(self, cell, workdir):
            if cell.arm.seed == 2:
                raise RuntimeError("boom")
            return super().run(cell, workdir)

    summary = run_grid(_fake_cells(), tmp_path, Failing(), progress=False)
    assert len(summary.failed) == 2
    assert not list(tmp_path.rglob("*.lock"))
    assert sorted(p.name for p in (tmp_path / STAGING).iterdir()) == sorted(
        c.id for c in _fake_cells() if c.arm.seed == 2)  # only the failed cells' resumable folders


def test_shared_preparation_locks_are_exclusive_and_leave_no_file(tmp_path):
    """Stages, teacher generations, the teacher cache and the embedded benchmark's preparation lock
    with file_lock: its file goes on release, and it stays exclusive while files come and go."""
    import threading

    from rlkd.provenance import file_lock

    lock = tmp_path / "shared" / "stage.lock"
    inside, most = [0], [0]
    guard = threading.Lock()

    def work():
        for _ in range(20):
            with file_lock(lock):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert most[0] == 1
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# W10, W11, W9: command-line values and an unwritable results folder


def test_jobs_below_one_is_refused(tmp_path, capsys):
    from rlkd.bench.cli import main as bench_main

    with pytest.raises(SystemExit) as exit_info:
        bench_main([str(REPO / "benchmarks" / "example.yaml"), "--tiny", "--dry-run", "--jobs", "0",
                    "--results-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--jobs: 0: must be at least 1" in capsys.readouterr().err


def test_an_unwritable_results_folder_stops_with_one_line(tmp_path, monkeypatch, capsys):
    from rlkd.bench import store

    real = store.write_json_atomic
    published = []

    def write(path, payload):
        if published:  # the folder became unwritable after the first cell
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, payload)
        if Path(path).name == "status.json":
            published.append(path)

    monkeypatch.setattr(store, "write_json_atomic", write)  # the store writes every record file
    cells = _fake_cells()
    code = run_cells(cells, tmp_path, spec_source="t.yaml", layout="generic", executor=Executor(), tables=False)
    err = capsys.readouterr().err
    assert code == 1
    assert f"rlkd bench: results folder {tmp_path} is not writable: Permission denied" in err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "cell/s" not in line]  # not tqdm's
    assert "Traceback" not in err and len(lines) == 1, lines
    assert is_done(tmp_path / cells[0].id, cells[0].config_hash)  # nothing done is lost
    assert not list((tmp_path / STAGING).glob("*.failed.*"))


def test_plan_takes_the_preset_names_bench_takes(capsys):
    from rlkd.plan.cli import main as plan_main

    assert plan_main(["paper/table2", "--gpus", "8", "--gpu-mem", "80",
                      "--config-dir", str(REPO / "tests" / "data" / "model_configs")]) == 0
    assert "TinyLlama" in capsys.readouterr().out
    assert plan_main(["paper/no_such_table", "--gpus", "8", "--gpu-mem", "80"]) == 2
    assert "paper/no_such_table: no such spec file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# F1: a cell killed between its evaluation and its publication is not wedged


def _tiny_spec(**extra) -> dict:
    return {"name": "killgrid",
            "defaults": {"models": {"teacher": "@tiny/teacher", "student": "@tiny/student", "dtype": "float32"},
                         "data": {"task": "gsm8k", "limit": 4, "max_length": 96},
                         "train": {"micro_batch_size": 2, "max_steps": 2, "lr": 1.0e-3}},
            "eval": {"kind": "task", "protocol": "greedy", "limit": 2, "max_new_tokens": 4, "batch_size": 2},
            "tasks": [{"name": "gsm8k"}], "objectives": ["kl"], "variants": ["none", "R"], "seeds": [1], **extra}


@pytest.mark.data
@pytest.mark.slow
def test_a_cell_rerun_after_its_export_was_deleted_is_not_refused(tmp_path, capsys):
    """The executor used to delete the export before the runner published the cell: a rerun retrained,
    and the first evaluation folder refused the new export on every later run."""
    from rlkd.bench.executor import run_cell_inprocess
    from rlkd.bench.store import remove_cell_result
    from rlkd.paths import default_data_dir

    if default_data_dir() is None:
        pytest.skip("needs ../shared/data (GSM8K rows)")
    cell = expand(parse_spec(_tiny_spec(variants=["none"])))[0]
    staging = tmp_path / "res" / STAGING / cell.id
    dirs = {"cache_dir": tmp_path / "res" / ".cache", "shared_dir": tmp_path / "res" / ".shared"}
    first, _ = run_cell_inprocess(cell, staging, **dirs)
    assert not (staging / "train" / "export").exists()  # the export is gone, as before a kill
    # killed here, before publishing: the rerun reuses the cell's result
    again, _ = run_cell_inprocess(cell, staging, **dirs)
    assert again == first
    # a staging folder without that result (left by an older rlkd): the old evaluation is set aside
    remove_cell_result(staging)
    third, _ = run_cell_inprocess(cell, staging, **dirs)
    assert {k: v for k, v in third.items() if k not in TIMINGS} == {k: v for k, v in first.items() if k not in TIMINGS}
    assert "held an evaluation of another export; moved it to eval.replaced-" in capsys.readouterr().out
    assert len(list(staging.glob("eval.replaced-*"))) == 1


# ---------------------------------------------------------------------------------------------
# requirement 3: kill anywhere, rerun, same results


def _bench(spec: Path, results: Path, env: dict[str, str], kill_at: str | None = None,
           kill_after_s: float | None = None):
    env = {k: v for k, v in env.items() if k != KILL_ENV}
    if kill_at:
        env[KILL_ENV] = kill_at
    proc = subprocess.Popen([sys.executable, "-m", "rlkd.cli", "bench", str(spec), "--results-dir", str(results),
                             "--no-table"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a kill takes runner and cells
    if kill_after_s is not None:
        try:
            proc.wait(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _metrics(results: Path) -> dict[str, dict[str, float]]:
    return {entry.cell.id: {k: v for k, v in entry.metrics.items() if k not in TIMINGS}
            for entry in load_results(results)}


@pytest.mark.slow
@pytest.mark.data
def test_kill_anywhere_rerun_same_results(tmp_path, cli_env):
    """Kills `rlkd bench` (runner and cell processes) at points drawn by a seeded schedule, reruns
    after each with no cleanup, and ends with the metrics of an uninterrupted run."""
    from rlkd.paths import default_data_dir

    if default_data_dir() is None:
        pytest.skip("needs ../shared/data (GSM8K rows)")
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(_tiny_spec(stages={"student_sft": {"train": {"max_steps": 2}}})))
    rng = random.Random(27)
    # During the stage and between evaluation and publishing always; the other points in a drawn
    # order; then one kill at a drawn instant.
    others = [p for p in KILL_POINTS if p not in ("stage-trained", "before-publish")]
    schedule = ["stage-trained"] + rng.sample(["before-publish"] + others, k=len(others) + 1)
    results = tmp_path / "killed"
    killed = []
    for point in schedule:
        code, out = _bench(spec, results, cli_env(), kill_at=point)
        assert code in (0, -signal.SIGKILL), out
        if code == -signal.SIGKILL:
            killed.append(point)
    code, out = _bench(spec, results, cli_env(), kill_after_s=rng.uniform(3.0, 12.0))
    assert code in (0, -signal.SIGKILL), out
    code, out = _bench(spec, results, cli_env())
    assert code == 0, out
    # A point no cell reaches any more lets that run finish the grid: the kills are a prefix of the schedule.
    assert killed == schedule[:len(killed)] and len(killed) >= 4 and "before-publish" in killed, (schedule, killed)

    assert _bench(spec, tmp_path / "straight", cli_env())[0] == 0
    straight = _metrics(tmp_path / "straight")
    assert len(straight) == 2 and all("final_train_loss" in m for m in straight.values())
    assert _metrics(results) == straight
    assert not (results / STAGING).exists()  # nothing left to clean up by hand
    assert not list(results.rglob("*.lock"))
