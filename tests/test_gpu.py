"""CUDA checks (run by scripts/gpu_check.sh with DS_ACCELERATOR=cuda): fused vs logits path on the
GPU, and a ZeRO-3 bf16 training run over NCCL. Skipped where there is no CUDA device."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlkd.objectives import DistillLoss, list_objectives
from conftest import RANKINGS, assert_same_outputs, fused_and_logits_paths, fused_inputs

# rlkd's own device decision (rlkd.device), not torch alone: with DS_ACCELERATOR=cpu exported
# (tests/conftest.py's default) rlkd and DeepSpeed run on the CPU even where a GPU is present.
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") != "cuda",
                                 reason="needs a CUDA device and DS_ACCELERATOR=cuda (scripts/gpu_check.sh sets it)")]


def _cuda(tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("ranking", list(RANKINGS))
@pytest.mark.parametrize("objective", list_objectives())
def test_fused_equals_logits_path_on_cuda_fp32(objective, ranking):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 matmuls
    loss_fn = DistillLoss(objective=objective, ranking=RANKINGS[ranking], chunk_size=5)
    assert_same_outputs(*fused_and_logits_paths(loss_fn, *_cuda(fused_inputs(b=4, l=33, h=64, v=512, t_h=96))))


@pytest.mark.parametrize("objective", list_objectives())
def test_fused_close_to_logits_path_on_cuda_bf16(objective):
    """bf16 logits on both paths, fp32 loss maths; tolerance: a few bf16 ulps of the largest gradient."""
    loss_fn = DistillLoss(objective=objective, ranking=RANKINGS["R"], chunk_size=16)
    inputs = _cuda(fused_inputs(b=4, l=33, h=64, v=512, t_h=96, dtype=torch.bfloat16))
    (out, grads), (ref, ref_grads) = fused_and_logits_paths(loss_fn, *inputs)
    torch.testing.assert_close(out.loss_sum.float(), ref.loss_sum.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, ref_grads):
        assert (a.float() - b.float()).abs().max() <= 3e-2 * b.float().abs().max()


def test_compiled_equals_eager_on_cuda_for_every_objective():
    """loss.compile on CUDA (auto compiles there) against eager: one composed loss of every built-in
    objective plus the ranking term, so each objective compiles once (Triton, a minute in all), on both
    paths; fp32 values and gradients to fp32 rounding."""
    import rlkd.objectives.compiled as compiled_mod

    torch.backends.cuda.matmul.allow_tf32 = False
    terms = [{"objective": name, "weight": 1.0 / (i + 1)} for i, name in enumerate(list_objectives())]
    inputs = _cuda(fused_inputs(b=4, l=33, h=64, v=512, t_h=96))
    results = {}
    for setting in ("false", "true"):
        loss_fn = DistillLoss({"terms": terms, "ranking": {"enabled": True, "k": 4, "backend": "torch"},
                               "chunk_size": 16, "compile": setting})
        (fused, fused_grads), (ref, ref_grads) = fused_and_logits_paths(loss_fn, *inputs)
        results[setting] = [fused.loss_sum, fused.per_token, *fused_grads, ref.loss_sum, ref.per_token, *ref_grads]
    assert not compiled_mod._failed, "torch.compile fell back to eager on CUDA"
    for a, b in zip(results["true"], results["false"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-5)


def test_zero3_bf16_training_over_nccl_fused_matches_logits(run_config, tmp_path):
    from safetensors.torch import load_file

    from rlkd.engine.train import run_training

    run_config["models"] = dict(run_config["models"], dtype="bfloat16")
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    runs = {}
    for fused in (False, True):
        cfg = dict(run_config, output_dir=str(tmp_path / f"fused_{fused}"),
                   loss=dict(run_config["loss"], fused_lm_head=fused))
        runs[fused] = run_training(cfg)
        manifest = json.loads(runs[fused].manifest_path.read_text())
        assert manifest["deepspeed_configs"]["student"]["bf16"]["enabled"] is True
    a, b = (load_file(str(runs[f].export_dir / "model.safetensors")) for f in (False, True))
    start = load_file(str(run_config["models"]["student"]) + "/model.safetensors")
    # bf16 weights round each update, so single entries may differ by an ulp; in aggregate the two
    # paths must differ far less than training moved the weights.
    moved = sum(float((a[key].float() - start[key].float()).abs().sum()) for key in a)
    gap = sum(float((a[key].float() - b[key].float()).abs().sum()) for key in a)
    assert moved > 0 and gap <= 0.1 * moved, (gap, moved)


def test_alignment_of_cpu_models_under_a_live_nccl_group(tiny_models):
    """Issue 26 defect 1: alignment evaluation's collectives under an NCCL group (as after a cell's GPU
    training) with models and their logits on the CPU."""
    import torch.distributed as dist

    from rlkd.engine.distributed import ensure_distributed
    from rlkd.eval.alignment import compare_models

    ensure_distributed()
    assert dist.get_backend() == "nccl"
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    slices = [[1 + (7 * i + j) % 90 for j in range(16)] for i in range(5)]
    result = compare_models(student, teacher, slices, batch_size=2, device="cpu")
    assert result.n_slices == 5 and 0.0 <= result.metrics["cr@1"] <= 100.0


def test_fused_weight_gradient_uses_bf16_tensor_cores_with_fp32_accumulation():
    """Issue 26 defect 12: bf16 inputs, one fp32 accumulator, no fp32 copy of the block."""
    from rlkd.objectives.fused import _add_weight_grad, _low_precision_addmm

    assert _low_precision_addmm("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits_grad = torch.randn(1024, 4096, device="cuda", generator=g).bfloat16()
    hidden = torch.randn(1024, 512, device="cuda", generator=g).bfloat16()
    acc = torch.zeros(4096, 512, device="cuda")
    for _ in range(3):  # three blocks summed in fp32
        _add_weight_grad(acc, logits_grad, hidden)
    expected = 3 * (logits_grad.double().t() @ hidden.double())
    assert acc.dtype == torch.float32
    assert float((acc.double() - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
