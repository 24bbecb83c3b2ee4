"""Objectives and the ranking term against a sparse (top-K + tail bucket) teacher, checked against the
exact dense loss (DistillLoss on the full logits), closed forms computed here in float64, and the
data-processing inequality where it holds."""

from __future__ import annotations

import math

import pytest
import torch

from rlkd.objectives import DistillLoss, RankingConfig, register_objective
from rlkd.objectives.cli import describe
from rlkd.objectives.config import LossConfig
from rlkd.objectives.registry import _REGISTRY
from rlkd.objectives.sparse_loss import sparse_teacher_refusal
from rlkd.objectives.sparse_teacher import SparseTeacher

ROWS, VOCAB = 10, 40
TEACHER_OBJECTIVES = ["kl", "rkl", "jsd", "tvd", "akl", "skew_kl", "skew_rkl"]
# Coarsening both distributions the same way can only lower these (data-processing inequality:
# f-divergences, and KLs against a mixture M that is coarsened with them). Not AKL: its weights move.
MONOTONE = ["kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"]


def sparse_from_dense(teacher: torch.Tensor, k: int, temperature: float = 1.0, *, shuffle: bool = True) -> SparseTeacher:
    """The top-k of dense logits [N, V] as the cache stores them, computed in float64 here."""
    log_p = torch.log_softmax(teacher.double() / temperature, dim=-1)
    ids = log_p.topk(k, dim=-1).indices
    if shuffle:  # the cache promises no order among the K ids
        ids = ids.gather(-1, torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(i))
                                          for i in range(len(ids))]))
    rest = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.where(rest, log_p, torch.full_like(log_p, -math.inf)).logsumexp(-1)
    return SparseTeacher(ids, log_p.gather(-1, ids).float(), tail.float(), temperature, teacher.shape[-1])


def _logits(seed=0, scale=3.0, rows=ROWS, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale, torch.randn(rows, vocab, generator=g) * scale


def _per_token(loss_fn, student, teacher):
    student = student.clone().requires_grad_(True)
    out = loss_fn(student, teacher)
    out.loss_sum.backward()
    return out.per_token.detach(), student.grad


@pytest.mark.parametrize("name", TEACHER_OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_every_id_cached_the_sparse_loss_is_the_exact_one(name, temperature):
    student, teacher = _logits()
    loss_fn = DistillLoss(objective=name, temperature=temperature, chunk_size=3)
    exact, exact_grad = _per_token(loss_fn, student, teacher)
    sparse, sparse_grad = _per_token(loss_fn, student, sparse_from_dense(teacher, VOCAB, temperature))
    torch.testing.assert_close(sparse, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, exact_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MONOTONE)
@pytest.mark.parametrize("k", [1, 4, 20])
def test_bucketing_never_raises_a_divergence_that_obeys_data_processing(name, k):
    for seed, scale in enumerate((0.3, 3.0, 8.0)):
        student, teacher = _logits(seed, scale)
        loss_fn = DistillLoss(objective=name)
        exact, _ = _per_token(loss_fn, student, teacher)
        sparse, _ = _per_token(loss_fn, student, sparse_from_dense(teacher, k))
        assert (sparse <= exact + 1e-5).all(), (name, k, scale, (sparse - exact).max())
        assert (sparse >= -1e-6).all()


def test_bucketed_kl_and_tvd_match_their_closed_forms_in_float64():
    student, teacher = _logits(3)
    k = 5
    sparse = sparse_from_dense(teacher, k, shuffle=False)
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    cached = torch.zeros_like(p, dtype=torch.bool).scatter(-1, sparse.ids, True)
    p_k, q_k = p.gather(-1, sparse.ids), q.gather(-1, sparse.ids)
    p_tail, q_tail = (p * ~cached).sum(-1), (q * ~cached).sum(-1)
    kl = (p_k * (p_k / q_k).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    tvd = 0.5 * ((p_k - q_k).abs().sum(-1) + (p_tail - q_tail).abs())
    got_kl, _ = _per_token(DistillLoss(objective="kl"), student, sparse)
    got_tvd, _ = _per_token(DistillLoss(objective="tvd"), student, sparse)
    torch.testing.assert_close(got_kl.double(), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_tvd.double(), tvd, rtol=1e-5, atol=1e-6)


def test_the_tail_bucket_carries_gradient_the_truncated_loss_would_not():
    # The student matches the teacher on the cached ids up to one factor, with its extra mass outside
    # them: the top-K renormalised KL is 0 there; the bucketed one sees the missing tail mass.
    teacher = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    student = torch.tensor([[4.0, 3.0, 2.0, 2.0, 2.0, 2.0]])
    sparse = sparse_from_dense(teacher, 2, shuffle=False)
    value, grad = _per_token(DistillLoss(objective="kl"), student, sparse)
    p_top = torch.softmax(teacher.double(), -1)[0, :2].sum()
    q_top = torch.softmax(student.double(), -1)[0, :2].sum()
    expected = p_top * (p_top / q_top).log() + (1 - p_top) * ((1 - p_top) / (1 - q_top)).log()
    torch.testing.assert_close(value[0].double(), expected, rtol=1e-5, atol=0)
    assert grad[0, 2:].gt(0).all() and grad[0, :2].lt(0).all()  # push mass back into the cache


def test_gradient_agrees_with_finite_differences_in_float64():
    student, teacher = _logits(5, rows=3, vocab=9)
    sparse = sparse_from_dense(teacher, 3)
    sparse.log_probs, sparse.tail_log_mass = sparse.log_probs.double(), sparse.tail_log_mass.double()
    for name in ("kl", "rkl", "jsd", "tvd", "skew_rkl"):
        loss_fn = DistillLoss(objective=name, retain_gradient=True, chunk_size=2)
        torch.autograd.gradcheck(lambda s: loss_fn(s, sparse).per_token, student.double().requires_grad_(True))


def test_a_second_backward_needs_retain_gradient_as_on_a_dense_teacher():
    student, teacher = _logits(6)
    sparse = sparse_from_dense(teacher, 8)
    s = student.clone().requires_grad_(True)
    out = DistillLoss(objective="kl", chunk_size=3)(s, sparse)
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_gradient=True"):
        out.loss_sum.backward()
    s.grad = None
    kept = DistillLoss(objective="kl", chunk_size=3, retain_gradient=True)(s, sparse)
    kept.loss_sum.backward(retain_graph=True)
    first = s.grad.clone()
    kept.loss_sum.backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_akl_on_buckets_is_a_convex_combination_of_the_bucketed_kls():
    student, teacher = _logits(6)
    sparse = sparse_from_dense(teacher, 4)
    akl, _ = _per_token(DistillLoss(objective="akl"), student, sparse)
    kl, _ = _per_token(DistillLoss(objective="kl"), student, sparse)
    rkl, _ = _per_token(DistillLoss(objective="rkl"), student, sparse)
    assert (akl >= torch.minimum(kl, rkl) - 1e-5).all() and (akl <= torch.maximum(kl, rkl) + 1e-5).all()


def test_cross_entropy_reads_the_dense_student_only():
    student, teacher = _logits(7)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(0))
    loss_fn = DistillLoss(terms=[{"objective": "kl"}, {"objective": "ce", "weight": 0.5}])
    exact = loss_fn(student, teacher, labels=labels).per_token
    sparse = loss_fn(student, sparse_from_dense(teacher, VOCAB), labels=labels).per_token
    torch.testing.assert_close(sparse, exact, rtol=1e-5, atol=1e-6)


# ---- the ranking term --------------------------------------------------------------------------
RANKINGS = [dict(k=5), dict(k=5, mode="dynamic"), dict(k=3, scores="probs"), dict(k=4, correlation="pearson")]


@pytest.mark.parametrize("ranking", RANKINGS)
def test_ranking_with_every_id_cached_is_the_exact_term(ranking):
    student, teacher = _logits(8)
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(**ranking), temperature=1.5)
    exact, exact_grad = _per_token(loss_fn, student, teacher)
    sparse, sparse_grad = _per_token(loss_fn, student, sparse_from_dense(teacher, VOCAB, 1.5))
    torch.testing.assert_close(sparse, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_grad, exact_grad, rtol=1e-4, atol=1e-5)


def test_ranking_equals_the_exact_term_when_the_students_top_k_is_cached():
    student, teacher = _logits(9)
    student = teacher + 0.05 * student  # a student close to the teacher: its top-5 inside the top-12
    k, cached = 5, 12
    t_top = teacher.topk(cached, -1).indices
    s_top = student.topk(k, -1).indices
    assert (s_top.unsqueeze(-1) == t_top.unsqueeze(-2)).any(-1).all()
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(k=k, mode="rank_only"))
    exact, exact_grad = _per_token(loss_fn, student, teacher)
    sparse, sparse_grad = _per_token(loss_fn, student, sparse_from_dense(teacher, cached))
    torch.testing.assert_close(sparse, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_grad, exact_grad, rtol=1e-4, atol=1e-5)


def test_student_ids_outside_the_cache_rank_after_every_cached_id_tied_at_the_mean_tail_probability():
    student, teacher = _logits(10)  # unrelated models: the student's top-k leaves a top-6 cache
    k, cached = 4, 6
    sparse = sparse_from_dense(teacher, cached)
    assert not (student.topk(k, -1).indices.unsqueeze(-1) == sparse.ids.unsqueeze(-2)).any(-1).all()
    # The documented rule written as a dense teacher: cached ids keep their log-probability, every
    # other id gets log(p_tail / (V - K)) (capped at the K-th cached one).
    fill = torch.minimum(sparse.tail_log_mass - math.log(VOCAB - cached), sparse.log_probs.amin(-1))
    assert (fill <= sparse.log_probs.amin(-1)).all()
    rule = fill.unsqueeze(-1).expand(ROWS, VOCAB).clone().scatter(-1, sparse.ids, sparse.log_probs)
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(k=k, mode="rank_only"))
    expected, expected_grad = _per_token(loss_fn, student, rule)
    got, got_grad = _per_token(loss_fn, student, sparse)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)


# ---- what can run on a sparse teacher ----------------------------------------------------------
def test_an_objective_that_does_not_declare_sparse_support_is_refused_by_name():
    @register_objective("test_dense_only_l2")
    def dense_only(student_logits, teacher_logits, labels=None):
        """||z_S - z_T||^2: reads the teacher's raw logits, which a top-K cache does not have."""
        return (student_logits - teacher_logits).pow(2).sum(-1)

    try:
        refusal = sparse_teacher_refusal(LossConfig(objective="test_dense_only_l2"), 8)
        assert "test_dense_only_l2" in refusal and "sparse" in refusal
        assert sparse_teacher_refusal(LossConfig(terms=[{"objective": "kl"}, {"objective": "ce"}]), 8) is None
        listed = {row["name"]: row["sparse_teacher"] for row in describe()}  # `rlkd objectives --json`
        assert listed["test_dense_only_l2"] is False and listed["kl"] is True and listed["ce"] is True
        assert "ranking.k=9" in sparse_teacher_refusal(LossConfig(objective="kl", ranking=RankingConfig(k=9)), 8)
        assert "official" in sparse_teacher_refusal(
            LossConfig(objective="kl", ranking=RankingConfig(k=5, fidelity="official")), 8)
    finally:
        del _REGISTRY["test_dense_only_l2"]


def test_bucketed_akl_can_exceed_the_exact_one_so_it_is_not_held_to_data_processing():
    # Coarsening lowers AKL's tail gap and moves weight from RKL to KL; on some rows that raises it.
    g = torch.Generator().manual_seed(3)
    student = torch.randn(64, 12, generator=g, dtype=torch.float64) * 5.0
    teacher = torch.randn(64, 12, generator=g, dtype=torch.float64) * 5.0
    loss_fn = DistillLoss(objective="akl")
    exact, _ = _per_token(loss_fn, student, teacher)
    sparse, _ = _per_token(loss_fn, student, sparse_from_dense(teacher, 2))
    assert (sparse > exact + 1e-3).any()
