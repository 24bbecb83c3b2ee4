"""The RLKD ranking loss against scipy, a row-by-row slow reference, torchsort, and closed cases."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, rankdata, spearmanr

from rlkd.objectives import DistillLoss, RankingConfig, ranking_terms, soft_rank
from rlkd.objectives.ranking import official_batch_union, per_token_union
from rlkd.objectives.softrank import isotonic_decreasing, torchsort_available

needs_torchsort = pytest.mark.skipif(not torchsort_available(), reason="torchsort not installed")


def _logits(n=16, v=60, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * 3, torch.randn(n, v, generator=g, dtype=dtype) * 3


# ---- soft rank -----------------------------------------------------------------------------------
def _pav_decreasing(y):
    """Sequential pool-adjacent-violators for a non-increasing fit (textbook reference)."""
    blocks = []  # [sum, count]
    for value in y:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([[s / c] * c for s, c in blocks])


def test_isotonic_regression_matches_pool_adjacent_violators():
    y = torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = isotonic_decreasing(y).numpy()
    expected = np.stack([_pav_decreasing(row) for row in y.numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_soft_rank_tends_to_hard_ranks():
    x = torch.randn(50, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ranks = soft_rank(x, regularization_strength=1e-4, backend="torch")
    np.testing.assert_allclose(ranks.numpy(), np.stack([rankdata(r) for r in x.numpy()]), atol=1e-9)


def test_padded_rows_equal_rows_ranked_alone():
    x = torch.randn(40, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    valid = torch.rand(40, 10, generator=torch.Generator().manual_seed(4)) > 0.4
    valid[:, 0] = True
    packed = soft_rank(x, valid, 1.0, backend="torch")
    for row, keep, got in zip(x, valid, packed):
        alone = soft_rank(row[keep][None], None, 1.0, backend="torch")[0]
        assert torch.allclose(got[keep], alone, atol=1e-12)
        assert (got[~keep] == 0).all()


@needs_torchsort
@pytest.mark.parametrize("strength", [1.0, 0.1])
def test_torch_and_torchsort_soft_ranks_agree_in_values_and_gradients(strength):
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(5)) * 2
    valid = torch.rand(64, 10, generator=torch.Generator().manual_seed(6)) > 0.3
    valid[:, 0] = True
    weights = torch.randn(64, 10, generator=torch.Generator().manual_seed(7))
    results = {}
    for backend in ("torch", "torchsort"):
        xb = x.clone().requires_grad_(True)
        ranks = soft_rank(xb, valid, strength, backend=backend)
        (grad,) = torch.autograd.grad((ranks * weights).sum(), xb)
        results[backend] = (ranks.detach(), grad)
    assert torch.allclose(results["torch"][0], results["torchsort"][0], atol=1e-5)
    assert torch.allclose(results["torch"][1], results["torchsort"][1], atol=1e-5)


@needs_torchsort
def test_ranking_loss_backends_agree_through_the_whole_loss():
    s, t = _logits(dtype=torch.float32)
    grads = {}
    for backend in ("torch", "torchsort"):
        sb = s.clone().requires_grad_(True)
        out = DistillLoss(objective="kl", ranking=RankingConfig(k=5, backend=backend))(sb, t)
        grads[backend] = (out.loss_sum.detach(), torch.autograd.grad(out.loss_sum, sb)[0])
    assert torch.allclose(grads["torch"][0], grads["torchsort"][0], atol=1e-5)
    assert torch.allclose(grads["torch"][1], grads["torchsort"][1], atol=1e-5)


# ---- union -------------------------------------------------------------------------------------------
def test_per_token_union_is_the_exact_set_union():
    teacher = torch.tensor([[5, 9, 2], [7, 1, 3], [4, 0, 6]])
    student = torch.tensor([[9, 5, 4], [1, 8, 3], [6, 4, 0]])
    ids, valid = per_token_union(teacher, student)
    for row in range(3):
        assert sorted(ids[row][valid[row]].tolist()) == sorted(set(teacher[row].tolist()) | set(student[row].tolist()))


def test_official_union_keeps_duplicates_across_a_batch_but_not_for_one_row():
    # The worked example of ../shared/papers/rlkd.md (numpy emulation of the released code).
    teacher, student = torch.tensor([[5, 9, 2], [7, 1, 3]]), torch.tensor([[9, 5, 4], [1, 8, 3]])
    assert official_batch_union(teacher, student).tolist() == [[2, 4, 5, 5, 9], [1, 3, 3, 7, 8]]
    assert official_batch_union(teacher[:1], student[:1]).tolist() == [[2, 4, 5, 9]]


# ---- the loss against independent references --------------------------------------------------------
def _slow_ranking_loss(s, t, k, correlation="spearman", strength=None):
    """Row by row: python set union, scipy statistics (hard ranks) or soft ranks of each row alone."""
    out = []
    for srow, trow in zip(s, t):
        ids = sorted(set(torch.topk(trow, k).indices.tolist()) | set(torch.topk(srow, k).indices.tolist()))
        p, q = trow[ids], srow[ids]
        if correlation == "pearson":
            out.append(1 - pearsonr(p.numpy(), q.numpy())[0])
        elif strength is None:
            out.append(1 - spearmanr(p.numpy(), q.numpy())[0])
        else:
            rp = soft_rank(p[None], None, strength, "torch")[0].numpy()
            rq = soft_rank(q[None], None, strength, "torch")[0].numpy()
            out.append(1 - np.corrcoef(rp, rq)[0, 1])
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3, 5, 15])
def test_ranking_loss_equals_scipy_spearman_in_the_hard_rank_limit(k):
    s, t = _logits()
    got = ranking_terms(s, t, k=k, regularization_strength=1e-5, backend="torch").loss.numpy()
    if k == 1:  # a union of 1 or 2 ids: a single id has no correlation and counts as degenerate
        assert np.isfinite(got).all()
        return
    np.testing.assert_allclose(got, _slow_ranking_loss(s, t, k), atol=1e-8)


def test_ranking_loss_matches_slow_per_row_soft_rank_reference():
    s, t = _logits()
    t[:4] = s[:4] + 0.3 * torch.randn(4, s.shape[1], dtype=s.dtype)  # overlapping top-k sets
    got = ranking_terms(s, t, k=5, regularization_strength=1.0, backend="torch").loss.numpy()
    np.testing.assert_allclose(got, _slow_ranking_loss(s, t, 5, strength=1.0), atol=1e-10)


def test_pearson_variant_matches_scipy_pearson_on_the_union():
    s, t = _logits()
    got = ranking_terms(s, t, k=5, correlation="pearson").loss.numpy()
    np.testing.assert_allclose(got, _slow_ranking_loss(s, t, 5, correlation="pearson"), atol=1e-10)


def test_identical_logits_give_zero_and_reversed_order_gives_two():
    s, _ = _logits()
    assert torch.allclose(ranking_terms(s, s.clone(), k=5).loss, torch.zeros(len(s), dtype=s.dtype), atol=1e-12)
    # Same ordering, different values: 0 once ranks are hard.
    same_order = ranking_terms(s, 2 * s + 1, k=5, regularization_strength=1e-6).loss
    assert torch.allclose(same_order, torch.zeros_like(same_order), atol=1e-9)
    # The same five tokens on top, in exactly the opposite order: Spearman -1, loss 2.
    v = 50
    teacher = torch.full((1, v), -20.0, dtype=torch.float64)
    student = teacher.clone()
    top = torch.tensor([3, 17, 21, 30, 44])
    teacher[0, top] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    student[0, top] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    assert ranking_terms(student, teacher, k=5, regularization_strength=1e-6).loss.item() == pytest.approx(2.0)


def test_probability_scores_rank_like_logits_in_the_hard_limit():
    s, t = _logits()
    by_logits = ranking_terms(s, t, k=5, scores="logits", regularization_strength=1e-7).loss
    by_probs = ranking_terms(s, t, k=5, scores="probs", regularization_strength=1e-9).loss
    assert torch.allclose(by_logits, by_probs, atol=1e-6)


def test_ranking_loss_gradcheck_float64():
    s, t = _logits(n=4, v=12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ranking_terms(x, t, k=3, backend="torch").loss, (s,))
    assert torch.autograd.gradcheck(
        lambda x: DistillLoss(objective="kl", ranking=RankingConfig(k=3, backend="torch"), retain_gradient=True)(x, t).loss_sum,
        (s,),
    )


def test_degenerate_rows_are_counted_and_never_nan():
    s, t = _logits(n=4, v=20, dtype=torch.float32)
    t[1] = 0.0  # a uniform teacher row: no ranking information at all
    s.requires_grad_(True)
    out = DistillLoss(objective="kl", ranking=RankingConfig(k=5))(s, t)
    (grad,) = torch.autograd.grad(out.loss_sum, s)
    assert torch.isfinite(grad).all()
    assert out.metrics["rank_degenerate_rows"] == 1
    base_only = DistillLoss(objective="kl")(s.detach(), t).per_token
    # The degenerate row keeps its base term at weight 1 (no silent re-weighting) and adds no rank loss.
    assert out.per_token[1].item() == pytest.approx(base_only[1].item(), rel=1e-6)


@pytest.mark.parametrize("vocab", [64, 32000, 50257])
@pytest.mark.parametrize("k", [1, 5, 15])
def test_blockwise_topk_equals_torch_topk(vocab, k):
    from rlkd.objectives.ranking import topk_ids

    x = torch.randn(33, vocab, generator=torch.Generator().manual_seed(vocab + k))
    x[0, -3:] = 50.0  # top entries in the ragged tail
    x[1, :k] = torch.arange(k, dtype=x.dtype) + 40.0  # all in the first block
    got = x.gather(-1, topk_ids(x, k)).sort(-1).values
    assert torch.equal(got, x.topk(k).values.sort(-1).values)
    assert torch.equal(topk_ids(x, k).sort(-1).values, x.topk(k).indices.sort(-1).values)
