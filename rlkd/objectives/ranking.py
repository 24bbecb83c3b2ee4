"""The RLKD ranking loss: L_rank = 1 - SRCC(p, q) at every supervised position.

p and q are the teacher's and the student's scores on the union of the teacher's top-k and the
student's top-k token ids (Peng & Zhang, COLING 2025, Eq. 1). Two ways to build that union:

* ``paper`` (default): the exact per-position set union. Each row has between k and 2k distinct
  ids; rows are packed into [N, 2k] with a validity mask (duplicates masked out), no Python loop.
* ``official``: what the released code does - ``torch.unique(cat(topk_T, topk_S), dim=-1)`` over
  the whole micro-batch. That removes duplicate *columns* (an id pair equal at every position), so
  in practice every row keeps 2k ids and an id in both top-k sets is counted twice (tied scores).

Spearman correlation is the Pearson correlation of (soft) ranks. A row whose ranks or scores have
no spread has no correlation: such degenerate rows contribute 0 with no gradient and are counted,
instead of turning the batch into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkd.objectives.softrank import soft_rank


@dataclass
class RankTerms:
    loss: torch.Tensor  # [N] 1 - correlation; 0 where degenerate
    degenerate: torch.Tensor  # [N] bool
    overlap: torch.Tensor  # [N] |topk_T ∩ topk_S| (exact set intersection, whatever the union mode)


TOPK_BLOCK = 64


def topk_ids(scores: torch.Tensor, k: int, block: int = TOPK_BLOCK) -> torch.Tensor:
    """Ids of the k largest entries per row of [R, V] scores (unordered).

    Two-stage and several times faster than ``torch.topk`` over a large vocabulary: a top-k
    element lies in a block whose maximum is among the k largest block maxima (at most k - 1
    elements exceed it, hence at most k - 1 blocks do), so the exact answer is the top-k of those
    k blocks plus the ragged tail. Ties may resolve to other, equally valid ids than torch.topk.
    """
    rows, vocab = scores.shape
    n_blocks = vocab // block
    if n_blocks < 4 * k:
        return scores.topk(k, dim=-1, sorted=False).indices
    block_max = scores[:, : n_blocks * block].unflatten(-1, (n_blocks, block)).amax(-1)
    top_blocks = block_max.topk(k, dim=-1, sorted=False).indices
    offsets = torch.arange(block, device=scores.device)
    candidates = (top_blocks.unsqueeze(-1) * block + offsets).flatten(1)
    if vocab % block:
        tail = torch.arange(n_blocks * block, vocab, device=scores.device).expand(rows, -1)
        candidates = torch.cat([candidates, tail], dim=-1)
    best = scores.gather(-1, candidates).topk(k, dim=-1, sorted=False).indices
    return candidates.gather(-1, best)


def per_token_union(teacher_ids: torch.Tensor, student_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact union of two id sets per row: (ids [N, 2k] sorted, valid [N, 2k]); duplicates invalid."""
    ids, _ = torch.cat([teacher_ids, student_ids], dim=-1).sort(dim=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return ids, valid


def official_batch_union(teacher_ids: torch.Tensor, student_ids: torch.Tensor) -> torch.Tensor:
    """The released code's union: unique columns across the batch, then each row sorted."""
    columns = torch.unique(torch.cat([teacher_ids, student_ids], dim=-1), dim=-1)
    return columns.sort(dim=-1).values


def overlap_count(teacher_ids: torch.Tensor, student_ids: torch.Tensor) -> torch.Tensor:
    return (teacher_ids.unsqueeze(-1) == student_ids.unsqueeze(-2)).any(-1).sum(-1)


def _centered(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum(-1, keepdim=True).to(x.dtype)
    mean = torch.where(valid, x, torch.zeros_like(x)).sum(-1, keepdim=True) / count
    return torch.where(valid, x - mean, torch.zeros_like(x))


def safe_correlation(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, eps: float = 1e-12):
    """Pearson correlation per row over valid entries -> (corr [N], degenerate [N]).

    Degenerate rows (no spread in x or y) get corr 1 (loss 0) through ``torch.where`` on both the
    value and the denominator, so neither the value nor the gradient can become NaN.
    """
    xc, yc = _centered(x, valid), _centered(y, valid)
    sxx, syy = (xc * xc).sum(-1), (yc * yc).sum(-1)
    degenerate = (sxx <= eps) | (syy <= eps)
    denom = torch.where(degenerate, torch.ones_like(sxx), sxx * syy).sqrt()
    corr = torch.where(degenerate, torch.ones_like(sxx), (xc * yc).sum(-1) / denom)
    return corr, degenerate


def official_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The released code's normalisation: centre, divide by the norm; 0/0 gives NaN on purpose."""
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return ((xc / xc.norm(dim=-1, keepdim=True)) * (yc / yc.norm(dim=-1, keepdim=True))).sum(-1)


def union_ids_for(student_logits, teacher_logits, k, union_ids=None):
    """(ids [N, u], valid [N, u], exact top-k overlap [N]) without gradient."""
    with torch.no_grad():
        t_ids, s_ids = topk_ids(teacher_logits, k), topk_ids(student_logits, k)
        overlap = overlap_count(t_ids, s_ids)
        if union_ids is None:
            ids, valid = per_token_union(t_ids, s_ids)
        else:
            ids, valid = union_ids, torch.ones_like(union_ids, dtype=torch.bool)
    return ids, valid, overlap


def gather_scores(logits: torch.Tensor, ids: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "logits":
        return logits.gather(-1, ids)
    if kind == "probs":
        # p_i = exp(z_i - logsumexp(z)): no full softmax is materialised for the ranking term.
        return (logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)).exp()
    raise ValueError(f"ranking scores must be 'logits' or 'probs', got {kind!r}")


def rank_loss_from_scores(p, q, valid, *, correlation="spearman", regularization_strength=1.0,
                          backend="auto", official=False) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - correlation of teacher scores p and student scores q per row -> (loss, degenerate)."""
    if correlation == "spearman":
        p = soft_rank(p, None if official else valid, regularization_strength, backend)
        q = soft_rank(q, None if official else valid, regularization_strength, backend)
    elif correlation != "pearson":
        raise ValueError(f"ranking correlation must be 'spearman' or 'pearson', got {correlation!r}")
    if official:
        corr = official_correlation(p, q)
        return 1.0 - corr, torch.isnan(corr)
    corr, degenerate = safe_correlation(p, q, valid)
    return 1.0 - corr, degenerate


def ranking_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int,
    correlation: str = "spearman",
    scores: str = "logits",
    regularization_strength: float = 1.0,
    backend: str = "auto",
    union_ids: torch.Tensor | None = None,
    official: bool = False,
) -> RankTerms:
    """Per-position ranking loss on [N, V] logits.

    ``union_ids`` [N, u] replaces the per-token union (the official batch-level union is built by
    the caller, which sees the whole micro-batch). ``official`` also switches to the released
    code's NaN-producing normalisation.
    """
    ids, valid, overlap = union_ids_for(student_logits, teacher_logits, k, union_ids)
    loss, degenerate = rank_loss_from_scores(
        gather_scores(teacher_logits, ids, scores), gather_scores(student_logits, ids, scores), valid,
        correlation=correlation, regularization_strength=regularization_strength, backend=backend,
        official=official,
    )
    return RankTerms(loss, degenerate, overlap)
