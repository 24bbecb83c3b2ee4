"""loss.compile: compiled per-chunk maths against eager, the padding that keeps one shape, the
eager fallback, and the setting's resolution (auto: CUDA only, so the CPU default stays eager)."""

import pytest
import torch

import rlkd.objectives.compiled as compiled_mod
from rlkd.objectives import DistillLoss, LossConfig, RankingConfig, list_objectives
from rlkd.objectives.compiled import compile_wanted
from rlkd.objectives.fused import HeadInput, fused_distill_loss
from rlkd.objectives.loss import ChunkWeights

from conftest import fused_inputs

RANKINGS = {"none": RankingConfig(enabled=False), "R": RankingConfig(k=4, backend="torch")}


@pytest.fixture
def fresh_compile_state():
    """Each test starts with no compiled function cached and none marked as failed, and leaves none."""
    compiled_mod.compiled.cache_clear()
    compiled_mod._failed.clear()
    yield
    compiled_mod.compiled.cache_clear()
    compiled_mod._failed.clear()


def _run(loss_fn, student, teacher, mask, labels):
    """(per-token losses, loss sum, gradient wrt the student logits) of one forward + backward."""
    leaf = student.clone().requires_grad_(True)
    out = loss_fn(leaf, teacher, mask, labels)
    out.loss_sum.backward()
    return out.per_token.detach(), out.loss_sum.detach(), leaf.grad


def _logits(seed=0, b=2, l=11, v=48):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(b, l, v, generator=g) * 2, torch.randn(b, l, v, generator=g) * 2
    mask = torch.rand(b, l, generator=g) > 0.2
    labels = torch.randint(0, v, (b, l), generator=g)
    return student, teacher, mask, labels


# ---- the setting ------------------------------------------------------------------------------------------
def test_auto_compiles_on_cuda_only():
    assert compile_wanted("auto", "cuda") and not compile_wanted("auto", "cpu")
    assert compile_wanted("true", "cpu") and compile_wanted("true", "cuda")
    assert not compile_wanted("false", "cuda")


def test_yaml_booleans_are_accepted_and_other_words_refused():
    assert LossConfig(compile=True).compile == "true" and LossConfig(compile=False).compile == "false"
    assert LossConfig().compile == "auto"
    with pytest.raises(ValueError):
        LossConfig(compile="yes")


def test_default_cpu_loss_never_calls_torch_compile(monkeypatch, fresh_compile_state):
    """The CPU default (auto) must stay on the eager code that produced the committed tables."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called on the CPU default path")

    monkeypatch.setattr(torch, "compile", refuse)
    student, teacher, mask, labels = _logits()
    _run(DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=4), student, teacher, mask, labels)


# ---- padding and fallback, with a stand-in for torch.compile (no compile cost) -------------------------------
def test_every_chunk_reaches_the_compiled_objective_with_one_shape(monkeypatch, fresh_compile_state):
    """19 supervised rows in chunks of 4: the last chunk (3 rows) is padded to 4, so a real compile
    would happen once; the padded rows must not leak into the values or the gradient (same as eager,
    exactly: the stand-in runs the same row-wise operations)."""
    shapes = []

    def recording_compile(fn, dynamic=False):
        def wrapper(student, *args, **kwargs):
            shapes.append((fn.__name__, tuple(student.shape)))
            return fn(student, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "compile", recording_compile)
    student, teacher, mask, labels = _logits(seed=1)
    mask[:] = False
    mask.view(-1)[:19] = True
    eager = _run(DistillLoss(objective="kl", chunk_size=4), student, teacher, mask, labels)
    stand_in = _run(DistillLoss(objective="kl", chunk_size=4, compile="true"), student, teacher, mask, labels)
    assert {shape for name, shape in shapes if name == "forward_kl"} == {(4, 48)}
    assert len(shapes) == 5  # ceil(19 / 4) chunks
    for a, b in zip(stand_in, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_failing_compile_falls_back_to_eager_with_one_line(monkeypatch, capsys, fresh_compile_state):
    calls = []

    def broken_compile(fn, dynamic=False):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            raise RuntimeError("no C++ compiler found\nsecond line of the report")
        return wrapper

    monkeypatch.setattr(torch, "compile", broken_compile)
    student, teacher, mask, labels = _logits(seed=2)
    eager = _run(DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=4), student, teacher, mask, labels)
    loss_fn = DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=4, compile="true")
    fallback = _run(loss_fn, student, teacher, mask, labels)
    for a, b in zip(fallback, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "loss.compile" in line]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0] and "second line" not in lines[0]
    tried = len(calls)
    _run(loss_fn, student, teacher, mask, labels)  # given up: not tried again, nothing printed again
    assert len(calls) == tried and "loss.compile" not in capsys.readouterr().err


def test_an_error_of_the_inputs_is_raised_not_blamed_on_the_compiler(monkeypatch, capsys, fresh_compile_state):
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=False: fn)
    student, teacher, mask, labels = _logits()
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        DistillLoss(objective="kl", compile="true")(student, teacher[..., :-1], mask, labels)
    with pytest.raises(ValueError, match="needs labels"):
        DistillLoss(objective="ce", chunk_size=4, compile="true").chunk_loss_and_grad(
            student[0], None, None, None, ChunkWeights(rank=0.0, base=1.0))
    assert "loss.compile" not in capsys.readouterr().err and not compiled_mod._failed


# ---- the real torch.compile (CPU inductor: tens of seconds of compiling per objective) ----------------------
@pytest.mark.slow
@pytest.mark.parametrize("ranking", list(RANKINGS))
@pytest.mark.parametrize("objective", list_objectives())
def test_compiled_equals_eager_for_every_objective(objective, ranking):
    """Forward per-token losses and the gradient, logits path, 22 rows with a partial last chunk."""
    student, teacher, mask, labels = _logits(seed=3)
    mask[:] = True
    eager = _run(DistillLoss(objective=objective, ranking=RANKINGS[ranking], chunk_size=8),
                 student, teacher, mask, labels)
    comp = _run(DistillLoss(objective=objective, ranking=RANKINGS[ranking], chunk_size=8, compile="true"),
                student, teacher, mask, labels)
    assert not compiled_mod._failed, "torch.compile fell back to eager: nothing compiled was compared"
    for what, a, b in zip(("per-token loss", "loss sum", "gradient"), comp, eager):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
def test_compiled_fused_path_equals_eager():
    s_hidden, s_weight, t_hidden, t_weight, mask, labels = fused_inputs(seed=6)
    results = []
    for setting in ("false", "true"):
        h, w = s_hidden.clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
        loss_fn = DistillLoss(objective="jsd", ranking=RANKINGS["R"], chunk_size=5, compile=setting)
        out = fused_distill_loss(loss_fn, HeadInput(h, w), HeadInput(t_hidden, t_weight), mask, labels)
        results.append((out.loss_sum.detach(), *torch.autograd.grad(out.loss_sum, (h, w))))
    assert not compiled_mod._failed
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
