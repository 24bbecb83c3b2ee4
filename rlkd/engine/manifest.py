"""Run manifest: what produced a checkpoint (config, code version, libraries, data files)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from rlkd.paths import REPO_ROOT

PACKAGES = ("rlkd", "torch", "deepspeed", "transformers", "datasets", "pydantic", "numpy")


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_files(data_cfg) -> list[Path]:
    from rlkd.data.tasks import LOCAL_FILES
    from rlkd.paths import default_data_dir

    if data_cfg.path:
        return [Path(data_cfg.path)]
    if data_cfg.source == "hub":
        return []
    data_dir = data_cfg.data_dir or default_data_dir()
    key = (data_cfg.task, data_cfg.split)
    if data_dir is None or key not in LOCAL_FILES:
        return []
    return [Path(data_dir) / LOCAL_FILES[key]]


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_manifest(cfg, ds_configs: dict, world_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {str(p): sha256_file(p) for p in data_files(cfg.data) if p.is_file()}
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "git_sha": git_sha(),
        "packages": package_versions(),
        "data_files_sha256": files,
        "data_source": "hub" if not files else "local",
        "deepspeed_configs": ds_configs,
        "world_size": world_size,
        "argv": sys.argv,
    }
    manifest.update(extra or {})
    return manifest
