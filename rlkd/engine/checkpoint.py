"""Student checkpoints (DeepSpeed's own format) plus what resuming needs beyond it: the data-loader
position and every rank's RNG state. The teacher is frozen and never written."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG_PREFIX = "step"


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


def save(engine, checkpoint_dir: Path, step: int, loader_state: dict[str, int], rank: int, keep_last: int) -> Path:
    """Collective: every rank must call it."""
    tag = tag_for(step)
    # RNG first: DeepSpeed writes `latest` last, so a tag named there always has its RNG files.
    (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), checkpoint_dir / tag / f"rng_rank{rank:05d}.pt")
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "loader": loader_state})
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tags = sorted(p for p in checkpoint_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return checkpoint_dir / tag


def latest_tag(checkpoint_dir: Path) -> str | None:
    """DeepSpeed writes `latest` only after a tag's files are complete."""
    marker = checkpoint_dir / "latest"
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (checkpoint_dir / tag).is_dir() else None


def load(engine, checkpoint_dir: Path, rank: int) -> dict[str, Any] | None:
    """Restore student, optimizer, scheduler and RNG from the latest checkpoint; returns client state."""
    tag = latest_tag(checkpoint_dir)
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
