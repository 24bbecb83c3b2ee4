"""The fused hidden-state loss against the logits path: values, gradients, metrics, bad input."""

import pytest
import torch

from rlkd.objectives import DistillLoss, RankingConfig, list_objectives
from rlkd.objectives.fused import HeadInput, fused_distill_loss

from conftest import FUSED_H, FUSED_V, RANKINGS, assert_same_outputs, fused_and_logits_paths, fused_inputs

H, V = FUSED_H, FUSED_V


@pytest.mark.parametrize("ranking", list(RANKINGS))
@pytest.mark.parametrize("objective", list_objectives())
def test_fused_equals_logits_path_for_every_objective(objective, ranking):
    loss_fn = DistillLoss(objective=objective, ranking=RANKINGS[ranking], chunk_size=5)
    assert_same_outputs(*fused_and_logits_paths(loss_fn, *fused_inputs()))


def test_rank_only_pearson_probs_and_temperature():
    for ranking, temperature in ((RankingConfig(k=4, mode="rank_only", backend="torch"), 1.0),
                                 (RankingConfig(k=3, correlation="pearson", scores="probs", backend="torch"), 2.0)):
        loss_fn = DistillLoss(objective="kl", ranking=ranking, temperature=temperature, chunk_size=4)
        assert_same_outputs(*fused_and_logits_paths(loss_fn, *fused_inputs(seed=3)))


def test_official_fallback_is_taken_on_the_fused_path_too():
    """A row whose teacher logits are all equal has no ranking spread: the released code's NaN
    makes the whole micro-batch fall back to the base loss; both paths must see it."""
    s_hidden, s_weight, t_hidden, t_weight, mask, labels = fused_inputs(seed=5)
    t_hidden[0, 0] = 0.0
    mask[0, 0] = True
    loss_fn = DistillLoss(objective="kl", ranking=RANKINGS["R_official"], chunk_size=4)
    fused, ref = fused_and_logits_paths(loss_fn, s_hidden, s_weight, t_hidden, t_weight, mask, labels)
    assert ref[0].metrics["rank_fallback"] == 1.0
    assert_same_outputs(fused, ref)


def test_padded_vocabularies_are_cut_to_the_shared_prefix():
    """Teacher head with 8 padding rows; the student's head rows past the shared size get no gradient."""
    s_hidden, s_weight, t_hidden, t_weight, mask, labels = fused_inputs(v=V + 3, t_v=V + 8, seed=1)
    loss_fn = DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=7)
    fused, ref = fused_and_logits_paths(loss_fn, s_hidden, s_weight, t_hidden, t_weight, mask, labels.clamp(max=V - 1), vocab=V)
    assert_same_outputs(fused, ref)
    assert torch.count_nonzero(fused[1][1][V:]) == 0


def test_teacher_given_as_cached_logits():
    loss_fn = DistillLoss(objective="akl", ranking=RANKINGS["R"], chunk_size=6)
    assert_same_outputs(*fused_and_logits_paths(loss_fn, *fused_inputs(seed=2), teacher_as_logits=True))


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunk_size_does_not_change_the_result(chunk):
    loss_fn = DistillLoss(objective="kl", ranking=RANKINGS["R"], chunk_size=chunk)
    assert_same_outputs(*fused_and_logits_paths(loss_fn, *fused_inputs(seed=4)))


def test_bf16_agrees_with_the_logits_path_within_bf16_rounding():
    """bf16 inputs: both paths compute logits in bf16 and the loss in fp32; the fused path sums the
    weight gradient over chunks in fp32. Tolerance: a few bf16 ulps (2^-8 relative) of the values."""
    loss_fn = DistillLoss(objective="kl", ranking=RANKINGS["R"], chunk_size=5)
    fused, ref = fused_and_logits_paths(loss_fn, *fused_inputs(seed=6, dtype=torch.bfloat16))
    torch.testing.assert_close(fused[0].loss_sum, ref[0].loss_sum.to(fused[0].loss_sum.dtype), rtol=2e-2, atol=2e-2)
    for a, b in zip(fused[1], ref[1]):
        assert a.dtype == b.dtype == torch.bfloat16
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 3e-2 * scale


def test_no_supervised_position_still_reaches_bothfused_inputs():
    s_hidden, s_weight, t_hidden, t_weight, _, labels = fused_inputs()
    h, w = s_hidden.clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
    out = fused_distill_loss(DistillLoss(objective="kl"), HeadInput(h, w), HeadInput(t_hidden, t_weight),
                             torch.zeros(s_hidden.shape[:-1], dtype=torch.bool))
    out.loss_sum.backward()
    assert out.n_tokens == 0 and h.grad is not None and w.grad is not None
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_a_scaled_backward_scales_both_gradients():
    """train_step backpropagates loss_sum * (world * accum / global count): the scalar must reach both."""
    loss_fn = DistillLoss(objective="rkl", ranking=RANKINGS["R"], chunk_size=5)
    s_hidden, s_weight, t_hidden, t_weight, mask, labels = fused_inputs(seed=7)
    grads = []
    for scale in (1.0, 0.25):
        h, w = s_hidden.clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
        out = fused_distill_loss(loss_fn, HeadInput(h, w), HeadInput(t_hidden, t_weight), mask)
        (out.loss_sum * scale).backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a * 0.25, b)


def test_bad_input_names_what_is_wrong():
    s_hidden, s_weight, t_hidden, t_weight, mask, labels = fused_inputs()
    kl = DistillLoss(objective="kl")
    with pytest.raises(ValueError, match="needs the teacher"):
        fused_distill_loss(kl, HeadInput(s_hidden, s_weight), None, mask)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fused_distill_loss(kl, HeadInput(s_hidden, s_weight), HeadInput(t_hidden, t_weight[:-2]), mask)
    with pytest.raises(ValueError, match="does not match hidden size"):
        fused_distill_loss(kl, HeadInput(s_hidden, s_weight[:, :-1]), HeadInput(t_hidden, t_weight), mask)
    with pytest.raises(ValueError, match="leading shape"):
        fused_distill_loss(kl, HeadInput(s_hidden, s_weight), HeadInput(t_hidden[:, :-1], t_weight), mask)
    with pytest.raises(ValueError, match="needs labels"):
        fused_distill_loss(DistillLoss(objective="ce"), HeadInput(s_hidden, s_weight), None, mask)
    with pytest.raises(ValueError, match="ranking.k"):
        fused_distill_loss(DistillLoss(objective="kl", ranking=RankingConfig(k=V + 1)), HeadInput(s_hidden, s_weight),
                           HeadInput(t_hidden, t_weight), mask)


@pytest.mark.parametrize("chunks_per_block", [1, 2, 3])
def test_logit_blocks_of_any_size_give_the_same_result(monkeypatch, chunks_per_block):
    """Logits and the head/hidden gradients are computed one block of chunks at a time."""
    import rlkd.objectives.fused as fused

    monkeypatch.setattr(fused, "HEAD_BLOCK_ELEMENTS", V * 4 * chunks_per_block)
    loss_fn = DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=4)
    assert_same_outputs(*fused_and_logits_paths(loss_fn, *fused_inputs(b=4, l=13, seed=8)))


def test_a_block_budget_below_one_chunk_is_obeyed():
    """loss.fused_block_mib of 3 rows of logits with chunks of 8 rows: blocks (and chunks) of 3 rows, never
    the 8 rows one chunk would take; the result is the logits path's."""
    from rlkd.objectives.fused import fused_block_rows

    assert fused_block_rows(V, 4, "cpu", setting_mib=3 * V * 4 / 2**20, chunk=8) == (3, 3)
    assert fused_block_rows(128256, 4, "cpu", setting_mib=1.0) == (2, 2)  # 1 MiB = 2 rows at V=128256
    assert fused_block_rows(128256, 4, "cpu", setting_mib=None) == (128, 8)  # the CPU default is unchanged
    loss_fn = DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=8, fused_block_mib=3 * V * 4 / 2**20)
    assert_same_outputs(*fused_and_logits_paths(loss_fn, *fused_inputs(seed=9)))


def test_composed_terms_with_ranking():
    """A weighted list of terms (KL + 0.5 CE + 2 R) on both paths."""
    from rlkd.objectives import LossConfig

    config = LossConfig(terms=[{"objective": "kl"}, {"objective": "ce", "weight": 0.5},
                               {"ranking": {"k": 4, "backend": "torch"}, "weight": 2.0}], chunk_size=5)
    assert_same_outputs(*fused_and_logits_paths(DistillLoss(config), *fused_inputs(seed=9)))
