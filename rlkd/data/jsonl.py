"""JSON Lines reading with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A data file is missing, malformed, or lacks a field; the message names file and line."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, row) for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    # Bytes, decoded line by line: a stray non-UTF-8 byte is reported with its line, not as an
    # offset into whatever block the text decoder happened to be reading.
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{len(raw[:exc.start].decode('utf-8', errors='replace')) + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def require(row: dict[str, Any], field: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """Return row[field], failing with `where` (file:line) if it is absent or of the wrong type."""
    if field not in row:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
    value = row[field]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {field!r} should be {names}, got {type(value).__name__}")
    return value
