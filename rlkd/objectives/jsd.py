"""Generalised Jensen-Shannon divergence JSD(beta), in the GKD paper's convention.

M = beta * p_T + (1 - beta) * p_S and JSD(beta) = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),
so beta weights the teacher. JSD(beta) vanishes at both ends; its scaled limits are the KLs:
JSD(beta) / beta -> KL(p_T || p_S) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(p_S || p_T) as
beta -> 1. As in TRL, beta = 0 and beta = 1 return those limits (forward and reverse KL) exactly.
beta = 0.5 is the symmetric JS of the RLKD code (DistiLLM's lam=0.9 and TAID's JS are beta = 0.1).
"""

import math

import torch

from rlkd.objectives.common import kl_from_log_probs, log_probs
from rlkd.objectives.registry import register_objective


@register_objective("jsd", bounds={"beta": (0.0, 1.0)}, sparse_teacher=True)
def generalized_jsd(student_logits, teacher_logits, labels=None, *, beta=0.5):
    """beta*KL(T||M) + (1-beta)*KL(S||M), M = beta*T + (1-beta)*S; beta=0/1 give forward/reverse KL."""
    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    if beta == 0.0:
        return kl_from_log_probs(log_t, log_s)
    if beta == 1.0:
        return kl_from_log_probs(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)
