"""Training for the benchmark: a cell's engine config, and the cached stages cells share.

A cell's ``run`` is a partial run config (see :mod:`rlkd.bench.spec`); :func:`engine_tree` turns it
into the complete tree ``rlkd.engine.train.run_training`` takes: output folder, model references
resolved to local paths (``@tiny/...``, ``@smollm2/...``), the teacher cache folder.

Stages (``teacher_sft`` / ``student_sft``) fine-tune a model with cross-entropy once per task;
every cell, and every runner, reuses the result. ``student_heal`` distils the student from a teacher
of its own before that (e.g. healing a layer-pruned copy) and is shared across specs. Each is built under a file lock, so a second
runner waits for the first instead of training the same model into the same folder.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from rlkd.bench.records import Cell
from rlkd.bench.spec import HEAL, canonical_run, config_hash, stage_key
from rlkd.bench.store import kill_point, load_results
from rlkd.factory import resolve_model
from rlkd.provenance import (atomic_write_json, atomic_write_jsonl, checkpoint_fingerprint, cpu_identity,
                             removable_lock)


def teacher_cache_dir(cache_dir: Path) -> Path:
    return cache_dir / "teacher_logits"


def engine_tree(run: dict[str, Any], workdir: Path, *, cache_dir: Path, teacher: str | None = None,
                student: str | None = None, teacher_cache: bool = False, create_models: bool = True) -> dict[str, Any]:
    """The complete run-config tree of ``run`` trained in ``workdir`` (``create_models=False``: name
    tiny models without building them, for dry runs)."""
    tree = copy.deepcopy(run)
    models = tree.setdefault("models", {})
    for role, given in (("teacher", teacher), ("student", student)):
        if given is not None:
            models[role] = given
        elif role in models:
            models[role] = resolve_model(models[role], cache_dir, create=create_models)
    tree["output_dir"] = str(workdir)
    tree.setdefault("progress_bar", False)
    if teacher_cache:
        tree["teacher_cache"] = str(teacher_cache_dir(cache_dir))
    return tree


def train(tree: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """Train (resuming whatever a killed run left) unless exactly this training already finished."""
    from rlkd.engine.train import run_training

    finished = finished_training(tree)
    if finished is not None:
        return finished
    set_aside_other_run(Path(tree["output_dir"]), tree)
    result = run_training(tree, resume=True)
    if result.export_dir is None:
        raise RuntimeError("training finished without an exported checkpoint")
    return Path(result.export_dir), _read_log(Path(result.metrics_path))


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_training(tree: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]] | None:
    """A training that already finished in the tree's folder with exactly this config (e.g. a Slurm
    job from ``rlkd bench --dry-run --slurm``): its export and log are used as they are."""
    out = Path(tree["output_dir"])
    manifest_path, export, metrics = out / "manifest.json", out / "export", out / "metrics.jsonl"
    if not (manifest_path.is_file() and (export / "config.json").is_file() and metrics.is_file()):
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("status") != "finished":
        return None
    if canonical_run(manifest.get("config") or {}) != canonical_run(tree):
        return None
    return export, _read_log(metrics)


def set_aside_other_run(out: Path, tree: dict[str, Any]) -> None:
    """A folder holding a run with another config (finished or not) is moved aside, saying so: the
    engine would refuse to resume it, and it must not be mixed with this one."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return
    try:
        recorded = json.loads(manifest_path.read_text()).get("config") or {}
        same = canonical_run(recorded) == canonical_run(tree)
    except Exception:  # noqa: BLE001 - an unreadable manifest is not this run's
        same = False
    if not same:
        import os
        import time

        target = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.replace(out, target)
        print(f"{out}: held a run with another config; moved it to {target.name} and training afresh", flush=True)


def heal_dir(cell: Cell, shared_dir: Path) -> Path:
    """Where the cell's healing stage lives: keyed by its config alone and kept beside the results
    folder (``<results>/../.stages``), so every spec that names the same healing shares one run."""
    key = config_hash(canonical_run(cell.stages[HEAL]))[:12]
    return shared_dir.parent.parent / ".stages" / f"{HEAL}-{key}"


def stage_dir(cell: Cell, role: str, shared_dir: Path) -> Path:
    if role == HEAL:
        return heal_dir(cell, shared_dir)
    stage = canonical_run(cell.stages[role])
    if role == "student" and HEAL in cell.stages:  # it fine-tunes the healed student
        stage = {"stage": stage, "after": canonical_run(cell.stages[HEAL])}
    return shared_dir / f"{role}_sft-{cell.task}-{config_hash(stage)[:12]}"


def finished_stage(cell: Cell, role: str, shared_dir: Path) -> str | None:
    """The export of the cell's ``role`` stage (``teacher``/``student`` SFT or ``student_heal``) if it
    has run, else None."""
    out = stage_dir(cell, role, shared_dir)
    return str(out / "export") if (out / "done.json").is_file() and (out / "export").is_dir() else None


def ensure_stage(cell: Cell, role: str, shared_dir: Path, cache_dir: Path, *,
                 student: str | None = None) -> str:
    """Run the cell's ``role`` stage once (``student``: the model it starts from instead of the
    configured one); return its export."""
    out = stage_dir(cell, role, shared_dir)
    with removable_lock(out.with_name(out.name + ".lock"), wait=True):  # parallel cells and runners wait for one run
        done = finished_stage(cell, role, shared_dir)
        if done is not None:
            return done
        tree = engine_tree(cell.stages[role], out, cache_dir=cache_dir, student=student)
        started = time.perf_counter()
        export_dir, log = train(tree)
        kill_point("stage-trained")
        atomic_write_jsonl(out / "train_log.jsonl", log)
        atomic_write_json(out / "done.json", {"config": canonical_run(tree), "seconds": time.perf_counter() - started,
                                              "export_sha256": checkpoint_fingerprint(export_dir)["sha256"],
                                              "machine": cpu_identity()},
                          sort_keys=True)
        return str(export_dir)


def stage_fingerprints(cell: Cell, shared_dir: Path) -> dict[str, str]:
    """Content hash (sha256 of the export's files) of each of the cell's finished stages.

    A stage is keyed by its config alone, and training on CPU is not bit-reproducible across runs
    (a re-run on a fresh machine gives a slightly different export), so the hash, recorded in each
    cell's provenance, is what tells whether two cells started from the same stage. Computed once
    and kept in the stage's ``done.json`` (stages finished before it was recorded get it here)."""
    found = {}
    for role in cell.stages:
        out = stage_dir(cell, role, shared_dir)
        if finished_stage(cell, role, shared_dir) is None:
            continue
        with removable_lock(out.with_name(out.name + ".lock"), wait=True):
            done = json.loads((out / "done.json").read_text())
            if not done.get("export_sha256"):
                done["export_sha256"] = checkpoint_fingerprint(out / "export")["sha256"]
                atomic_write_json(out / "done.json", done, sort_keys=True)
        found[stage_key(role)] = done["export_sha256"]
    return found


class StageExportMismatch(RuntimeError):
    """A cell's stage export differs from the one the results folder's finished cells started from."""


def check_stage_exports(cell: Cell, shared_dir: Path, results_dir: Path) -> None:
    """Refuse to run a cell from a stage export (e.g. the healed student) other than the one the
    finished cells of its results folder recorded in their provenance: a stage is keyed by its
    config, but a re-run on another kind of CPU gives other bits, and a table mixing the two would
    compare cells that did not start from the same model."""
    mine = stage_fingerprints(cell, shared_dir)
    if not mine:
        return
    for result in load_results(results_dir):  # an unreadable record is the store's to report and re-run
        recorded = result.provenance.stages or {}
        for key, sha in sorted(mine.items()):
            if recorded.get(key) not in (None, sha):
                raise StageExportMismatch(
                    f"stage {key}: this machine's export is {sha[:12]}..., but the finished cell "
                    f"{result.folder.name} started from {recorded[key][:12]}...; a cell from this export "
                    f"would be a different experiment. Run on a machine whose {key} reproduces "
                    f"{recorded[key][:12]}... (an AVX-512 machine reproduced an AVX2 machine's healed student "
                    f"with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 set: "
                    f"results/healed_student/README.md), or run the whole table from this export into another "
                    f"folder (--results-dir)")


def stage_seconds(cell: Cell, shared_dir: Path) -> dict[str, float]:
    """Measured wall time of each of the cell's finished stages (``{"student_heal": 1234.5, ...}``)."""
    seconds = {}
    for role in cell.stages:
        done = stage_dir(cell, role, shared_dir) / "done.json"
        if done.is_file():
            recorded = json.loads(done.read_text()).get("seconds")
            if recorded is not None:
                seconds[stage_key(role)] = float(recorded)
    return seconds


def stage_models(cell: Cell, shared_dir: Path, cache_dir: Path) -> tuple[str | None, str | None]:
    """(teacher, student) paths, after their stages when the cell has them: the student is healed
    first (``student_heal``), then fine-tuned (``student_sft``)."""
    models = cell.run.get("models") or {}
    stages = cell.stages
    healed = ensure_stage(cell, HEAL, shared_dir, cache_dir) if HEAL in stages else None
    found = []
    for role in ("teacher", "student"):
        if role in stages:
            found.append(ensure_stage(cell, role, shared_dir, cache_dir, student=healed if role == "student" else None))
        elif role == "student" and healed is not None:
            found.append(healed)
        elif role in models:
            found.append(resolve_model(models[role], cache_dir))
        else:
            found.append(None)
    return found[0], found[1]


def finished_stage_models(cell: Cell, shared_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Without running anything: ``({role: export}, [stages not run yet])`` for the models the cell's
    finished stages make (a Slurm job is written only once they exist)."""
    stages = cell.stages
    exports, missing = {}, []
    for role in ("teacher", HEAL, "student"):
        if role not in stages:
            continue
        export = finished_stage(cell, role, shared_dir)
        if export is None:
            missing.append(stage_key(role))
        else:
            exports["student" if role == HEAL else role] = export
    return exports, missing


def generation_data(cell: Cell, teacher: str, shared_dir: Path) -> dict[str, Any]:
    """The cell's ``run`` with its data replaced by the teacher's generations for the same rows."""
    from rlkd.config import DataConfig
    from rlkd.eval.teacher_generations import ensure_teacher_generations
    from rlkd.device import device_type

    run = copy.deepcopy(cell.run)
    data = DataConfig.model_validate(run["data"])
    decoding = cell.teacher_generations
    path = ensure_teacher_generations(data, teacher, shared_dir, max_new_tokens=decoding["max_new_tokens"],
                                      batch_size=decoding["batch_size"], device=device_type())
    # The generated file holds exactly the selected rows, already without evaluation overlap.
    run["data"] = {**{k: v for k, v in run["data"].items() if k not in ("limit", "skip", "data_dir", "source")},
                   "path": str(path), "exclude_eval_overlap": False}
    return run
