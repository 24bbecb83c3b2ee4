"""Every registered teacher-based objective (built-ins and installed plug-ins) is held to what any
divergence must satisfy, with references that do not come from the objective itself:

* zero at equality: D(p, p) = 0;
* non-negative on random inputs (peaked, flat and ordinary rows);
* its gradient through ``DistillLoss`` (the chunked path that training runs) agrees with finite
  differences (``torch.autograd.gradcheck`` in float64);
* chunked = unchunked: the loss and its gradient do not depend on the chunk size.

A new objective is tested here with no edit of this file; a broken one is caught (last tests).
"""

from __future__ import annotations

import pytest
import torch

from rlkd.objectives import DistillLoss, get_objective, list_objectives
from rlkd.objectives.registry import _REGISTRY, ObjectiveSpec

REGISTERED = [n for n in list_objectives() if get_objective(n).needs_teacher and not get_objective(n).needs_labels]
ROWS, VOCAB = 6, 11
# Objectives whose gradient is by design not the derivative of their value, with the reason and the
# test that checks the gradient they do have. Finite differences are skipped for these alone.
SURROGATE_GRADIENT = {
    "akl": "its head/tail weights are held fixed in the gradient, as in the AKL paper's code "
           "(test_objectives.py::test_akl_weights_carry_no_gradient checks that gradient)",
}


def _pairs(seed: int = 0):
    """(student, teacher) float64 logits: ordinary, peaked (scale 8) and nearly flat (scale 0.05) rows."""
    g = torch.Generator().manual_seed(seed)
    for scale in (2.0, 8.0, 0.05):
        yield (torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64) * scale,
               torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64) * scale)


def divergence_property_failures(name: str) -> list[str]:
    """The properties ``name`` breaks, one line each (empty: it behaves as a divergence)."""
    fn = get_objective(name).fn
    failures = []
    for student, teacher in _pairs():
        at_equality = fn(student, student.clone(), None)
        if at_equality.shape != (ROWS,) or not torch.allclose(at_equality, torch.zeros(ROWS, dtype=torch.float64),
                                                              atol=1e-9):
            failures.append(f"zero at equality: D(p, p) = {at_equality.tolist()}")
            break
    for seed in range(3):
        for student, teacher in _pairs(seed):
            values = fn(student, teacher, None)
            if (values < -1e-12).any():
                failures.append(f"non-negative: D(p, q) = {values.min().item():.3g} < 0")
                break
        else:
            continue
        break

    if name not in SURROGATE_GRADIENT:
        student, teacher = next(_pairs(seed=5))
        student, teacher = student[:4].view(2, 2, VOCAB), teacher[:4].view(2, 2, VOCAB)
        chunked = DistillLoss(objective=name, chunk_size=1, retain_gradient=True)
        try:
            torch.autograd.gradcheck(lambda s: chunked(s, teacher).loss_sum, (student.clone().requires_grad_(True),),
                                     eps=1e-6, atol=1e-5, rtol=1e-4)
        except RuntimeError as exc:  # gradcheck's "Jacobian mismatch"
            failures.append(f"gradient by finite differences: {str(exc).splitlines()[0]}")

    student, teacher = next(_pairs(seed=7))
    student, teacher = student.view(2, 3, VOCAB), teacher.view(2, 3, VOCAB)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    whole = None
    for chunk in (None, 1, 2, 4):
        s = student.clone().requires_grad_(True)
        out = DistillLoss(objective=name, chunk_size=chunk)(s, teacher, mask)
        (grad,) = torch.autograd.grad(out.loss_sum, s)
        if whole is None:
            whole = out.per_token.detach(), grad
        elif not (torch.allclose(out.per_token.detach(), whole[0], rtol=1e-10, atol=1e-12)
                  and torch.allclose(grad, whole[1], rtol=1e-10, atol=1e-12)):
            failures.append(f"chunked = unchunked: chunk_size={chunk} changes the loss or its gradient")
            break
    return failures


def test_every_registered_teacher_objective_is_checked():
    assert {"kl", "rkl", "jsd", "tvd", "akl", "skew_kl", "skew_rkl"} <= set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_objective_behaves_as_a_divergence(name):
    assert divergence_property_failures(name) == []


# ---- the checker catches broken objectives ------------------------------------------------------------

def _kl(student, teacher, labels=None):
    p = torch.log_softmax(teacher, -1)
    return (p.exp() * (p - torch.log_softmax(student, -1))).sum(-1)


class _HalfGradient(torch.autograd.Function):
    """The identity forward, half the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / 2


BROKEN = {
    "negative": (lambda s, t, labels=None: -_kl(s, t), "non-negative"),
    "offset": (lambda s, t, labels=None: _kl(s, t) + 0.1, "zero at equality"),
    "wrong_gradient": (lambda s, t, labels=None: _kl(_HalfGradient.apply(s), t), "gradient by finite differences"),
    # scales each row by how many rows it is computed with: a batch statistic leaking into the loss
    "chunk_dependent": (lambda s, t, labels=None: _kl(s, t) * s.shape[0], "chunked = unchunked"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_objective_is_caught(kind, monkeypatch):
    fn, broken_property = BROKEN[kind]
    name = f"test_broken_{kind}"
    monkeypatch.setitem(_REGISTRY, name, ObjectiveSpec(name, fn, {}))
    failures = divergence_property_failures(name)
    assert [f.split(":")[0] for f in failures] == [broken_property], failures


def test_the_reference_kl_passes_the_checker(monkeypatch):
    """The planted objectives' undamaged form passes, so each failure above is its damage alone."""
    monkeypatch.setitem(_REGISTRY, "test_plain_kl", ObjectiveSpec("test_plain_kl", _kl, {}))
    assert divergence_property_failures("test_plain_kl") == []
