"""The embedded benchmark behind a bare `rlkd bench`: offline, CPU, under 15 minutes on 2 cores.

The grid itself is the spec ``rlkd/bench/default.yaml``; this module prepares what it needs:
1. A synthetic corpus from :class:`rlkd.data.synthetic.MarkovSource`, whose true next-token
   distributions are multi-modal and known exactly, written as pre-tokenized JSONL.
2. A small Llama teacher trained on it with cross-entropy (through the engine, cached).
3. The student's initial weights (a smaller random Llama).
Each is built once under a lock, so a second runner on the same folder waits and reuses it. The
cells (every objective with and without the ranking loss, Rank-only, 5 seeds) are scored by
:mod:`rlkd.eval.synthetic`. Results go to results/default/ (tables, CSV, LaTeX, plots).
Nothing here is tuned to favour +R: the settings were fixed before looking at any ±R comparison.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rlkd.bench.spec import config_hash, expand, filter_cells, parse_seeds, parse_spec
from rlkd.provenance import file_lock
from rlkd.bench.store import is_done, write_json_atomic
from rlkd.data.synthetic import MarkovSource, SourceConfig, read_corpus, write_corpus

SPEC_FILE = Path(__file__).with_name("default.yaml")
SOURCE = SourceConfig(**yaml.safe_load(SPEC_FILE.read_text())["eval"]["synthetic_source"])
SEQ_TOKENS = 64  # content tokens per sequence (plus BOS)
PROMPT_TOKENS, ANSWER_TOKENS = 16, 8


def data_plan(quick: bool) -> dict[str, int]:
    return {"train": 1000 if quick else 3000, "heldout": 100 if quick else 200,
            "downstream": 100 if quick else 200}


def teacher_plan(quick: bool) -> dict[str, Any]:
    return {"hidden": 96, "layers": 3, "heads": 4, "max_steps": 120 if quick else 500, "lr": 2e-3,
            "global_batch": 32, "seed": 1}


def student_plan() -> dict[str, Any]:
    return {"hidden": 48, "layers": 2, "heads": 4, "seed": 2}


def plugin_objectives() -> list[str]:
    """Objectives registered by plug-ins (not rlkd's built-ins): benchmarked by default, like the paper's five."""
    from rlkd.objectives import get_objective, list_objectives

    return [name for name in list_objectives()
            if not get_objective(name).fn.__module__.startswith("rlkd.objectives.")
            and get_objective(name).needs_teacher]


def default_spec(quick: bool, plugins: list[str] | tuple[str, ...] = ()):
    raw = yaml.safe_load(SPEC_FILE.read_text())
    spec = parse_spec(raw, source=str(SPEC_FILE), tiny=quick, plugins=plugins)
    extra = [name for name in plugin_objectives() if name not in {ref.name for ref in spec.objectives}]
    if extra:
        raw["objectives"] = list(raw["objectives"]) + extra
        raw["plugins"] = spec.plugins
        spec = parse_spec(raw, source=str(SPEC_FILE), tiny=quick)
    return spec


# ---------------------------------------------------------------------------------------------
# Preparation: data, the initial student, the trained teacher


def prepare_data(root: Path, quick: bool) -> dict[str, Path]:
    data = root / ".data"
    plan = data_plan(quick)
    marker = data / "plan.json"
    wanted = {"source": SOURCE.__dict__, "plan": plan, "seq_tokens": SEQ_TOKENS,
              "prompt": PROMPT_TOKENS, "answer": ANSWER_TOKENS}
    paths = {name: data / f"{name}.jsonl" for name in ("train", "heldout", "downstream")}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and all(p.is_file() for p in paths.values()):
        return paths
    source = MarkovSource(SOURCE)
    write_corpus(source, paths["train"], plan["train"], SEQ_TOKENS, seed=100)
    write_corpus(source, paths["heldout"], plan["heldout"], SEQ_TOKENS, seed=200)
    rng = np.random.default_rng(300)
    lines = []
    for _ in range(plan["downstream"]):
        prompt = source.sample(rng, PROMPT_TOKENS)
        lines.append(json.dumps({"prompt": prompt, "answer": source.greedy_continuation(prompt, ANSWER_TOKENS)}))
    tmp = paths["downstream"].with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(paths["downstream"])
    write_json_atomic(marker, wanted)
    return paths


def prepare_models(root: Path, quick: bool, train_path: Path) -> None:
    from rlkd.factory import save_tiny_llama

    shared = root / ".shared"
    student, teacher = student_plan(), teacher_plan(quick)
    save_tiny_llama(shared / "student_init", hidden=student["hidden"], layers=student["layers"], heads=student["heads"],
                    vocab_size=SOURCE.vocab_size, seed=student["seed"], max_positions=128, pad_token_id=0)
    key = config_hash({"teacher": teacher, "source": SOURCE.__dict__, "data": data_plan(quick)})[:12]
    teacher_dir = shared / "teacher"
    done = teacher_dir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return
    if done.is_file():  # a teacher for other settings: keep it aside rather than resume it
        os.replace(teacher_dir, teacher_dir.with_name(f"teacher.replaced-{json.loads(done.read_text()).get('key')}"))
    init = save_tiny_llama(shared / f"teacher_init-{key}", hidden=teacher["hidden"], layers=teacher["layers"],
                           heads=teacher["heads"], vocab_size=SOURCE.vocab_size, seed=teacher["seed"],
                           max_positions=128, pad_token_id=0)
    from rlkd.engine.train import run_training

    print(f"[rlkd bench] training the teacher ({teacher['max_steps']} steps, cross-entropy on the synthetic corpus)")
    tree = {
        "output_dir": str(teacher_dir), "seed": teacher["seed"],
        "models": {"teacher": str(init), "student": str(init), "dtype": "float32"},
        "data": {"task": "tokenized", "path": str(train_path), "max_length": SEQ_TOKENS + 1},
        "loss": {"objective": "ce", "ranking": {"enabled": False}},
        "train": {"micro_batch_size": teacher["global_batch"], "grad_accum": 1, "max_steps": teacher["max_steps"],
                  "lr": teacher["lr"], "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 20, "grad_clip": 1.0},
        "checkpoint": {"every_steps": 100},
        "progress_bar": True,
    }
    run_training(tree, resume=True)
    write_json_atomic(done, {"key": key, "config": tree})


def source_reference(root: Path) -> dict[str, float]:
    """What the true source itself scores: the floor for PPL and the ceiling for the task."""
    source = MarkovSource(SOURCE)
    heldout = read_corpus(root / ".data" / "heldout.jsonl")
    nll = float(np.mean([source.entropy_rate_nats(s) for s in heldout]))
    per_slice_ppl = float(np.mean([math.exp(source.entropy_rate_nats(s)) for s in heldout]))
    return {"source_ppl_per_slice_mean": per_slice_ppl, "source_ppl_corpus": math.exp(nll)}


# ---------------------------------------------------------------------------------------------


def run_default(args) -> int:
    import time

    from rlkd.bench.orchestrate import dry_run, run_cells

    quick = bool(getattr(args, "quick", False))
    root = getattr(args, "results_dir", None) or Path("results") / ("default-quick" if quick else "default")
    spec = default_spec(quick, getattr(args, "plugin", ()) or ())
    if getattr(args, "seeds", None):
        spec = spec.with_seeds(parse_seeds(args.seeds))
    cells = filter_cells(expand(spec, source=str(SPEC_FILE)), getattr(args, "only", None))
    if getattr(args, "dry_run", False):
        return dry_run(cells, root, show_config=getattr(args, "show_config", False))
    if getattr(args, "from_scratch", False):
        _retire_all(root, cells)
    elif cells and all(is_done(root / c.id, c.config_hash) for c in cells):
        print(f"rlkd bench: all {len(cells)} cells in {root}/ are already done (e.g. the committed results); "
              f"reusing them. Tables: {root}/table.md. To run from scratch: rlkd bench --from-scratch "
              "(or --results-dir NEW_DIR); more seeds: --seeds 1,2,3,4,5,6,7")
        return 0
    started = time.time()
    # One thread per cell process: with several cells at once (and other work) on few cores, more
    # OpenMP threads than cores makes small models many times slower, not faster.
    jobs = getattr(args, "jobs", None) or min(2, os.cpu_count() or 1)
    import torch

    torch.set_num_threads(1)
    from rlkd.device import device_type

    os.environ["DS_ACCELERATOR"] = device_type()  # the cells' processes inherit rlkd's one decision
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".prepare.lock"):  # a second runner waits, then reuses what the first built
        paths = prepare_data(root, quick)
        prepare_models(root, quick, paths["train"])
        write_json_atomic(root / "source.json", {"source": SOURCE.__dict__, "data": data_plan(quick),
                                                 "teacher": teacher_plan(quick), "student": student_plan(),
                                                 **source_reference(root)})
    code = run_cells(cells, root, spec_source="embedded default (rlkd/bench/default.yaml)", layout="default",
                     jobs=jobs, retry_failed=not getattr(args, "skip_failed", False),
                     tables=not getattr(args, "no_table", False), threads=1,
                     rerun_stale=getattr(args, "rerun_stale", False),
                     # Dozens of small cells: long-lived workers pay the imports once (see worker.py).
                     reuse_processes=True)
    minutes = (time.time() - started) / 60
    print(f"[rlkd bench] embedded benchmark finished in {minutes:.1f} min; "
          f"tables and plots in {root}/ (table.md, table.csv, table.tex, *.png)")
    write_json_atomic(root / "timing.json", {"wall_minutes": round(minutes, 2), "cells": len(cells),
                                             "jobs": jobs})
    return code


def _retire_all(root: Path, cells) -> None:
    from rlkd.bench.orchestrate import _retire

    for cell in cells:
        if (root / cell.id).exists():
            _retire(root, cell.id)
