"""Where the project finds things on disk."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path | None:
    """`RLKD_DATA_DIR` if set, else `<repo>/../shared/data` when it exists, else None."""
    env = os.environ.get("RLKD_DATA_DIR")
    if env:
        return Path(env)
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else None
