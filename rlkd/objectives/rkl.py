"""Reverse KL, KL(student || teacher): mode-seeking."""

from rlkd.objectives.common import kl_from_log_probs, log_probs
from rlkd.objectives.registry import register_objective


@register_objective("rkl", sparse_teacher=True)
def reverse_kl(student_logits, teacher_logits, labels=None):
    """KL(p_S || p_T) summed over the vocabulary."""
    return kl_from_log_probs(log_probs(student_logits), log_probs(teacher_logits))
