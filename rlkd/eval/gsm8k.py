"""GSM8K final-answer extraction and scoring.

A model's answer is the first number after the first ``####`` marker (the GSM8K / RFT answer
format the paper's students are trained on); when there is no marker, or no number follows it,
the answer is the last number anywhere in the output. The first marker wins because a model that
keeps generating after its answer often invents a new question with its own ``####`` line.
Numbers are compared as exact decimals after normalisation, so ``$1,000.00``, ``1000.`` and
``1000`` are the same answer; an output with no number at all is simply wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# Thousands separators only in well-formed groups, so a list such as "1,2,3" reads as three
# numbers rather than 123. The look-behind keeps digits glued to letters ("x2") out.
_NUMBER = re.compile(r"(?<![\w.])([-+]?)\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_MARKER = "####"
_MINUS_SIGNS = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\uff0d": "-"}


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of one number written as text (``"-$1,234.50"`` -> ``"-1234.5"``).

    Removes ``$``, thousands commas, a trailing full stop, a leading ``+`` and trailing decimal
    zeros; unicode minus signs count as ``-``. Returns None when ``text`` is not a number.
    """
    cleaned = text.strip()
    for sign, ascii_minus in _MINUS_SIGNS.items():
        cleaned = cleaned.replace(sign, ascii_minus)
    cleaned = cleaned.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1]
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    for sign, ascii_minus in _MINUS_SIGNS.items():
        text = text.replace(sign, ascii_minus)
    found = []
    for match in _NUMBER.finditer(text):
        normalized = normalize_number(match.group(1) + match.group(2))
        if normalized is not None:
            found.append(normalized)
    return found


def extract_answer(output: str) -> str | None:
    """The normalised final answer of a GSM8K-style output, or None when it holds no number."""
    marker = output.find(_MARKER)
    if marker >= 0:
        after = _numbers(output[marker + len(_MARKER):])
        if after:
            return after[0]
    numbers = _numbers(output)
    return numbers[-1] if numbers else None


def gold_answer(answer_field: str) -> str:
    """The gold answer of a GSM8K ``answer`` field (the number after its ``####``)."""
    if _MARKER not in answer_field:
        raise ValueError(f"GSM8K answer has no '{_MARKER}' line: {answer_field[-80:]!r}")
    extracted = extract_answer(answer_field)
    if extracted is None:
        raise ValueError(f"GSM8K answer has no number after '{_MARKER}': {answer_field[-80:]!r}")
    return extracted


def is_correct(output: str, gold: str) -> bool:
    """Whether ``output``'s extracted answer equals ``gold`` (a normalised or raw number)."""
    predicted = extract_answer(output)
    expected = normalize_number(gold)
    return predicted is not None and expected is not None and Decimal(predicted) == Decimal(expected)


@dataclass(frozen=True)
class GSM8KScore:
    correct: int
    total: int
    no_answer: int  # outputs in which no number could be found

    @property
    def score(self) -> float:
        """Accuracy x100, as the paper's "Score" column (e.g. 267/1319 -> 20.24)."""
        return 100.0 * self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"correct": self.correct, "total": self.total, "score": self.score,
                "no_answer": self.no_answer}


def score_gsm8k(outputs: list[str], golds: list[str]) -> GSM8KScore:
    if len(outputs) != len(golds):
        raise ValueError(f"{len(outputs)} outputs for {len(golds)} gold answers")
    correct = sum(is_correct(o, g) for o, g in zip(outputs, golds))
    no_answer = sum(extract_answer(o) is None for o in outputs)
    return GSM8KScore(correct=correct, total=len(outputs), no_answer=no_answer)
