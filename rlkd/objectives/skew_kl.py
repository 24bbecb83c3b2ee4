"""Skew KL divergences of DistiLLM (alpha = 0.1 there, in DSKD and in TAID).

Skew forward KL: KL(p_T || alpha*p_T + (1-alpha)*p_S). Skew reverse KL: KL(p_S || alpha*p_S + (1-alpha)*p_T).
alpha = 0 gives the plain KLs.
"""

import math

import torch

from rlkd.objectives.common import kl_from_log_probs, log_probs
from rlkd.objectives.registry import register_objective


def _skewed(log_a, log_b, alpha):
    """log(alpha * a + (1 - alpha) * b), stable in log space."""
    if alpha == 0.0:
        return log_b
    if alpha == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))


@register_objective("skew_kl", bounds={"alpha": (0.0, 1.0)}, sparse_teacher=True)
def skew_forward_kl(student_logits, teacher_logits, labels=None, *, alpha=0.1):
    """KL(p_T || alpha*p_T + (1-alpha)*p_S)."""
    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    return kl_from_log_probs(log_t, _skewed(log_t, log_s, alpha))


@register_objective("skew_rkl", bounds={"alpha": (0.0, 1.0)}, sparse_teacher=True)
def skew_reverse_kl(student_logits, teacher_logits, labels=None, *, alpha=0.1):
    """KL(p_S || alpha*p_S + (1-alpha)*p_T)."""
    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    return kl_from_log_probs(log_s, _skewed(log_s, log_t, alpha))
