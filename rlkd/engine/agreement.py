"""Live CR@k of the student against the teacher on the training batch (`agreement_every: N`).

CR@k is the paper's definition (rlkd.objectives.agreement, aggregated by rlkd.eval.alignment): a position counts when the student's
ordered top-k ids equal the teacher's. Here it is measured on the supervised positions of the
step's own micro-batches, from the logits the loss already received, and returned as *sums* of
per-position percentages: the training loop adds them up over micro-batches and ranks and divides
by the global supervised-token count like every other term, so `cr@k` in metrics.jsonl is the
percentage of the step's supervised positions (pooled over tokens, the evaluator's `*_corpus`).
"""

from __future__ import annotations

import torch

from rlkd.objectives.agreement import CR_KS, position_agreement


def agreement_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                   mask: torch.Tensor) -> dict[str, float]:
    """``{"cr@k": sum over supervised positions of 100 * [top-k lists equal]}``; empty without a teacher."""
    if teacher_logits is None:
        return {}
    with torch.no_grad():
        vocab = student_logits.shape[-1]
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        student = student_logits.detach().reshape(-1, vocab).index_select(0, rows)
        teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).index_select(0, rows)
        per_position = position_agreement(student, teacher, cr_ks=CR_KS, or_ks=())
    return {key: 100.0 * float(values.sum()) for key, values in per_position.items()}


def due(every: int, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based) measures agreement; ``every=0`` never does."""
    return every > 0 and (step + 1) % every == 0
