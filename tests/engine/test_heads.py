"""ZeRO-3 training with `loss.fused_lm_head: true` ends where the logits path ends (CPU, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlkd.engine.heads import FusedHeadError, check_plain_head
from rlkd.engine.train import run_training

# Adam divides by sqrt(v): gradients equal to ~1e-6 relative move the weights by far less than this
# after a few steps at lr 1e-3; a wrong head gradient moves them by ~lr per step.
WEIGHT_ATOL = 2e-5


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


def _train_both(run_config, tmp_path, **changes):
    results = {}
    for fused in (False, True):
        cfg = dict(run_config, output_dir=str(tmp_path / f"fused_{fused}"), **changes)
        cfg["loss"] = dict(cfg["loss"], fused_lm_head=fused)
        results[fused] = run_training(cfg)
    return results[False], results[True]


def _assert_same_training(logits_run, fused_run):
    a, b = _weights(logits_run.export_dir), _weights(fused_run.export_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{key}: {m}")
    for key in ("loss", "base", "rank"):
        if key in logits_run.last_metrics:
            assert fused_run.last_metrics[key] == pytest.approx(logits_run.last_metrics[key], rel=1e-5), key


@pytest.mark.slow
def test_fused_training_matches_the_logits_path(run_config, tmp_path, tiny_models):
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    logits_run, fused_run = _train_both(run_config, tmp_path)
    _assert_same_training(logits_run, fused_run)
    # ... and training did something: the head moved away from its initial weights.
    start = _weights(tiny_models["student"])
    assert (_weights(fused_run.export_dir)["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_VOCAB

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("tied") / "student"
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.slow
def test_tied_embeddings_a_padded_teacher_vocabulary_and_checkpointing(run_config, tmp_path, tiny_models, tied_student):
    """The head is the embedding matrix (both gradients meet in one ZeRO-3 parameter); the teacher has
    8 padding rows, cut by vocab_truncation=shared; the student recomputes its layers in backward."""
    run_config["loss"] = {"objective": "jsd", "ranking": {"enabled": True, "k": 5, "fidelity": "official"}}
    models = dict(run_config["models"], student=str(tied_student), teacher=str(tiny_models["teacher_padded"]),
                  vocab_truncation="shared", gradient_checkpointing=True)
    logits_run, fused_run = _train_both(run_config, tmp_path, models=models)
    _assert_same_training(logits_run, fused_run)


@pytest.mark.slow
def test_teacher_cache_and_gradient_accumulation(run_config, tmp_path):
    run_config["loss"] = {"objective": "akl", "ranking": {"enabled": True, "k": 4, "mode": "dynamic"}}
    run_config["train"] = dict(run_config["train"], micro_batch_size=2, grad_accum=2)
    logits_run, fused_run = _train_both(run_config, tmp_path, teacher_cache=str(tmp_path / "cache"))
    _assert_same_training(logits_run, fused_run)


def test_a_transformed_head_is_refused():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    logits = (hidden[:, -1:] @ weight.t())
    check_plain_head("student", hidden, weight, logits)  # a plain head passes
    with pytest.raises(FusedHeadError, match="fused_lm_head=false"):
        check_plain_head("student", hidden, weight, 30 * torch.tanh(logits / 30) + 0.5)


def test_the_flag_is_validated_with_the_loss_config():
    from rlkd.objectives import LossConfig

    with pytest.raises(ValueError, match="fused_lm_head"):
        LossConfig(objective="kl", fused_lm_head="sometimes")


@pytest.mark.slow
def test_two_rank_fused_training_matches_one_rank_logits_path(run_config, tmp_path, launch_run):
    """2 ranks x micro-batch 2 on the fused path (head weights partitioned over both ranks) against
    1 rank x 4 on the logits path: the same global batches, so the same weights."""
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"].update(max_steps=4)
    two = dict(run_config, output_dir=str(tmp_path / "two"), train=dict(run_config["train"], micro_batch_size=2),
               loss=dict(run_config["loss"], fused_lm_head=True))
    launch_run("torchrun", two)
    one = run_training(dict(run_config, output_dir=str(tmp_path / "one")))
    a, b = _weights(Path(two["output_dir"]) / "export"), _weights(one.export_dir)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_agreement_metrics_are_refused_on_the_fused_path(run_config):
    from rlkd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="agreement_every"):
        load_config(base=dict(run_config, agreement_every=5, loss={"objective": "kl", "fused_lm_head": True}))
