"""Which Dolly training rows also appear in the RLKD paper's 800-row Dolly test split.

The rule is the one `../shared/data/README.md` used to set `in_rlkd_dolly_test`: same instruction,
and the same context or the same first 40 response characters, once Wikipedia citation marks such
as "[3]" and whitespace differences are ignored. It lets rows without that flag (the Hub copy of
databricks-dolly-15k) be filtered the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlkd.data.jsonl import iter_jsonl, require

_CITATION = re.compile(r"\[\d+\]")
TEST_FILE = "dolly/rlkd_dolly_test.jsonl"


def _norm(text: str) -> str:
    return " ".join(_CITATION.sub("", text).split())


class DollyTestOverlap:
    def __init__(self, test_rows: list[tuple[str, str, str]]):
        self._by_instruction: dict[str, list[tuple[str, str]]] = {}
        for instruction, context, response in test_rows:
            self._by_instruction.setdefault(_norm(instruction), []).append((_norm(context), _norm(response)[:40]))

    @classmethod
    def from_file(cls, path: str | Path) -> "DollyTestOverlap":
        rows = []
        for lineno, row in iter_jsonl(path):
            where = f"{path}:{lineno}"
            rows.append((require(row, "instruction", where), require(row, "context", where),
                         require(row, "response", where)))
        return cls(rows)

    def contains(self, instruction: str, context: str, response: str) -> bool:
        context, head = _norm(context), _norm(response)[:40]
        return any(c == context or r == head for c, r in self._by_instruction.get(_norm(instruction), ()))
