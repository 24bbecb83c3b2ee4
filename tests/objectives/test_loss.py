"""DistillLoss: fused chunked gradients, reduction, combination modes, fidelity mode, bad input."""

import pytest
import torch

from rlkd.objectives import DistillLoss, LossConfig, RankingConfig, get_objective, ranking_terms


def _batch(b=3, l=9, v=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, l, v, generator=g, dtype=dtype) * 2
    t = torch.randn(b, l, v, generator=g, dtype=dtype) * 2
    mask = torch.rand(b, l, generator=g) > 0.35
    return s, t, mask


def _plain_autograd(objective, s, t, mask, ranking=None, params=None):
    """Reference: the same terms through ordinary autograd on all selected rows at once."""
    s_sel, t_sel = s[mask], t[mask]
    total = get_objective(objective).fn(s_sel, t_sel, None, **(params or {}))
    if ranking is not None:
        total = ranking.base_weight * total + ranking.rank_weight * ranking_terms(
            s_sel, t_sel, k=ranking.k, backend=ranking.backend).loss
    return total.sum()


@pytest.mark.parametrize("objective", ["kl", "tvd", "akl"])  # akl: weights without gradient
@pytest.mark.parametrize("with_rank", [False, True])
def test_fused_gradients_equal_plain_autograd(objective, with_rank):
    """The gradient DistillLoss writes during forward, chunk by chunk, is autograd's over all rows at
    once (the ranking term's too). Whether an objective's own gradient is right is checked against
    finite differences, for every registered objective, in test_divergence_properties.py."""
    s, t, mask = _batch()
    ranking = RankingConfig(k=5, backend="torch") if with_rank else RankingConfig(enabled=False)
    s1 = s.clone().requires_grad_(True)
    out = DistillLoss(objective=objective, ranking=ranking, chunk_size=4)(s1, t, mask)
    (g1,) = torch.autograd.grad(out.loss_sum, s1)
    s2 = s.clone().requires_grad_(True)
    ref = _plain_autograd(objective, s2, t, mask, ranking if with_rank else None)
    (g2,) = torch.autograd.grad(ref, s2)
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert out.n_tokens == int(mask.sum())


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_equals_unchunked(chunk):
    s, t, mask = _batch()
    cfg = dict(objective="jsd", ranking=RankingConfig(k=5))
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    a = DistillLoss(**cfg, chunk_size=chunk)(s1, t, mask)
    b = DistillLoss(**cfg, chunk_size=None)(s2, t, mask)
    assert torch.allclose(a.per_token, b.per_token, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(a.loss_sum, s1)[0], torch.autograd.grad(b.loss_sum, s2)[0], atol=1e-7)
    for key in b.metrics:
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5, abs=1e-6)


def test_micro_batches_normalised_by_the_global_token_count_equal_the_whole_batch():
    s, t, mask = _batch(b=4)
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(k=5))
    whole = s.clone().requires_grad_(True)
    out = loss_fn(whole, t, mask)
    (g_whole,) = torch.autograd.grad(out.loss_sum / out.n_tokens, whole)

    split = s.clone().requires_grad_(True)
    global_tokens = int(mask.sum())  # what the engine all-reduces before the step
    total = 0.0
    for i in range(4):  # four micro-batches of one sequence each, different token counts
        part = loss_fn(split[i : i + 1], t[i : i + 1], mask[i : i + 1])
        (part.loss_sum / global_tokens).backward()
        total += part.loss_sum.item() / global_tokens
    assert total == pytest.approx(out.loss_sum.item() / out.n_tokens, rel=1e-6)
    assert torch.allclose(split.grad, g_whole, atol=1e-8)


def test_masked_positions_contribute_nothing():
    s, t, mask = _batch()
    s_changed, t_changed = s.clone(), t.clone()
    s_changed[~mask] = torch.randn_like(s_changed[~mask]) * 10
    t_changed[~mask] = torch.randn_like(t_changed[~mask]) * 10
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(k=5))
    a, b = s.clone().requires_grad_(True), s_changed.clone().requires_grad_(True)
    out_a, out_b = loss_fn(a, t, mask), loss_fn(b, t_changed, mask)
    assert out_a.loss_sum.item() == pytest.approx(out_b.loss_sum.item(), rel=1e-6)
    (ga,), (gb,) = torch.autograd.grad(out_a.loss_sum, a), torch.autograd.grad(out_b.loss_sum, b)
    assert (ga[~mask] == 0).all() and (gb[~mask] == 0).all()
    assert torch.allclose(ga[mask], gb[mask])


def test_combination_modes():
    s, t, mask = _batch()
    s_sel, t_sel = s[mask], t[mask]
    kl = get_objective("kl").fn(s_sel, t_sel, None)
    rank = ranking_terms(s_sel, t_sel, k=5)
    fixed = DistillLoss(objective="kl", ranking=RankingConfig(k=5))(s, t, mask)
    assert torch.allclose(fixed.per_token, 2 * rank.loss + kl, atol=1e-5)

    dynamic = DistillLoss(objective="kl", ranking=RankingConfig(k=5, mode="dynamic"))(s, t, mask)
    overlap = torch.tensor([len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist()))
                            for a, b in zip(s_sel, t_sel)], dtype=torch.float32)
    assert torch.allclose(dynamic.per_token, 2 * rank.loss + overlap / 5 * kl, atol=1e-5)

    rank_only = DistillLoss(objective=None, ranking=RankingConfig(k=5, mode="rank_only", rank_weight=1.0))(s, t, mask)
    assert torch.allclose(rank_only.per_token, rank.loss, atol=1e-6)
    assert "base" not in rank_only.metrics
    assert LossConfig(objective="kl", ranking=RankingConfig(k=5, mode="dynamic")).label() == "KL+R(dyn)"
    assert LossConfig(objective=None, ranking=RankingConfig(k=15, mode="rank_only")).label() == "Rank-15"


def test_official_fidelity_mode_reproduces_the_released_code():
    s, t, mask = _batch(v=40)
    s_sel, t_sel = s[mask], t[mask]
    # Released code, written out: batch-level unique union, soft ranks, rank + base / 2.
    t_ids, s_ids = t_sel.topk(5).indices, s_sel.topk(5).indices
    union = torch.unique(torch.cat([t_ids, s_ids], -1), dim=-1).sort(-1).values
    from rlkd.objectives.softrank import soft_rank

    rp, rq = soft_rank(t_sel.gather(-1, union)), soft_rank(s_sel.gather(-1, union))
    rp, rq = rp - rp.mean(-1, keepdim=True), rq - rq.mean(-1, keepdim=True)
    corr = ((rp / rp.norm(dim=-1, keepdim=True)) * (rq / rq.norm(dim=-1, keepdim=True))).sum(-1)
    kl = get_objective("kl").fn(s_sel, t_sel, None)
    expected_mean = (1 - corr.mean()) + kl.mean() / 2
    out = DistillLoss(objective="kl", ranking=RankingConfig(k=5, fidelity="official"))(s, t, mask)
    assert (out.loss_sum / out.n_tokens).item() == pytest.approx(expected_mean.item(), rel=1e-5)
    assert union.shape[1] == 10  # duplicates survive the batch-level unique
    paper = DistillLoss(objective="kl", ranking=RankingConfig(k=5))(s, t, mask)
    assert paper.loss_sum.item() != pytest.approx(out.loss_sum.item(), rel=1e-3)


def test_official_nan_fallback_drops_the_rank_term_and_undoes_the_halving():
    s, t, mask = _batch(v=40)
    t[mask.nonzero()[0, 0], mask.nonzero()[0, 1]] = 0.0  # one uniform teacher row -> NaN correlation
    out = DistillLoss(objective="kl", ranking=RankingConfig(k=5, fidelity="official"))(s, t, mask)
    kl = DistillLoss(objective="kl")(s, t, mask)
    assert out.metrics["rank_fallback"] == 1.0
    assert out.loss_sum.item() == pytest.approx(kl.loss_sum.item(), rel=1e-6)
    paper = DistillLoss(objective="kl", ranking=RankingConfig(k=5))(s, t, mask)
    assert paper.metrics["rank_fallback"] == 0.0 and paper.metrics["rank_degenerate_rows"] == 1.0


def test_empty_mask_is_zero_and_still_backpropagates():
    s, t, mask = _batch()
    s.requires_grad_(True)
    out = DistillLoss(objective="kl", ranking=RankingConfig(k=5))(s, t, torch.zeros_like(mask))
    assert out.n_tokens == 0 and out.loss_sum.item() == 0.0
    out.loss_sum.backward()
    assert (s.grad == 0).all()


def test_no_gradient_needed_in_evaluation():
    s, t, mask = _batch()
    with torch.no_grad():
        out = DistillLoss(objective="kl", ranking=RankingConfig(k=5))(s, t, mask)
    assert not out.loss_sum.requires_grad and out.n_tokens == int(mask.sum())


def test_bad_inputs_fail_clearly():
    s, t, mask = _batch(v=20)
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(k=5))
    with pytest.raises(ValueError, match="vocabulary mismatch: student logits have 20 entries, teacher logits 21"):
        loss_fn(s, torch.randn(3, 9, 21), mask)
    with pytest.raises(ValueError, match="leading"):
        loss_fn(s, t[:, :5], mask)
    with pytest.raises(ValueError, match="mask shape"):
        loss_fn(s, t, mask[:, :4])
    with pytest.raises(ValueError, match="k=25 exceeds the vocabulary size 20"):
        DistillLoss(objective="kl", ranking=RankingConfig(k=25))(s, t, mask)
    with pytest.raises(ValueError, match="needs teacher logits"):
        loss_fn(s, None, mask)
    with pytest.raises(ValueError, match="needs labels"):
        DistillLoss(objective="ce")(s, None, mask)
    with pytest.raises(ValueError, match="loss needs an objective"):
        LossConfig(objective=None)
    with pytest.raises(ValueError, match="either loss.objective"):
        LossConfig(objective="kl", terms=[{"objective": "ce"}])
    with pytest.raises(ValueError, match="at most one ranking term"):
        LossConfig(terms=[{"objective": "kl"}, {"ranking": {}}, {"ranking": {"k": 3}}])
    with pytest.raises(ValueError, match="extra"):
        LossConfig(objective="kl", temprature=2.0)


def test_nan_logits_name_the_position():
    s, t, mask = _batch(v=20)
    b, l = mask.nonzero()[3].tolist()
    s[b, l, 7] = float("nan")
    with pytest.raises(ValueError, match=f"student logits contain NaN/Inf at flattened position {b * 9 + l}"):
        DistillLoss(objective="kl")(s, t, mask)
    s, t, mask = _batch(v=20)
    t[b, l, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher logits contain NaN"):
        DistillLoss(objective="tvd", ranking=RankingConfig(k=3))(s.requires_grad_(True), t, mask)
    # A rank-only loss reads <= 2k logits per row, computed after the chunks: a NaN is still named.
    for who in ("student", "teacher"):
        s, t, mask = _batch(v=20)
        (s if who == "student" else t)[b, l, 5] = float("nan")
        with pytest.raises(ValueError, match=f"{who} logits contain NaN/Inf at flattened position {b * 9 + l}"):
            DistillLoss(ranking=RankingConfig(k=3, mode="rank_only"), chunk_size=2)(s.requires_grad_(True), t, mask)


def test_ce_objective_through_the_loss_uses_shifted_labels():
    s, _, mask = _batch(v=20)
    labels = torch.randint(0, 20, mask.shape, generator=torch.Generator().manual_seed(1))
    out = DistillLoss(objective="ce")(s, None, mask, labels)
    expected = torch.nn.functional.cross_entropy(s[mask], labels[mask], reduction="sum")
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)


def test_second_backward_needs_retain_gradient():
    s, t, mask = _batch()
    s.requires_grad_(True)
    out = DistillLoss(objective="kl")(s, t, mask)
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_gradient=True"):
        out.loss_sum.backward()
    s.grad = None
    kept = DistillLoss(objective="kl", retain_gradient=True)(s, t, mask)
    kept.loss_sum.backward(retain_graph=True)
    first = s.grad.clone()
    kept.loss_sum.backward()
    assert torch.allclose(s.grad, 2 * first)


@pytest.mark.parametrize("scores", ["logits", "probs"])
def test_fused_ranking_gradient_with_temperature_and_low_precision(scores):
    s, t, mask = _batch()
    ranking = RankingConfig(k=5, scores=scores, backend="torch")
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        s1 = s.to(dtype).requires_grad_(True)
        out = DistillLoss(objective="rkl", ranking=ranking, temperature=2.0, chunk_size=7)(s1, t.to(dtype), mask)
        (g1,) = torch.autograd.grad(out.loss_sum, s1)
        s2 = s.to(dtype).float().requires_grad_(True)
        sel_s, sel_t = s2[mask] / 2.0, t.to(dtype).float()[mask] / 2.0
        ref = (get_objective("rkl").fn(sel_s, sel_t, None)
               + 2 * ranking_terms(sel_s, sel_t, k=5, scores=scores, backend="torch").loss).sum()
        (g2,) = torch.autograd.grad(ref, s2)
        assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
        assert g1.dtype == dtype and torch.allclose(g1.float(), g2, atol=tol)


@pytest.mark.parametrize("with_rank", [False, True])
def test_composed_terms_equal_their_parts_computed_separately(with_rank):
    """KL + 0.5 CE (+ 2 R): value and gradient equal the terms computed one by one and added."""
    s, t, mask = _batch(seed=3)
    labels = torch.randint(0, s.shape[-1], mask.shape, generator=torch.Generator().manual_seed(4))
    labels[0, 0] = -100  # an unknown next token contributes nothing to CE
    terms = [{"objective": "kl"}, {"objective": "ce", "weight": 0.5}]
    if with_rank:
        terms.append({"ranking": {"k": 5, "backend": "torch"}, "weight": 2.0})
    config = LossConfig(terms=terms)
    assert config.ranking.enabled == with_rank and config.ranking.rank_weight == 2.0
    s1 = s.clone().requires_grad_(True)
    out = DistillLoss(config, chunk_size=5)(s1, t, mask, labels=labels)
    (g1,) = torch.autograd.grad(out.loss_sum, s1)

    parts = []
    s2 = s.clone().requires_grad_(True)
    kl = DistillLoss(objective="kl")(s2, t, mask)
    ce = DistillLoss(objective="ce")(s2, None, mask, labels=labels)
    total = kl.loss_sum + 0.5 * ce.loss_sum
    if with_rank:
        rank_only = DistillLoss(objective="kl", ranking=RankingConfig(k=5, mode="rank_only", backend="torch"))
        total = total + 2.0 * rank_only(s2, t, mask).loss_sum / 2.0  # rank_only applies rank_weight=2 itself
        parts.append("rank")
    (g2,) = torch.autograd.grad(total, s2)
    assert out.loss_sum.item() == pytest.approx(total.item(), rel=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    # each term is logged on its own (sums over positions)
    assert out.metrics["base_kl"] == pytest.approx(kl.loss_sum.item(), rel=1e-5)
    assert out.metrics["base_ce"] == pytest.approx(ce.loss_sum.item(), rel=1e-5)


def test_what_a_loss_needs_comes_from_the_declarations():
    assert DistillLoss(objective="ce").counts_labelled_only and not DistillLoss(objective="ce").needs_teacher
    assert not DistillLoss(objective="kl").counts_labelled_only and DistillLoss(objective="kl").needs_teacher
    mixed = DistillLoss(LossConfig(terms=[{"objective": "kl"}, {"objective": "ce", "weight": 0.1}]))
    assert mixed.needs_teacher and mixed.needs_labels and not mixed.counts_labelled_only
    assert LossConfig(terms=[{"objective": "kl"}, {"objective": "ce", "weight": 0.5}]).label() == "KL+0.5CE"
