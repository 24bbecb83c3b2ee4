"""Total variation distance."""

from rlkd.objectives.common import probs
from rlkd.objectives.registry import register_objective


@register_objective("tvd", sparse_teacher=True)
def total_variation(student_logits, teacher_logits, labels=None):
    """0.5 * sum |p_T - p_S|, in [0, 1] (the pre-training script's convention in the RLKD code)."""
    return 0.5 * (probs(teacher_logits) - probs(student_logits)).abs().sum(-1)
