"""Numerics shared by the objectives: fp32 (or wider) log-probabilities."""

from __future__ import annotations

import torch


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16/fp16 logits are upcast, fp64 stays fp64 (for gradcheck)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)


def probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.to(compute_dtype(logits)), dim=-1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row. Logits are finite (checked by the caller), so both logs are finite."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)
