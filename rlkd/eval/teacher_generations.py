"""Training rows whose responses are the teacher's own greedy generations (SeqKD, FD).

The rows a run config's ``data`` block selects are read, each response is replaced by the
teacher's greedy continuation of the row's prompt, and the rows are written back in the task's own
schema (the field :func:`rlkd.data.tasks.response_field` names), so the result is an ordinary data
file for the same task. Generated once per (teacher, rows, decoding) under a lock, with provenance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlkd.data.jsonl import DataError
from rlkd.data.tasks import PromptResponse, load_rows, response_field
from rlkd.provenance import atomic_write_json, atomic_write_jsonl, checkpoint_fingerprint, file_lock, file_sha256


def _key(payload: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_teacher_generations(data, teacher_path: str, out_dir: Path, *, max_new_tokens: int = 256,
                               batch_size: int = 8, device: str = "cpu") -> Path:
    """The JSONL file of ``data``'s rows (a ``rlkd.config.DataConfig``) with the teacher's responses."""
    from rlkd.eval.generate import generate_texts, greedy, load_checkpoint  # same layer: generation

    decoding = greedy(max_new_tokens=max_new_tokens, batch_size=batch_size)
    items = load_rows(data.task, data.split, path=data.path, data_dir=data.data_dir, source=data.source,
                      exclude_eval_overlap=data.exclude_eval_overlap, limit=data.limit, skip=data.skip)
    if not items or not isinstance(items[0], PromptResponse):
        raise DataError(f"teacher generations need a prompt/response task, not {data.task!r}")
    if any(item.where.startswith("hub:") for item in items):
        raise DataError("teacher generations need the training data as a local file (data.path or data.data_dir)")
    key = _key({"teacher": teacher_path, "task": data.task, "rows": [i.where for i in items],
                "decoding": decoding.as_dict()})
    out = Path(out_dir) / f"teacher_generations-{data.task}-{key}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):  # parallel cells wait for one generation pass
        if out.is_file():
            return out
        model, tokenizer = load_checkpoint(teacher_path, dtype="float32", device=device)
        generations = generate_texts(model, tokenizer, [item.prompt for item in items], decoding)
        lines_by_file: dict[str, list[str]] = {}
        rows = []
        for item, generation in zip(items, generations):
            file, _, line = item.where.rpartition(":")
            if file not in lines_by_file:
                lines_by_file[file] = Path(file).read_text(encoding="utf-8").splitlines()
            row = json.loads(lines_by_file[file][int(line) - 1])
            row[response_field(data.task, row, item.where)] = generation.text.strip()
            rows.append(row)
        fingerprint = checkpoint_fingerprint(teacher_path, full=False) if Path(teacher_path).is_dir() else teacher_path
        atomic_write_json(out.with_suffix(".provenance.json"), {
            "teacher_fingerprint": fingerprint, "decoding": decoding.as_dict(), "rows": len(rows),
            "sources_sha256": {Path(f).name: file_sha256(f) for f in lines_by_file},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hit_eos": sum(g.hit_eos for g in generations)})
        atomic_write_jsonl(out, rows)
        return out
