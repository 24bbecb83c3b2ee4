"""LoRA students under ZeRO-3: only the adapters train; the merged export reproduces the engine."""

from __future__ import annotations

import json

import pytest
import torch

from rlkd.config import ConfigError, load_config

peft = pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _gathered(module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_bad_lora_block_names_the_key(run_config):
    with pytest.raises(ConfigError, match="models.student_lora.r"):
        load_config(base=dict(run_config, models=dict(run_config["models"], student_lora={"r": 0})))
    with pytest.raises(ConfigError, match="models.student_lora.rank"):
        load_config(base=dict(run_config, models=dict(run_config["models"], student_lora={"rank": 4})))


def test_only_adapters_train_and_the_merged_export_reproduces_the_engine(run_config, tiny_models, tmp_path):
    from rlkd.engine.session import build_session
    from rlkd.engine.train import _export, train_step

    run_config["models"]["student_lora"] = LORA
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"]["lr"] = 1e-2
    cfg = load_config(base=run_config)
    export_dir = tmp_path / "export"
    session = build_session(cfg)
    try:
        engine = session.student
        assert engine.zero_optimization_stage() == 3
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert len(trainable) == 2 * 3 * 2  # A and B, three target modules, two layers
        before = _gathered(engine.module)
        for step in range(3):
            train_step(session, step)
        after = _gathered(engine.module)
        batch = next(session.batches).to(session.device)
        engine.eval()
        with torch.no_grad():
            engine_logits = session.student_logits(batch)
        _export(session, export_dir)
    finally:
        session.close()

    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trainable), name
    original = _plain(tiny_models["student"])
    # Layers the adapter does not touch are the original student's, bit for bit.
    merged_state = _plain(export_dir).state_dict()
    for key, value in original.state_dict().items():
        touched = any(f".{m}." in key for m in LORA["target_modules"])
        assert torch.equal(merged_state[key], value) != touched, key

    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        merged_logits = _plain(export_dir)(**inputs).logits
        adapted = peft.PeftModel.from_pretrained(original, str(export_dir / "adapter")).eval()
        adapter_logits = adapted(**inputs).logits
    torch.testing.assert_close(merged_logits, engine_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter_logits, engine_logits, rtol=1e-4, atol=1e-5)
    adapter_config = json.loads((export_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0


def test_lora_resume_reproduces_the_uninterrupted_run(run_config, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from rlkd.engine.train import run_training

    run_config["models"]["student_lora"] = LORA
    run_config.update(checkpoint={"every_steps": 2})
    run_config["train"].update(max_steps=4, lr=1e-2)
    whole = run_training(run_config)
    rows = whole.metrics_path.read_text().splitlines()
    shutil.copytree(whole.export_dir, tmp_path / "whole_export")
    resumed = run_training(run_config, resume=True)
    assert resumed.resumed_from == 2
    keys = ("loss", "grad_norm", "base")
    assert [[json.loads(r)[k] for k in keys] for r in resumed.metrics_path.read_text().splitlines()] == \
        [[json.loads(r)[k] for k in keys] for r in rows]
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "whole_export" / name)), load_file(str(resumed.export_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_with_gradient_checkpointing_gives_the_same_adapter(run_config, tmp_path):
    """With frozen embeddings and checkpointed blocks the adapters must still learn, and exactly
    as without checkpointing."""
    from safetensors.torch import load_file

    from rlkd.engine.train import run_training

    run_config["models"]["student_lora"] = LORA
    run_config["train"].update(max_steps=2, lr=1e-2)
    adapters = []
    for checkpointing in (False, True):
        run = dict(run_config, output_dir=str(tmp_path / f"gc{checkpointing}"),
                   models=dict(run_config["models"], gradient_checkpointing=checkpointing))
        adapters.append(load_file(str(run_training(run).export_dir / "adapter" / "adapter_model.safetensors")))
    plain, checkpointed = adapters
    assert any(v.abs().sum() > 0 for k, v in checkpointed.items() if "lora_B" in k)  # B starts at zero
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
