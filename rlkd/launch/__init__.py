"""Cluster launchers for `rlkd train` (Slurm)."""
