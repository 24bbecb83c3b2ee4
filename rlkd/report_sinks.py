"""The metrics sinks `report_to` accepts and the optional package each needs (checked at config
load, before any model loads; the writers themselves are in rlkd.engine.reporting)."""

from __future__ import annotations

import importlib.util

SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": None}


def missing_packages(report_to: list[str]) -> list[str]:
    """The `report_to` sinks whose package is not installed."""
    return [name for name in report_to
            if SINK_PACKAGES[name] is not None and importlib.util.find_spec(SINK_PACKAGES[name]) is None]
