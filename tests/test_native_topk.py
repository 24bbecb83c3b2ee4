"""The compiled top-k of the ranking term against torch.topk and against the tensor-op path."""

import shutil

import pytest
import torch

from rlkd.objectives import DistillLoss, RankingConfig, native
from rlkd.objectives.ranking import overlap_count

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on this machine: the loss uses its tensor-op top-k")


def _pair(s, t, k):
    found = native.topk_pair(s, t, k)
    assert found is not None, "the compiled top-k did not build or did not apply"
    return found


def _sets(ids):
    return [set(row) for row in ids.tolist()]


@pytest.mark.parametrize("vocab", [17, 255, 256, 257, 1000, 32000])
@pytest.mark.parametrize("k", [1, 5, 15])
def test_ids_union_overlap_and_values_match_torch(vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    s, t = torch.randn(6, vocab, generator=g) * 2, torch.randn(6, vocab, generator=g) * 2
    t[:3, :vocab] = s[:3] + 0.01 * torch.randn(3, vocab, generator=g)  # rows whose top-k sets overlap
    ids, valid, overlap, s_at, t_at = _pair(s, t, k)
    t_ref, s_ref = t.topk(k).indices, s.topk(k).indices
    assert _sets(ids[:, :k]) == _sets(t_ref) and _sets(ids[:, k:]) == _sets(s_ref)
    assert torch.equal(overlap, overlap_count(t_ref, s_ref))
    # valid: every teacher id, and a student id only where it is not also a teacher id
    repeated = (ids[:, k:].unsqueeze(-1) == ids[:, :k].unsqueeze(-2)).any(-1)
    assert valid[:, :k].all() and torch.equal(valid[:, k:], ~repeated)
    assert torch.equal(s_at, s.gather(-1, ids)) and torch.equal(t_at, t.gather(-1, ids))


def test_ties_give_a_valid_top_k_and_strided_rows_are_read_in_place():
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 4, (5, 3000), generator=g).float()  # many ties
    s, t = wide[:, :2900], wide.flip(0)[:, :2900].contiguous()  # s: row stride 3000, unit column stride
    ids, valid, _, s_at, t_at = _pair(s, t, 5)
    for x, part in ((t, ids[:, :5]), (s, ids[:, 5:])):
        assert torch.equal(x.gather(-1, part).sort(-1).values, x.topk(5).values.sort(-1).values)
        assert all(len(set(row)) == 5 for row in part.tolist())


def test_nan_ranks_first_and_all_minus_inf_rows_keep_valid_ids():
    s = torch.full((3, 600), float("-inf"))
    t = torch.randn(3, 600, generator=torch.Generator().manual_seed(1))
    t[1, 417] = float("nan")
    ids, _, _, _, t_at = _pair(s, t, 4)
    assert 417 in ids[1, :4].tolist() and torch.isnan(t_at[1]).any()
    assert all(len(set(row)) == 4 and all(0 <= i < 600 for i in row) for row in ids[:, 4:].tolist())


def test_what_the_kernel_does_not_take_falls_back():
    x = torch.randn(4, 300)
    assert native.topk_pair(x.double(), x.double(), 3) is None
    assert native.topk_pair(x.bfloat16(), x.bfloat16(), 3) is None
    assert native.topk_pair(x.t().contiguous().t(), x, 3) is None  # column stride != 1
    with native.disabled():
        assert native.topk_pair(x, x, 3) is None
    assert native.topk_pair(x, x, 3) is not None
    buffers = [torch.empty(4, 6, dtype=torch.int64), torch.empty(4, 6, dtype=torch.bool),
               torch.empty(4, dtype=torch.int64), torch.empty(4, 6), torch.empty(4, 6)]
    assert native.topk_pair(x, x, 3, out=buffers)[3].data_ptr() == buffers[3].data_ptr()  # written in place
    buffers[4] = torch.empty(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected \\(4, 6\\) torch.float32"):
        native.topk_pair(x, x, 3, out=buffers)


@pytest.mark.parametrize("settings", [
    dict(objective="kl"),
    dict(objective="tvd", temperature=2.0),
    dict(objective="akl", ranking_mode="dynamic"),
    dict(objective="jsd", rank_only=True),
])
def test_the_loss_agrees_with_its_tensor_op_path(settings):
    settings = dict(settings)
    mode = settings.pop("ranking_mode", "fixed")
    if settings.pop("rank_only", False):
        mode = "rank_only"
    loss = DistillLoss(**settings, ranking=RankingConfig(k=5, mode=mode, backend="torch"), chunk_size=7)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 20, 700, generator=g) * 2, torch.randn(2, 20, 700, generator=g) * 2
    mask = torch.rand(2, 20, generator=g) > 0.3

    def run():
        leaf = s.clone().requires_grad_(True)
        out = loss(leaf, t, mask)
        out.loss_sum.backward()
        return out.per_token.detach(), leaf.grad, out.metrics

    fast_values, fast_grad, fast_metrics = run()
    with native.disabled():
        ref_values, ref_grad, ref_metrics = run()
    torch.testing.assert_close(fast_values, ref_values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert fast_metrics["topk_overlap"] == pytest.approx(ref_metrics["topk_overlap"])


def test_bf16_logits_use_the_kernel_on_their_fp32_copy():
    g = torch.Generator().manual_seed(4)
    # distinct values per row (bf16 rounding makes ties common, and ties may resolve either way)
    values = torch.linspace(-8, 8, 20000).bfloat16().unique()
    s, t = (torch.stack([values[torch.randperm(values.numel(), generator=g)[:600]] for _ in range(30)])
            for _ in range(2))
    loss = DistillLoss(objective="kl", ranking=RankingConfig(k=5, backend="torch"))
    fast = loss(s, t).per_token
    with native.disabled():
        ref = loss(s, t).per_token
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_the_build_is_cached_by_content(tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_rows_split_over_threads_give_the_same_answer():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(64, 3000, generator=g), torch.randn(64, 3000, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _pair(s, t, 5)
        torch.set_num_threads(3)  # 64 rows over 3 threads: unequal slices
        three = _pair(s, t, 5)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, three))
