"""Adaptive KL (AKL, Wu et al. 2024, "Rethinking KL divergence in KD for LLMs").

The teacher's vocabulary is split into a head (highest teacher probabilities whose cumulative mass
is at most mu; the top token always belongs to it) and a tail. The gaps |p_T - p_S| summed over
each part, without gradient, weight forward KL (head gap) against reverse KL (tail gap):
AKL = g_head / (g_head + g_tail) * KL(p_T || p_S) + g_tail / (g_head + g_tail) * KL(p_S || p_T).
Identical distributions have no gap; the weights are then 1/2 each (both KLs are 0 there anyway).
"""

import torch

from rlkd.objectives.common import kl_from_log_probs, log_probs
from rlkd.objectives.registry import register_objective


def akl_weights(log_t: torch.Tensor, log_s: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(head weight on forward KL, tail weight on reverse KL) per row, without gradient."""
    with torch.no_grad():
        p_t, order = log_t.exp().sort(dim=-1, descending=True)
        gap = (p_t - log_s.exp().gather(-1, order)).abs()
        tail = p_t.cumsum(-1) > mu
        tail[..., 0] = False
        g_tail = (gap * tail).sum(-1)
        g_head = gap.sum(-1) - g_tail
        total = g_head + g_tail
        degenerate = total <= 0
        half = torch.full_like(total, 0.5)
        safe_total = torch.where(degenerate, torch.ones_like(total), total)
        return torch.where(degenerate, half, g_head / safe_total), torch.where(degenerate, half, g_tail / safe_total)


@register_objective("akl", bounds={"mu": (0.0, 1.0)})
def adaptive_kl(student_logits, teacher_logits, labels=None, *, mu=0.5):
    """Head-gap-weighted forward KL plus tail-gap-weighted reverse KL (mu = 0.5, gap |p_T - p_S|)."""
    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    w_head, w_tail = akl_weights(log_t, log_s, mu)
    return w_head * kl_from_log_probs(log_t, log_s) + w_tail * kl_from_log_probs(log_s, log_t)
