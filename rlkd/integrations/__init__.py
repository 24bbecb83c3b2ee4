"""Bridges from other training stacks to rlkd's losses (``rlkd.integrations.hf``: transformers/TRL)."""
