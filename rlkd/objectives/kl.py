"""Forward KL, KL(teacher || student): mean-seeking, the classic word-level KD objective."""

from rlkd.objectives.common import kl_from_log_probs, log_probs
from rlkd.objectives.registry import register_objective


@register_objective("kl", sparse_teacher=True)
def forward_kl(student_logits, teacher_logits, labels=None):
    """KL(p_T || p_S) summed over the vocabulary (true KL, not the CE form: 0 when equal)."""
    return kl_from_log_probs(log_probs(teacher_logits), log_probs(student_logits))
