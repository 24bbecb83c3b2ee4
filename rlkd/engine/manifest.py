"""Run manifest: what produced a checkpoint (config, code version, libraries, data files)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rlkd.plugins import loaded_plugins
from rlkd.provenance import file_sha256, git_state, package_versions


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


def build_manifest(cfg, ds_configs: dict, world_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {str(p): file_sha256(p) for p in data_files(cfg.data) if p.is_file()}
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "git_sha": (code := git_state())["sha"],
        "git_dirty": code["dirty"],
        "plugins": {name: record["sha256"] for name, record in loaded_plugins().items()},
        "packages": package_versions(),
        "data_files_sha256": files,
        "data_source": "hub" if not files else "local",
        "deepspeed_configs": ds_configs,
        "world_size": world_size,
        "argv": sys.argv,
    }
    manifest.update(extra or {})
    return manifest
