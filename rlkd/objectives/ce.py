"""Cross-entropy on the reference next tokens (SFT, and for mixing CE into a KD objective)."""

import torch

from rlkd.objectives.common import log_probs
from rlkd.objectives.registry import register_objective

IGNORE_INDEX = -100


@register_objective("ce", needs_teacher=False, needs_labels=True, counts="labelled")
def cross_entropy(student_logits, teacher_logits=None, labels=None):
    """-log p_S(label); rows whose label is -100 contribute 0."""
    if labels is None:
        raise ValueError("objective 'ce' needs labels (the next token at every selected position)")
    keep = labels != IGNORE_INDEX
    picked = log_probs(student_logits).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, -picked, picked.new_zeros(()))  # a zero on the logits' device, not a host scalar
