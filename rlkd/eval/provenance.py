"""What a result was made from (checkpoint, data, code versions) and atomic result writing."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py")
_PACKAGES = ("rlkd", "torch", "transformers", "tokenizers", "rouge-score", "rouge", "lm-eval",
             "datasets", "deepspeed", "numpy")


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


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


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
