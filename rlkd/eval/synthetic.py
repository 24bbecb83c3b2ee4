"""Scoring on the embedded benchmark's synthetic source, whose true next-token distributions are known.

Alignment of a model's logits with the teacher's and with the truth (CR@k, MOR@k, PPL,
KL(true||model)) on held-out sequences, and a downstream-style task: greedy continuation of a
prompt compared with the source's most likely path (exact match, token accuracy, ROUGE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rlkd.data.synthetic import FIRST_CONTENT, MarkovSource, SourceConfig, read_corpus, token_text


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def _logits(model, sequences: list[list[int]], batch: int = 50):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch):
            ids = torch.tensor(sequences[i:i + batch])
            out.append(model(input_ids=ids).logits.float())
    return torch.cat(out)


def greedy_answers(model, prompts: list[list[int]], n: int, n_content: int) -> list[list[int]]:
    """Greedy continuation restricted to content tokens (the source never emits PAD/BOS/EOS)."""
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[:, -1, :].float()
            logits[:, :FIRST_CONTENT] = float("-inf")
            logits[:, FIRST_CONTENT + n_content:] = float("-inf")
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]):].tolist()


def score_logits(student, teacher, truth, targets) -> dict[str, float]:
    """Alignment metrics of ``student`` logits [N, L, V] against ``teacher`` logits (or None) and the
    true distributions ``truth`` [N, L, V] (float64 probabilities); ``targets`` [N, L] next tokens."""
    import torch

    from rlkd.eval.alignment import alignment_from_logits

    n = student.shape[0]
    metrics: dict[str, float] = {}
    if teacher is not None:
        vs_teacher = alignment_from_logits((student[i], teacher[i], targets[i]) for i in range(n))
        metrics["ppl"] = vs_teacher.metrics["ppl_student"]
        metrics.update({k: v for k, v in vs_teacher.metrics.items() if k[:3] in ("cr@", "mor") and "corpus" not in k})
    # Zero-probability ids (specials, unused) get a finite floor so top-k stays well defined.
    true_logits = torch.log(truth.clamp_min(1e-30)).float()
    vs_truth = alignment_from_logits((student[i], true_logits[i], targets[i]) for i in range(n))
    metrics.setdefault("ppl", vs_truth.metrics["ppl_student"])
    metrics.update({f"true_{k}": v for k, v in vs_truth.metrics.items()
                    if k[:3] in ("cr@", "mor") and "corpus" not in k})
    log_q = torch.log_softmax(student.double(), dim=-1)
    log_p = torch.log(truth.clamp_min(1e-300))
    kl = torch.where(truth > 0, truth * (log_p - log_q), torch.zeros((), dtype=torch.float64))
    metrics["true_kl"] = float(kl.sum(-1).mean())
    return metrics


def score_answers(answers: list[list[int]], references: list[list[int]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Exact match and token accuracy (%) and ROUGE-1/2/L F (x100, rouge-score) of continuations:
    their means, and each example's value (for a paired bootstrap over examples)."""
    from rlkd.eval.rouge import rouge_example

    per_example: dict[str, list[float]] = {
        "exact_match": [100.0 * (a == r) for a, r in zip(answers, references)],
        "token_accuracy": [100.0 * sum(x == y for x, y in zip(a, r)) / len(r) for a, r in zip(answers, references)],
    }
    rouge = [rouge_example(token_text(a), token_text(r)) for a, r in zip(answers, references)]
    for key in ("rouge1", "rouge2", "rougeL"):
        per_example[key] = [float(r[key]) for r in rouge]
    metrics = {key: sum(values) / len(values) for key, values in per_example.items()}
    return metrics, per_example


def evaluate_synthetic(evaluation: dict[str, Any], model_path: str,
                       teacher_path: str | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics of ``model_path`` and its per-example downstream scores (in row order).
    ``evaluation``: ``heldout`` and ``downstream`` files and ``synthetic_source`` (a SourceConfig)."""
    import torch

    source = MarkovSource(SourceConfig(**evaluation["synthetic_source"]))
    heldout = read_corpus(Path(evaluation["heldout"]))
    model = _load(model_path)
    student = _logits(model, heldout)[:, :-1]
    teacher = _logits(_load(teacher_path), heldout)[:, :-1] if teacher_path else None
    targets = torch.tensor(heldout)[:, 1:]
    truth = torch.tensor(np.stack([source.true_distributions(s)[:-1] for s in heldout]), dtype=torch.float64)
    metrics = score_logits(student, teacher, truth, targets)
    rows = [json.loads(line) for line in Path(evaluation["downstream"]).read_text().splitlines() if line.strip()]
    answers = greedy_answers(model, [r["prompt"] for r in rows], len(rows[0]["answer"]), source.config.n_content)
    scores, per_example = score_answers(answers, [r["answer"] for r in rows])
    metrics.update(scores)
    return metrics, per_example
