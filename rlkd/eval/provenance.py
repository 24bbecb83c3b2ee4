"""What a result was made from (checkpoint, data, code versions) and atomic result writing."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rlkd.provenance import (  # noqa: F401  (re-exported: the evaluation's public helpers)
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    checkpoint_fingerprint,
    file_sha256,
    package_versions,
    utc_now,
)


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
