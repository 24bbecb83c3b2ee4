"""ROUGE F-measures x100, the way the paper's tables and the MiniLLM protocol report them.

Main implementation: Google's ``rouge-score`` (Porter stemmer on, its default tokenizer, which
lower-cases and keeps ``[a-z0-9]`` runs). ``rougeL`` is sentence-level LCS (not ``rougeLsum``).
When an example has several references (S-NI), each ROUGE type takes its own maximum over the
references, as MiniLLM's ``metric_max_over_ground_truths`` does for ROUGE-L. The corpus score is
the mean of per-example F-measures, x100.

Variant: the ``rouge`` package on PyPI (pltrdy/rouge), which the paper names as its ROUGE
library. It tokenises differently, does not stem, counts ROUGE-1/2 over distinct n-grams, and
raises on empty hypotheses; an empty prediction scores 0 there. Its numbers are stored under
separate ``rouge_pkg_*`` keys.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PKG_KEYS = {"rouge1": "rouge-1", "rouge2": "rouge-2", "rougeL": "rouge-l"}


@lru_cache(maxsize=8)
def _scorer(rouge_types: tuple[str, ...], use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference is needed to compute ROUGE")
    return refs


def rouge_example(prediction: str, references: str | Sequence[str],
                  rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = True) -> dict[str, float]:
    """F-measure x100 of each ROUGE type for one prediction, maximised over the references."""
    scorer = _scorer(tuple(rouge_types), use_stemmer)
    best = {t: 0.0 for t in rouge_types}
    for ref in _as_references(references):
        scores = scorer.score(ref, prediction)  # rouge-score's order is (target, prediction)
        for t in rouge_types:
            best[t] = max(best[t], 100.0 * scores[t].fmeasure)
    return best


def rouge_pkg_available() -> bool:
    try:
        import rouge  # noqa: F401
    except ImportError:
        return False
    return True


def rouge_pkg_example(prediction: str, references: str | Sequence[str],
                      rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """The same scores from the ``rouge`` PyPI package (keys ``rouge_pkg_<type>``)."""
    from rouge import Rouge

    best = {f"rouge_pkg_{t}": 0.0 for t in rouge_types}
    if not prediction.strip():
        return best
    for ref in _as_references(references):
        if not ref.strip():
            continue
        # The package rebuilds the LCS recursively (depth up to both lengths together): allow it.
        depth = 2 * (len(prediction.split()) + len(ref.split())) + 1000
        previous = sys.getrecursionlimit()
        sys.setrecursionlimit(max(previous, depth))
        try:
            scores = Rouge().get_scores(prediction, ref)[0]
        except ValueError:
            continue  # raised for hypotheses made only of punctuation: no overlap
        finally:
            sys.setrecursionlimit(previous)
        for t in rouge_types:
            key = f"rouge_pkg_{t}"
            best[key] = max(best[key], 100.0 * scores[_PKG_KEYS[t]]["f"])
    return best


def corpus_rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                 rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = True,
                 with_rouge_pkg: bool = False) -> dict[str, float]:
    """Mean over examples of :func:`rouge_example` (and of the package variant if asked)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    totals: dict[str, float] = {}
    for pred, refs in zip(predictions, references):
        example = rouge_example(pred, refs, rouge_types, use_stemmer)
        if with_rouge_pkg:
            example.update(rouge_pkg_example(pred, refs, rouge_types))
        for key, value in example.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(predictions) for key, value in totals.items()}
