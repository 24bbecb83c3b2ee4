"""What a result was made from (checkpoint, data, code versions) and atomic result writing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rlkd.provenance import (  # noqa: F401  (re-exported: the evaluation's public helpers)
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    file_sha256,
    package_versions,
    utc_now,
)

_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py")

def checkpoint_fingerprint(checkpoint: str | Path, full: bool = True) -> dict[str, Any]:
    """Identity of a checkpoint directory.

    ``full``: sha256 over (relative name, sha256) of every config, weight and tokenizer file.
    Otherwise a cheaper fingerprint over names, sizes and modification times (labelled so).
    A Hub id that is not a local directory is recorded by name only.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return {"checkpoint": str(checkpoint), "hash_mode": "hub-id", "sha256": None}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    digest = hashlib.sha256()
    for f in files:
        rel = f.relative_to(path).as_posix()
        stat = f.stat()
        token = file_sha256(f) if full else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{rel}\0{token}\n".encode())
    return {"checkpoint": str(path.resolve()), "hash_mode": "content" if full else "size-mtime",
            "sha256": digest.hexdigest(), "n_files": len(files)}


def model_fingerprint(model) -> dict[str, Any]:
    """Content hash of an in-memory model's parameters and buffers (for models without a path)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"checkpoint": f"<in-memory {type(model).__name__}>", "hash_mode": "state-dict",
            "sha256": digest.hexdigest()}


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
