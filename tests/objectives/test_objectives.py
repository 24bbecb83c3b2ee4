"""Closed forms, limits and independent references for every registered base objective."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from rlkd.objectives import DistillLoss, get_objective, list_objectives, register_objective
from rlkd.objectives.registry import _REGISTRY

DIVERGENCES = ["kl", "rkl", "jsd", "tvd", "akl", "skew_kl", "skew_rkl"]
# What every divergence must satisfy (zero at equality, non-negative, finite-difference gradient,
# chunked = unchunked) is checked for every registered objective in test_divergence_properties.py.


def _pair(n=6, v=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * 2, torch.randn(n, v, generator=g, dtype=dtype) * 2


def _probs(logits):
    return torch.softmax(logits, -1).numpy()


def test_builtin_objectives_are_registered():
    assert set(DIVERGENCES + ["ce"]) <= set(list_objectives())


def test_kl_and_rkl_match_scipy_entropy():
    s, t = _pair()
    p, q = _probs(t), _probs(s)
    fkl = get_objective("kl").fn(s, t, None).numpy()
    rkl = get_objective("rkl").fn(s, t, None).numpy()
    np.testing.assert_allclose(fkl, [entropy(pi, qi) for pi, qi in zip(p, q)], rtol=1e-10)
    np.testing.assert_allclose(rkl, [entropy(qi, pi) for pi, qi in zip(p, q)], rtol=1e-10)


def test_symmetric_jsd_matches_scipy_jensenshannon():
    s, t = _pair()
    jsd = get_objective("jsd").fn(s, t, None, beta=0.5).numpy()
    expected = [jensenshannon(pi, qi) ** 2 for pi, qi in zip(_probs(t), _probs(s))]
    np.testing.assert_allclose(jsd, expected, rtol=1e-8)


def test_generalized_jsd_weights_the_teacher():
    s, t = _pair()
    beta = 0.3
    p, q = _probs(t), _probs(s)
    m = beta * p + (1 - beta) * q
    expected = [beta * entropy(pi, mi) + (1 - beta) * entropy(qi, mi) for pi, qi, mi in zip(p, q, m)]
    np.testing.assert_allclose(get_objective("jsd").fn(s, t, None, beta=beta).numpy(), expected, rtol=1e-9)


def test_jsd_limits_are_the_kls_up_to_scaling():
    s, t = _pair()
    jsd = get_objective("jsd").fn
    fkl, rkl = get_objective("kl").fn(s, t, None), get_objective("rkl").fn(s, t, None)
    def rel_err(beta, scale, limit):
        return ((jsd(s, t, None, beta=beta) / scale - limit).abs() / limit).max().item()

    # The scaled JSD converges to the KLs, with an error linear in the distance to the end point.
    for near_zero, limit in ((lambda e: e, fkl), (lambda e: 1 - e, rkl)):
        coarse, fine = rel_err(near_zero(1e-4), 1e-4, limit), rel_err(near_zero(1e-6), 1e-6, limit)
        assert fine < 1e-3 and fine < coarse / 50
    # At the end points the scaled limits are returned exactly (TRL's convention).
    assert torch.equal(jsd(s, t, None, beta=0.0), fkl)
    assert torch.equal(jsd(s, t, None, beta=1.0), rkl)


def test_tvd_matches_half_l1_and_is_bounded():
    s, t = _pair()
    tvd = get_objective("tvd").fn(s, t, None).numpy()
    np.testing.assert_allclose(tvd, 0.5 * np.abs(_probs(t) - _probs(s)).sum(-1), rtol=1e-10)
    assert (tvd >= 0).all() and (tvd <= 1).all()
    # Nearly disjoint supports approach the upper bound 1.
    far_s = torch.tensor([[30.0, 0, 0, 0]], dtype=torch.float64)
    far_t = torch.tensor([[0, 0, 0, 30.0]], dtype=torch.float64)
    assert get_objective("tvd").fn(far_s, far_t, None).item() == pytest.approx(1.0, abs=1e-10)


def test_skew_kls_match_numpy_formula():
    s, t = _pair()
    p, q = _probs(t), _probs(s)
    a = 0.1
    exp_f = [entropy(pi, a * pi + (1 - a) * qi) for pi, qi in zip(p, q)]
    exp_r = [entropy(qi, a * qi + (1 - a) * pi) for pi, qi in zip(p, q)]
    np.testing.assert_allclose(get_objective("skew_kl").fn(s, t, None).numpy(), exp_f, rtol=1e-9)
    np.testing.assert_allclose(get_objective("skew_rkl").fn(s, t, None).numpy(), exp_r, rtol=1e-9)
    kl = get_objective("kl").fn(s, t, None)
    assert torch.allclose(get_objective("skew_kl").fn(s, t, None, alpha=0.0), kl)


def _akl_slow(p, q, mu=0.5):
    """Row-by-row reading of the AKL paper: head = top teacher tokens up to cumulative mass mu."""
    out = []
    for pi, qi in zip(p, q):
        order = sorted(range(len(pi)), key=lambda j: -pi[j])
        head, mass = set(), 0.0
        for rank, j in enumerate(order):
            mass += pi[j]
            if rank == 0 or mass <= mu:
                head.add(j)
        g_head = sum(abs(pi[j] - qi[j]) for j in head)
        g_tail = sum(abs(pi[j] - qi[j]) for j in range(len(pi)) if j not in head)
        fkl = sum(pi[j] * math.log(pi[j] / qi[j]) for j in range(len(pi)))
        rkl = sum(qi[j] * math.log(qi[j] / pi[j]) for j in range(len(pi)))
        out.append((g_head * fkl + g_tail * rkl) / (g_head + g_tail))
    return out


@pytest.mark.parametrize("mu", [0.5, 0.2, 0.9])
def test_akl_matches_slow_reference(mu):
    s, t = _pair(v=30)
    t[0, 3] = 9.0  # one row whose top token alone holds more than mu: the head is that token only
    got = get_objective("akl").fn(s, t, None, mu=mu).numpy()
    np.testing.assert_allclose(got, _akl_slow(_probs(t), _probs(s), mu), rtol=1e-9)


def test_akl_weights_carry_no_gradient():
    s, t = _pair(v=30)
    s.requires_grad_(True)
    akl = get_objective("akl").fn(s, t, None).sum()
    (grad,) = torch.autograd.grad(akl, s)
    from rlkd.objectives.akl import akl_weights
    from rlkd.objectives.common import log_probs

    w_head, w_tail = akl_weights(log_probs(t), log_probs(s.detach()), 0.5)
    s2 = s.detach().clone().requires_grad_(True)
    fixed = (w_head * get_objective("kl").fn(s2, t, None) + w_tail * get_objective("rkl").fn(s2, t, None)).sum()
    (grad_fixed,) = torch.autograd.grad(fixed, s2)
    assert torch.allclose(grad, grad_fixed, atol=1e-12)


def test_ce_matches_torch_cross_entropy_and_ignores_minus_100():
    s, _ = _pair()
    labels = torch.tensor([1, 5, -100, 7, 0, -100])
    got = get_objective("ce").fn(s, None, labels)
    expected = torch.nn.functional.cross_entropy(s, labels, reduction="none", ignore_index=-100)
    assert torch.allclose(got, expected)


def test_temperature_scales_logits_before_the_objective():
    s, t = _pair(dtype=torch.float32)
    out = DistillLoss(objective="kl", temperature=2.0)(s, t)
    direct = get_objective("kl").fn(s / 2.0, t / 2.0, None).sum()
    assert out.loss_sum.item() == pytest.approx(direct.item(), rel=1e-6)


def test_low_precision_inputs_are_computed_in_fp32():
    s, t = _pair(dtype=torch.float32)
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = DistillLoss(objective="kl")(s16, t16)
    assert out.per_token.dtype == torch.float32
    reference = get_objective("kl").fn(s16.float(), t16.float(), None).sum()
    assert out.loss_sum.item() == pytest.approx(reference.item(), rel=1e-6)


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(KeyError, match="registered objectives: .*akl.*kl"):
        get_objective("kullback")
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        DistillLoss(objective="nope")


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="beta.*outside"):
        DistillLoss(objective="jsd", params={"beta": 1.5})
    with pytest.raises(ValueError, match="unknown parameter.*'gamma'.*allowed: beta"):
        DistillLoss(objective="jsd", params={"gamma": 0.1})
    with pytest.raises(ValueError, match="params.beta"):
        DistillLoss(objective="jsd", params={"beta": "half"})
    with pytest.raises(TypeError, match="must be a number"):
        get_objective("jsd").resolve_params({"beta": "half"})
    assert DistillLoss(objective="jsd", params={"beta": 0.1}).config.params == {"beta": 0.1}


def test_a_new_objective_is_one_registration():
    @register_objective("test_l2_probs", bounds={"scale": (0.0, 10.0)})
    def l2_probs(student_logits, teacher_logits, labels=None, *, scale=1.0):
        """Squared distance of the probability vectors."""
        return scale * (torch.softmax(student_logits, -1) - torch.softmax(teacher_logits, -1)).pow(2).sum(-1)

    try:
        assert "test_l2_probs" in list_objectives()
        s, t = _pair(dtype=torch.float32)
        out = DistillLoss(objective="test_l2_probs", params={"scale": 3.0})(s, t)
        expected = 3.0 * (torch.softmax(s, -1) - torch.softmax(t, -1)).pow(2).sum()
        assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test_l2_probs")(l2_probs)
    finally:
        _REGISTRY.pop("test_l2_probs", None)


def test_objectives_cli_lists_every_objective(capsys):
    from rlkd.cli import main

    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    for name in list_objectives():
        assert name in out
    assert "beta=0.5 in [0, 1]" in out


def test_akl_head_search_agrees_with_a_full_sort_on_peaked_and_flat_rows():
    from rlkd.objectives import akl

    g = torch.Generator().manual_seed(3)
    peaked = torch.randn(8, 5000, generator=g, dtype=torch.float64)
    peaked[:, :3] += 12.0  # the head ends within the first candidates
    flat = torch.randn(8, 5000, generator=g, dtype=torch.float64) * 0.1  # it does not: full-sort fallback
    s = torch.randn(16, 5000, generator=g, dtype=torch.float64)
    t = torch.cat([peaked, flat])
    got = get_objective("akl").fn(s, t, None).numpy()
    np.testing.assert_allclose(got, _akl_slow(_probs(t)[:, :], _probs(s)), rtol=1e-9)
    assert akl.HEAD_CANDIDATES < 5000
