"""Adaptive KL (AKL, Wu et al. 2024, "Rethinking KL divergence in KD for LLMs").

The teacher's vocabulary is split into a head (highest teacher probabilities whose cumulative mass
is at most mu; the top token always belongs to it) and a tail. The gaps |p_T - p_S| summed over
each part, without gradient, weight forward KL (head gap) against reverse KL (tail gap):
AKL = g_head / (g_head + g_tail) * KL(p_T || p_S) + g_tail / (g_head + g_tail) * KL(p_S || p_T).
Identical distributions have no gap; the weights are then 1/2 each (both KLs are 0 there anyway).
"""

import torch

from rlkd.objectives.common import kl_from_log_probs, log_probs
from rlkd.objectives.ranking import topk_ids
from rlkd.objectives.registry import register_objective


HEAD_CANDIDATES = 64


def akl_weights(log_t: torch.Tensor, log_s: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(head weight on forward KL, tail weight on reverse KL) per row, without gradient.

    The head usually ends within the teacher's first few dozen tokens, so it is found among the
    top ``HEAD_CANDIDATES`` ids; only rows whose head reaches past them sort the whole vocabulary.
    """
    with torch.no_grad():
        p_t = log_t.exp()
        gap = (p_t - log_s.exp()).abs()
        candidates = min(HEAD_CANDIDATES, p_t.shape[-1])
        ids = topk_ids(p_t, candidates)
        p_top, order = p_t.gather(-1, ids).sort(dim=-1, descending=True)
        ids = ids.gather(-1, order)
        resolved = (p_top.sum(-1) > mu) | (candidates == p_t.shape[-1])  # the head ends inside
        g_head = _head_gap(p_top, gap.gather(-1, ids), mu)
        if not bool(resolved.all()):
            rest = (~resolved).nonzero().squeeze(-1)
            p_rest, gap_rest = (p_t, gap) if rest.numel() == len(p_t) else (p_t[rest], gap[rest])
            p_sorted, full_order = p_rest.sort(dim=-1, descending=True)
            g_head[rest] = _head_gap(p_sorted, gap_rest.gather(-1, full_order), mu)
        total = gap.sum(-1)
        g_tail = total - g_head
        degenerate = total <= 0
        half = torch.full_like(total, 0.5)
        safe_total = torch.where(degenerate, torch.ones_like(total), total)
        return torch.where(degenerate, half, g_head / safe_total), torch.where(degenerate, half, g_tail / safe_total)


def _head_gap(p_sorted: torch.Tensor, gap_sorted: torch.Tensor, mu: float) -> torch.Tensor:
    """Summed gap over the head: tokens whose cumulative teacher mass is <= mu, and the top one."""
    head = p_sorted.cumsum(-1) <= mu
    head[..., 0] = True
    return (gap_sorted * head).sum(-1)


@register_objective("akl", bounds={"mu": (0.0, 1.0)}, sparse_teacher=True)
def adaptive_kl(student_logits, teacher_logits, labels=None, *, mu=0.5):
    """Head-gap-weighted forward KL plus tail-gap-weighted reverse KL (mu = 0.5, gap |p_T - p_S|)."""
    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    w_head, w_tail = akl_weights(log_t, log_s, mu)
    return w_head * kl_from_log_probs(log_t, log_s) + w_tail * kl_from_log_probs(log_s, log_t)
