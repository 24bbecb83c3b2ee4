"""Run one cell: its stages, training, export and evaluation, in a fresh process or in this one.

``run_cell_inprocess`` does the work. ``LocalExecutor`` runs it in a child process
(``python -m rlkd.bench.cell``): memory, threads and crashes stay isolated, and a killed runner takes
its children with it (they resume from the cell's staging folder next time).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rlkd.bench.records import Cell
from rlkd.bench.store import kill_point, read_cell_result, write_cell_result, write_train_log
from rlkd.bench.stages import (check_stage_exports, engine_tree, generation_data, stage_models, teacher_cache_dir,
                               train)
from rlkd.device import device_type
from rlkd.engine.distributed import child_env
from rlkd.factory import resolve_model

RESULTS_REF = "@results/"


def resolve_results_refs(value: Any, results_dir: Path) -> Any:
    """``@results/x`` -> ``<results_dir>/x`` anywhere in a cell: configs name files inside the results
    directory without the directory's absolute path entering the config hash."""
    if isinstance(value, str) and value.startswith(RESULTS_REF):
        return str(results_dir / value.removeprefix(RESULTS_REF))
    if isinstance(value, dict):
        return {k: resolve_results_refs(v, results_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_results_refs(v, results_dir) for v in value]
    return value


def with_results_refs_resolved(cell: Cell, results_dir: Path) -> Cell:
    """The cell with ``@results/`` references in its run, stages, evaluation and candidate made paths."""
    return cell.model_copy(update={name: resolve_results_refs(getattr(cell, name), results_dir)
                                   for name in ("run", "stages", "eval", "candidate")})


def cell_engine_tree(cell: Cell, workdir: Path, *, cache_dir: Path, shared_dir: Path,
                     create_models: bool = True) -> dict[str, Any]:
    """The engine config a distill cell trains with (stages and teacher generations prepared first
    when ``create_models``)."""
    if not create_models:
        return engine_tree(cell.run, workdir, cache_dir=cache_dir, teacher_cache=cell.teacher_cache,
                           create_models=False)
    teacher, student = stage_models(cell, shared_dir, cache_dir)
    run = generation_data(cell, teacher, shared_dir) if cell.teacher_generations else cell.run
    return engine_tree(run, workdir, cache_dir=cache_dir, teacher=teacher, student=student,
                       teacher_cache=cell.teacher_cache)


def train_sequences(cell: Cell, cache_dir: Path):
    """The cell's training sequences, tokenised as the engine does (alignment on trained-on data)."""
    def sequences(tokenizer):
        from rlkd.config import load_config
        from rlkd.data import build_samples

        # Only the data section matters here: the loss becomes plain CE, and a top-K teacher cache
        # setting goes with the cache it needs (the evaluation reads the exact teacher).
        run = {key: value for key, value in cell.run.items() if not key.startswith("teacher_cache")}
        tree = engine_tree({**run, "loss": {"objective": "ce"}}, Path("unused"), cache_dir=cache_dir,
                           create_models=False)
        return [s.input_ids for s in build_samples(load_config(base=tree).data, tokenizer)]
    return sequences


def _evaluate(cell, model_path: str, workdir: Path, teacher: str | None, cache_dir: Path):
    from rlkd.eval.dispatch import evaluate_model
    from rlkd.eval.runner import RunMismatchError

    cached = teacher_cache_dir(cache_dir) if cell.teacher_cache else None

    def run():
        return evaluate_model(cell.eval, model_path, workdir, teacher_path=teacher, task=cell.task,
                              train_sequences=train_sequences(cell, cache_dir), teacher_cache_dir=cached)
    try:
        return run()
    except RunMismatchError:
        # The evaluation folder holds a (partial) evaluation of another export of this cell, e.g. one
        # trained before a kill: the staging folder is the cell's own, so set it aside and evaluate
        # the export at hand instead of refusing on every later run.
        evaluation = workdir / "eval"
        target = workdir / f"eval.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.replace(evaluation, target)
        print(f"{evaluation}: held an evaluation of another export; moved it to {target.name} and evaluating "
              "afresh", flush=True)
        return run()


def run_cell_inprocess(cell: Cell, workdir: Path, *, cache_dir: Path,
                       shared_dir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics and per-example scores of one cell (training it first unless it is a reference row),
    also written to the staging folder (:func:`rlkd.bench.store.write_cell_result`) before the
    training's export is deleted: a run killed after that point reuses the result instead of
    training and evaluating again."""
    cell = with_results_refs_resolved(cell, cache_dir.parent)
    from rlkd.plugins import load_plugins

    load_plugins(cell.run.get("plugins") or [])
    earlier = read_cell_result(workdir)
    if earlier is not None:
        return earlier
    if cell.kind == "reference":
        teacher, student = stage_models(cell, shared_dir, cache_dir)
        check_stage_exports(cell, shared_dir, cache_dir.parent)
        model = {"teacher": teacher, "student": student}.get(cell.reference) \
            or resolve_model(cell.candidate, cache_dir)
        metrics, per_example = _evaluate(cell, model, workdir, teacher, cache_dir)
        kill_point("cell-evaluated")
        write_cell_result(workdir, metrics, per_example)
        return metrics, per_example
    tree = cell_engine_tree(cell, workdir / "train", cache_dir=cache_dir, shared_dir=shared_dir)
    check_stage_exports(cell, shared_dir, cache_dir.parent)
    started = time.perf_counter()
    export_dir, log = train(tree)
    train_seconds = time.perf_counter() - started
    kill_point("cell-trained")
    write_train_log(workdir, log)
    metrics, per_example = _evaluate(cell, str(export_dir), workdir, tree["models"]["teacher"], cache_dir)
    kill_point("cell-evaluated")
    metrics["train_seconds"] = train_seconds
    metrics["train_step_seconds"] = sum(float(row.get("step_time_s", 0.0)) for row in log)
    if log:
        metrics["final_train_loss"] = float(log[-1]["loss"])
    # The result first, then the export goes: a kill between the two must not leave a cell whose
    # evaluation is done but whose export, which a rerun would evaluate again, is gone.
    write_cell_result(workdir, metrics, per_example)
    kill_point("cell-result-written")
    if not cell.keep_checkpoints:
        shutil.rmtree(export_dir, ignore_errors=True)
        shutil.rmtree(workdir / "train" / "checkpoints", ignore_errors=True)
    return metrics, per_example


_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b(:|$)")


def last_error_line(log_text: str) -> str:
    """The last line of a log that says what went wrong (a Python exception line, without the
    ``[rankN]:`` prefix distributed runs add), else its last line."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in log_text.strip().splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line) and not line.endswith("Warning"):
            return line
    return lines[-1] if lines else "(no output)"


class CellProcessError(RuntimeError):
    pass


class LocalExecutor:
    """Runs each cell in a child process: a fresh one per cell (isolates memory, threads and
    crashes; the default), or with ``reuse_processes`` long-lived workers (:mod:`rlkd.bench.worker`)
    that run many cells each, for grids of many small cells whose cost is mostly start-up."""

    def __init__(self, results_dir: Path, *, subprocess_per_cell: bool = True, threads: int | None = None,
                 reuse_processes: bool = False):
        self.results_dir = results_dir
        self.cache_dir = results_dir / ".cache"
        self.shared_dir = results_dir / ".shared"
        self.subprocess_per_cell = subprocess_per_cell
        self.threads = threads
        self.reuse_processes = reuse_processes
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[subprocess.Popen] = []
        # Cells running at once (rlkd bench --jobs N) go to the GPUs round-robin, not all to cuda:0.
        self._gpus = visible_gpus() if device_type() == "cuda" else []
        self._slot_lock = threading.Lock()
        self._busy_slots: set[int] = set()

    def _env(self, slot: int | None = None) -> dict[str, str]:
        # A process group set up in the runner (e.g. by training the embedded benchmark's teacher
        # in-process) must not leak into the cell processes, which each start their own.
        env = child_env()
        env["DS_ACCELERATOR"] = device_type()  # rlkd's one decision, inherited by every cell
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        gpu = gpu_for_slot(slot, self._gpus) if slot is not None else None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu  # the cell sees one GPU, as its cuda:0
        return env

    def _take_slot(self) -> int:
        with self._slot_lock:
            slot = next(i for i in range(len(self._busy_slots) + 1) if i not in self._busy_slots)
            self._busy_slots.add(slot)
            return slot

    def _free_slot(self, slot: int) -> None:
        with self._slot_lock:
            self._busy_slots.discard(slot)

    def run(self, cell: Cell, workdir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
        if not self.subprocess_per_cell:
            return run_cell_inprocess(cell, workdir, cache_dir=self.cache_dir, shared_dir=self.shared_dir)
        if self.reuse_processes:
            return self._run_in_worker(workdir)
        slot = self._take_slot()
        env = self._env(slot)
        log_path = workdir / "cell.log"
        try:
            with open(log_path, "a") as log:
                code = subprocess.call([sys.executable, "-m", "rlkd.bench.cell", str(workdir), str(self.cache_dir),
                                        str(self.shared_dir)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=_die_with_parent)
        finally:
            self._free_slot(slot)
        result = read_cell_result(workdir)
        if code != 0 or result is None:
            reason = last_error_line(log_path.read_text(errors="replace"))
            raise CellProcessError(f"{reason} (cell process exited with {code}; full log: {log_path.name} "
                                   "in the cell's staging folder)")
        return result

    def _run_in_worker(self, workdir: Path):
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            worker = subprocess.Popen([sys.executable, "-m", "rlkd.bench.worker", str(self.cache_dir),
                                       str(self.shared_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=self._env(len(self._workers)), preexec_fn=_die_with_parent)
            self._workers.append(worker)
        worker.stdin.write(json.dumps({"workdir": str(workdir)}) + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        if not line:  # the worker died mid-cell: discard it, the next cell gets a fresh one
            code = worker.wait()
            reason = last_error_line((workdir / "cell.log").read_text(errors="replace")) \
                if (workdir / "cell.log").is_file() else "(no output)"
            raise CellProcessError(f"{reason} (cell worker died with {code}; full log: cell.log in the cell's "
                                   "staging folder)")
        self._idle.put(worker)
        answer = json.loads(line)
        result = read_cell_result(workdir)
        if not answer["ok"] or result is None:
            raise CellProcessError(f"{answer.get('error', '(no result)')} (full log: cell.log in the cell's "
                                   "staging folder)")
        return result

    def close(self) -> None:
        """End the workers (they exit at the end of their input)."""
        for worker in self._workers:
            if worker.poll() is None:
                worker.stdin.close()
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        self._workers.clear()


def visible_gpus() -> list[str]:
    """The GPUs cells may use, as CUDA_VISIBLE_DEVICES names them: the runner's own list if set."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_for_slot(slot: int, gpus: list[str]) -> str | None:
    """Round-robin: the cell in slot i (of the cells running at once) gets GPU i mod their count."""
    return gpus[slot % len(gpus)] if gpus else None


def _die_with_parent() -> None:
    """Linux: the cell process gets SIGKILL when the runner dies, so a killed runner leaves no orphan
    training into a staging directory that the next runner will use."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
