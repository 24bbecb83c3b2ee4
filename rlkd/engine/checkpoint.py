"""Student checkpoints (DeepSpeed's own format) plus what resuming needs beyond it: the data-loader
position, every rank's RNG state, and a record of the run that wrote it (`rlkd_checkpoint.json`:
the run's lineage id, the step, the config, world size and dtype). The teacher is frozen and never
written.

Retention only ever deletes older checkpoints of the run lineage that is saving (the record's
`run_id`; a resumed run keeps its lineage's id), never the one just written, which `latest` names.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlkd.provenance import atomic_write_json

TAG_PREFIX = "step"
RECORD = "rlkd_checkpoint.json"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int | None:
    digits = tag[len(TAG_PREFIX):]
    return int(digits) if tag.startswith(TAG_PREFIX) and digits.isdigit() else None


def tags(checkpoint_dir: Path) -> list[str]:
    """Checkpoint folders present (complete or not), in step order."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(found, key=step_of)


def read_record(checkpoint_dir: Path, tag: str) -> dict[str, Any] | None:
    """The run record of a checkpoint, or None (written by an rlkd without records, or unreadable)."""
    path = checkpoint_dir / tag / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save(engine, checkpoint_dir: Path, step: int, loader_state: dict[str, int], rank: int, keep_last: int,
         record: dict[str, Any] | None = None) -> Path:
    """Collective: every rank must call it. `record` (rank 0's) must hold the lineage's `run_id`;
    retention then deletes only that lineage's checkpoints older than this one."""
    tag = tag_for(step)
    # RNG and record first: DeepSpeed writes `latest` last, so a tag named there always has them.
    (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), checkpoint_dir / tag / f"rng_rank{rank:05d}.pt")
    if rank == 0 and record is not None:
        atomic_write_json(checkpoint_dir / tag / RECORD, dict(record, step=step))
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "loader": loader_state})
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and record is not None:
        prune(checkpoint_dir, record["run_id"], keep_last, newest=tag)
    return checkpoint_dir / tag


def prune(checkpoint_dir: Path, run_id: str, keep_last: int, newest: str) -> list[str]:
    """Delete checkpoints of lineage `run_id` older than `newest` beyond the `keep_last` most recent
    (counting `newest`). Checkpoints of other runs, unrecorded ones and `newest` are never touched."""
    newest_step = step_of(newest)
    ours = [t for t in tags(checkpoint_dir) if t != newest and step_of(t) < newest_step
            and (read_record(checkpoint_dir, t) or {}).get("run_id") == run_id]
    doomed = ours[: max(0, len(ours) - (keep_last - 1))]
    for tag in doomed:
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    return doomed


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag `latest` names, when that checkpoint exists. DeepSpeed writes `latest` only after a
    tag's files are complete."""
    tag = latest_marker(checkpoint_dir)
    return tag if tag is not None and (checkpoint_dir / tag).is_dir() else None


def latest_marker(checkpoint_dir: Path) -> str | None:
    """What `latest` says, whether or not that checkpoint exists (None without a `latest` file)."""
    marker = checkpoint_dir / "latest"
    if not marker.is_file():
        return None
    return marker.read_text().strip() or None


def load(engine, checkpoint_dir: Path, rank: int, tag: str | None = None) -> dict[str, Any] | None:
    """Restore student, optimizer, scheduler and RNG from checkpoint `tag` (default: the latest);
    returns its client state (step, loader position), or None when there is no checkpoint."""
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}")
    rng_file = checkpoint_dir / tag / f"rng_rank{rank:05d}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file}: RNG state of rank {rank} missing (was the world size changed?)")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
