"""rlkd: knowledge distillation of LLMs with the RLKD ranking loss and every KD baseline."""

__version__ = "0.1.0"
