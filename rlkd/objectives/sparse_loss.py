"""DistillLoss against a sparse teacher (top-K ids + tail bucket), chunk by chunk.

The same contract as the dense logits path (``DistillLoss.__call__`` hands a
:class:`~rlkd.objectives.sparse_teacher.SparseTeacher` here): a sum over the supervised positions,
the per-token losses and their gradient with respect to the student's logits computed together in
forward, ``chunk_size`` rows at a time, and handed to backward. Each objective is its registered
function applied to the bucketed log-probabilities (rlkd.objectives.sparse_teacher says why that is
the mass-preserving sparse loss); one that needs no teacher (cross-entropy) gets the dense student
rows. The ranking term is rlkd.objectives.sparse_ranking's.

Which losses can run here is read from the objectives' declarations (``sparse_teacher`` in the
registry): :func:`sparse_teacher_refusal` says, at config time, why a loss cannot.
"""

from __future__ import annotations

import torch

from rlkd.objectives.common import compute_dtype
from rlkd.objectives.registry import get_objective
from rlkd.objectives.sparse_ranking import sparse_rank_loss
from rlkd.objectives.sparse_teacher import SparseTeacher, student_buckets, teacher_buckets
from rlkd.objectives.stored_gradient import stored_gradient_backward

CHUNK_ELEMENT_BUDGET = 2**22


def sparse_teacher_refusal(loss_config, top_k: int) -> str | None:
    """Why the loss ``loss_config`` (a LossConfig) cannot train against a top-``top_k`` teacher, or None."""
    unsupported = [t.objective for t in loss_config.objective_terms() if not get_objective(t.objective).supports_sparse_teacher]
    if unsupported and loss_config.uses_base:
        return (f"objective {', '.join(map(repr, unsupported))} does not support a sparse (top-K) teacher: it does "
                "not declare sparse_teacher=True in its @register_objective; use the exact cache (no top_k)")
    ranking = loss_config.ranking
    if ranking.enabled:
        if ranking.fidelity == "official":
            return ("ranking.fidelity='official' needs the teacher's full logits (its batch-level union and NaN "
                    "fallback); use fidelity 'paper' with a sparse (top-K) teacher")
        if ranking.k > top_k:
            return f"ranking.k={ranking.k} exceeds the cached top-K ({top_k}): the teacher's top-k must be cached"
    if loss_config.fused_lm_head:
        return "loss.fused_lm_head computes the teacher's logits from its head; a cached sparse teacher has none"
    return None


def sparse_distill_loss(loss, student_logits: torch.Tensor, teacher: SparseTeacher, mask=None, labels=None, *,
                        grad_scale=None, output_type):
    """``loss`` (a DistillLoss) of ``student_logits`` [B, L, V] against ``teacher`` ([B, L, K] rows);
    returns its ``output_type`` (rlkd.objectives.loss.LossOutput, handed over by the caller: this
    module sits below rlkd.objectives.loss, which dispatches to it)."""
    refusal = sparse_teacher_refusal(loss.config, teacher.k)
    if refusal:
        raise ValueError(refusal)
    vocab = student_logits.shape[-1]
    if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"sparse teacher positions {tuple(teacher.ids.shape[:-1])} do not match student logits "
                         f"{tuple(student_logits.shape)} in the leading (batch, position) dimensions")
    if teacher.vocab_size != vocab:
        raise ValueError(f"vocabulary mismatch: student logits have {vocab} entries, the sparse teacher was cached "
                         f"over {teacher.vocab_size}")
    if abs(teacher.temperature - loss.config.temperature) > 1e-12:
        raise ValueError(f"the sparse teacher's log-probabilities are at temperature {teacher.temperature}, the loss "
                         f"is at {loss.config.temperature}; build the cache at the loss's temperature")
    positions, labels_sel, _ = loss.select_positions(student_logits.shape[:-1], student_logits.device, mask, labels,
                                                     "logits'")
    student_flat = student_logits.reshape(-1, vocab)
    n = positions.numel()
    if n == 0:
        return output_type(student_flat.sum() * 0.0, 0, {"loss": 0.0})
    _, weights = loss.batch_level(None, None, 0)  # paper fidelity: the configured weights, nothing read
    chunk = loss.config.chunk_size or max(1, CHUNK_ELEMENT_BUDGET // vocab)
    metrics: dict = {}
    per_token = _SparseChunkedLoss.apply(student_flat, teacher.flat().to(student_flat.device), positions, labels_sel,
                                         weights, chunk, loss, metrics, 1.0 if grad_scale is None else grad_scale)
    metrics["loss"] = per_token.detach().sum()
    metrics["rank_fallback"] = 0.0
    out = output_type(per_token.sum(), n, metrics, per_token, torch.isfinite(per_token.detach()).all())
    if not loss.defer_finite_check:
        loss.check_finite(out, positions, lambda at: (student_flat.detach().index_select(0, at), None))
    return out


def sparse_chunk(loss, student: torch.Tensor, teacher: SparseTeacher, labels, weights) -> tuple[torch.Tensor, dict]:
    """``(total [rows], logged terms)`` of one chunk: ``student`` raw logits [rows, V] (the autograd leaf)."""
    cfg = loss.config
    s = student.to(compute_dtype(student))
    if cfg.temperature != 1.0:
        s = s / cfg.temperature
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    base_weight = torch.full_like(total, weights.base)
    if loss.ranking is not None:
        rank, degenerate, overlap = sparse_rank_loss(s, teacher, loss.ranking)
        terms.update({"rank": rank, "rank_degenerate_rows": degenerate.to(s.dtype),
                      "topk_overlap": overlap.to(s.dtype) / loss.ranking.k})  # logged as the dense path logs them
        if weights.rank:
            total = total + weights.rank * rank
        if loss.ranking.mode == "dynamic":
            base_weight = base_weight * overlap.to(s.dtype) / loss.ranking.k
    if loss.objectives and weights.base:
        log_q = student_buckets(s, teacher)
        log_p = teacher_buckets(teacher, s.dtype)
        base = None
        for spec, params, weight in loss.objectives:
            value = spec.fn(log_q, log_p, labels, **params) if spec.needs_teacher else spec.fn(s, None, labels, **params)
            if len(loss.objectives) > 1:
                terms[f"base_{spec.name}"] = value
            base = weight * value if base is None else base + weight * value
        terms["base"] = base
        total = total + base_weight * base
    return total, terms


class _SparseChunkedLoss(torch.autograd.Function):
    """Per-token losses in forward, their gradient stored then (as rlkd.objectives.loss does)."""

    @staticmethod
    def forward(ctx, student_flat, teacher, positions, labels_sel, weights, chunk, loss, metrics, grad_scale):
        needs_grad = student_flat.requires_grad
        n = positions.numel()
        per_token = torch.empty(n, dtype=compute_dtype(student_flat), device=student_flat.device)
        grad_flat = torch.zeros_like(student_flat, memory_format=torch.contiguous_format) if needs_grad else None
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, n, chunk):
            idx = positions[start:start + chunk]
            leaf = student_flat.detach().index_select(0, idx).to(compute_dtype(student_flat))
            lab = labels_sel[start:start + chunk] if labels_sel is not None else None
            with torch.enable_grad():
                leaf.requires_grad_(needs_grad)
                total, terms = sparse_chunk(loss, leaf, teacher.rows(idx), lab, weights)
                if needs_grad:
                    grad = torch.autograd.grad(total.sum(), leaf, allow_unused=True)[0] if total.requires_grad else None
                    if grad is not None:
                        grad_flat.index_copy_(0, idx, (grad * grad_scale).to(grad_flat.dtype))
            per_token[start:start + chunk] = total.detach()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().sum()
        ctx.save_for_backward(positions)
        ctx.grad_flat, ctx.retain, ctx.grad_scale = grad_flat, loss.retain_gradient, grad_scale
        metrics.update(sums)
        return per_token

    @staticmethod
    def backward(ctx, grad_per_token):
        return (stored_gradient_backward(ctx, grad_per_token), *(None,) * 8)
