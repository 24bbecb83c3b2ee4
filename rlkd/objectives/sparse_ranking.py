"""The RLKD ranking term against a sparse teacher (its top-K ids and log-probabilities).

The union is that of the dense term: the teacher's top-k (the k most likely of its K cached ids;
k <= K, checked at config time) and the student's top-k over the full vocabulary. The teacher's
score of a union id is its cached log-probability at the KD temperature; a student id outside the
cache gets :func:`rlkd.objectives.sparse_teacher.uncached_teacher_score`, which ranks it after every
cached id (the teacher's true order: an uncached id is at most as likely as the K-th cached one),
tied with the other uncached ids of the union. The student's scores are those of the dense term
(its temperature-scaled logits, or probabilities).

With logit scores the dense term ranks the teacher's logits z/T; log-probabilities are those minus
one constant per row, and Blondel's soft ranks (a projection onto the permutahedron, which lies in a
hyperplane orthogonal to (1, ..., 1)) and Pearson's correlation are both invariant to that shift.
So the term equals the dense one exactly (to fp32 rounding) whenever the union lies inside the
cache: always when K = V, and whenever the student's top-k are cached ids.
"""

from __future__ import annotations

import torch

from rlkd.objectives.ranking import overlap_count, per_token_union, rank_loss_from_scores, topk_ids
from rlkd.objectives.sparse_teacher import SparseTeacher, uncached_teacher_score


def sparse_rank_loss(student: torch.Tensor, teacher: SparseTeacher, ranking) -> tuple[torch.Tensor, ...]:
    """``(loss [N], degenerate [N], overlap [N])`` of the ranking term for temperature-scaled student
    logits ``student`` [N, V] (differentiable) against ``teacher`` rows; ``ranking``: a RankingConfig."""
    k = ranking.k
    with torch.no_grad():
        t_top = teacher.log_probs.topk(k, dim=-1).indices  # positions within the cache
        t_ids = teacher.ids.gather(-1, t_top)
        s_ids = topk_ids(student.detach(), k)
        overlap = overlap_count(t_ids, s_ids)
        ids, valid = per_token_union(t_ids, s_ids)
        # Where each union id sits in the cache (-1: not cached).
        match = ids.unsqueeze(-1) == teacher.ids.unsqueeze(-2)  # [N, u, K]
        cached = match.any(-1)
        # a row's cached ids are distinct, so at most one slot matches (0 where none does, masked below)
        slot = (match.long() * torch.arange(teacher.k, device=ids.device)).sum(-1)
        log_p = teacher.log_probs.to(student.dtype)
        fill = uncached_teacher_score(teacher).to(student.dtype).unsqueeze(-1)
        p = torch.where(cached, log_p.gather(-1, slot), fill.expand_as(ids))
        if ranking.scores == "probs":
            p = p.exp()
    if ranking.scores == "probs":
        q = (student.gather(-1, ids) - student.logsumexp(-1, keepdim=True)).exp()
    elif ranking.scores == "logits":
        q = student.gather(-1, ids)
    else:
        raise ValueError(f"ranking scores must be 'logits' or 'probs', got {ranking.scores!r}")
    loss, degenerate = rank_loss_from_scores(p, q, valid, correlation=ranking.correlation,
                                             regularization_strength=ranking.regularization_strength,
                                             backend=ranking.backend, official=False)
    return loss, degenerate, overlap
