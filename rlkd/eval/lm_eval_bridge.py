"""Run lm-evaluation-harness tasks on a checkpoint through its ``HFLM`` wrapper.

Results go to ``<out_dir>/lm_eval/results.json`` (lm-eval's own result dict, made JSON-safe) with
the same provenance block as rlkd's tasks. ``include_path`` points lm-eval at extra task YAMLs,
which is how a task with local data runs offline (``dataset_path: json`` +
``dataset_kwargs.data_files``). Datasets of lm-eval's built-in tasks come from the Hub unless
they are already in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .generate import resolve_checkpoint
from .provenance import atomic_write_json, checkpoint_fingerprint, package_versions, utc_now


def run_lm_eval(checkpoint: str | os.PathLike, tasks: Sequence[str], *, out_dir: str | os.PathLike,
                include_path: str | os.PathLike | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu",
                dtype: str = "float32", apply_chat_template: bool = False,
                full_checkpoint_hash: bool = True, seed: int = 1234,
                include_defaults: bool = True) -> dict:
    """Evaluate ``checkpoint`` on lm-eval ``tasks``; returns and writes the result dict.

    ``include_defaults=False`` restricts task lookup to ``include_path``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("give at least one lm-eval task name")
    resolved = resolve_checkpoint(checkpoint)
    manager = None
    if include_path:
        # Indexing lm-eval's ~15k built-in task files takes tens of seconds; skip it when the
        # extra directory already defines every requested task.
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None,
                              include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = f" (looked in lm-eval's tasks and {include_path})" if include_path else ""
        raise KeyError(f"unknown lm-eval task(s) {unknown}{hint}")
    model = HFLM(pretrained=resolved, device=device, dtype=dtype, batch_size=batch_size)
    raw = simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                          apply_chat_template=apply_chat_template, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if raw is None:  # lm-eval returns None on non-zero ranks
        return {}
    safe = json.loads(json.dumps(dict(raw), default=str))
    result = {
        "tasks": list(tasks), "results": safe.get("results", {}), "n_samples": safe.get("n-samples"),
        "configs": safe.get("configs"), "lm_eval_versions": safe.get("versions"),
        "provenance": {"checkpoint": checkpoint_fingerprint(resolved, full=full_checkpoint_hash),
                       "include_path": str(include_path) if include_path else None,
                       "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                       "apply_chat_template": apply_chat_template, "seed": seed,
                       "device": device, "dtype": dtype, "versions": package_versions(),
                       "created_at": utc_now()},
    }
    atomic_write_json(Path(out_dir) / "lm_eval" / "results.json", result)
    return result
