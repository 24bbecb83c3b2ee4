"""KD objectives: per-token divergences, the RLKD ranking loss, and their chunked combination.

Built-in objectives register on import; a new one is one file with ``@register_objective`` plus
one import line below.
"""

from rlkd.objectives import akl, ce, jsd, kl, rkl, skew_kl, tvd  # noqa: F401  (registration)
from rlkd.objectives.config import LossConfig, RankingConfig
from rlkd.objectives.loss import DistillLoss, LossOutput
from rlkd.objectives.ranking import ranking_terms
from rlkd.objectives.registry import ObjectiveSpec, get_objective, list_objectives, register_objective
from rlkd.objectives.softrank import soft_rank

__all__ = [
    "DistillLoss",
    "LossConfig",
    "LossOutput",
    "ObjectiveSpec",
    "RankingConfig",
    "get_objective",
    "list_objectives",
    "ranking_terms",
    "register_objective",
    "soft_rank",
]
