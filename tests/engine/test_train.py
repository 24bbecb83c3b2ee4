"""Engine tests in one process (a one-rank gloo group), ZeRO-3 on CPU with tiny random LLaMAs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl
from rlkd.config import ConfigError, load_config
from rlkd.data import DataError
from rlkd.engine.train import run_training
from rlkd.models import VocabMismatchError

REPO = Path(__file__).resolve().parents[2]


def _losses(metrics_path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()]


def _load_plain(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("ranking", [False, True], ids=["KL", "KL+R"])
@pytest.mark.slow
def test_loss_falls_over_training(run_config, ranking):
    from rlkd.engine.schedule import lr_multiplier

    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": ranking, "k": 5}}
    run_config["train"].update(max_steps=30, lr=3e-3, schedule="cosine", warmup_steps=3, min_lr_ratio=0.1)
    result = run_training(run_config)
    losses = _losses(result.metrics_path)
    logged_lr = [json.loads(line)["lr"] for line in result.metrics_path.read_text().splitlines()]
    assert logged_lr == pytest.approx([3e-3 * lr_multiplier(s, schedule="cosine", warmup_steps=3, total_steps=30,
                                                            min_lr_ratio=0.1) for s in range(30)])
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    row = json.loads(result.metrics_path.read_text().splitlines()[-1])
    for key in ("lr", "grad_norm", "tokens_per_s", "supervised_tokens", "base"):
        assert key in row
    if ranking:
        assert "rank" in row and "rank_degenerate_rows" in row


def test_lr_schedule_closed_form():
    from math import cos, pi

    from rlkd.engine.schedule import lr_multiplier

    warm = [lr_multiplier(s, schedule="constant", warmup_steps=4, total_steps=10) for s in range(6)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_multiplier(s, schedule="cosine", warmup_steps=2, total_steps=12, min_lr_ratio=0.2) for s in (2, 7, 12)]
    assert cosine == pytest.approx([1.0, 0.2 + 0.8 * 0.5 * (1 + cos(pi * 0.5)), 0.2])


def test_gradient_checkpointing_gives_the_same_update(run_config):
    base = dict(run_config, train=dict(run_config["train"], max_steps=2))
    plain = run_training(dict(base, output_dir=str(Path(base["output_dir"]) / "plain")))
    ckpt = run_training(dict(base, output_dir=str(Path(base["output_dir"]) / "ckpt"),
                             models=dict(base["models"], gradient_checkpointing=True)))
    a, b = _state(plain.export_dir), _state(ckpt.export_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_example_config_is_valid():
    cfg = load_config(REPO / "examples" / "tiny_run.yaml")
    assert cfg.loss.ranking.enabled and cfg.data.task == "gsm8k"


def test_zero3_teacher_logits_equal_plain_teacher(run_config, tiny_models):
    from rlkd.engine.session import build_session

    plain = _load_plain(tiny_models["teacher"])  # before any HfDeepSpeedConfig is active
    cfg = load_config(base=run_config)
    session = build_session(cfg)
    try:
        batch = next(session.batches)
        zero3 = session.teacher_logits(batch)
        # the engine really partitioned the teacher: its parameters are empty placeholders
        assert all(p.numel() == 0 for p in session.teacher.module.parameters())
    finally:
        session.close()
    with torch.no_grad():
        reference = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(zero3[real], reference[real], rtol=0, atol=1e-5)


def test_cross_entropy_runs_never_load_the_teacher(run_config):
    from rlkd.engine.session import build_session
    from rlkd.engine.train import train_step

    run_config["loss"] = {"objective": "ce"}
    run_config["data"]["group_by_length"] = True  # (and the data setting reaches the loader)
    session = build_session(load_config(base=run_config))
    try:
        assert session.batches.group_by_length is True
        assert session.teacher is None and session.teacher_cache is None
        batch = next(session.batches)
        assert session.teacher_logits(batch) is None
        metrics = train_step(session, 0)
    finally:
        session.close()
    assert metrics["loss"] > 0 and metrics["loss"] == pytest.approx(metrics["base"])


def test_grad_accumulation_4x1_equals_1x4(run_config, tiny_models):
    """Global-token normalisation: 4 micro-batches of 1 must give the update of 1 batch of 4,
    although the micro-batches hold different numbers of response tokens."""
    base = dict(run_config, checkpoint={"every_steps": 0})
    one_by_four = run_training(dict(base, output_dir=str(Path(base["output_dir"]) / "a"),
                                    train=dict(base["train"], micro_batch_size=4, grad_accum=1, max_steps=2)))
    four_by_one = run_training(dict(base, output_dir=str(Path(base["output_dir"]) / "b"),
                                    train=dict(base["train"], micro_batch_size=1, grad_accum=4, max_steps=2)))
    a, b = _state(one_by_four.export_dir), _state(four_by_one.export_dir)
    init = _state(tiny_models["student"])
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 1e-4  # the runs did update the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_export_reproduces_engine_logits(run_config):
    from rlkd.engine.session import build_session
    from rlkd.engine.train import _export, train_step

    cfg = load_config(base=run_config)
    session = build_session(cfg)
    export_dir = Path(cfg.output_dir) / "export"
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        for step in range(2):
            train_step(session, step)
        batch = next(session.batches)
        with torch.no_grad():
            engine_logits = session.student_logits(batch)
        _export(session, export_dir)
    finally:
        session.close()
    exported = _load_plain(export_dir)
    with torch.no_grad():
        logits = exported(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], engine_logits[real], rtol=0, atol=1e-5)


def test_vocab_padding_needs_truncation_and_then_trains(run_config, tiny_models):
    run_config["models"]["teacher"] = str(tiny_models["teacher_padded"])
    with pytest.raises(VocabMismatchError, match="vocab_truncation=shared"):
        run_training(run_config)
    run_config["models"]["vocab_truncation"] = "shared"
    run_config["train"]["max_steps"] = 1
    result = run_training(run_config)
    assert len(_losses(result.metrics_path)) == 1


def test_tokenizers_that_disagree_fail_before_compute(llama_tokenizer, data_dir):
    from transformers import AutoTokenizer

    from rlkd.models import plan_vocab

    gpt2 = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "gpt2")
    with pytest.raises(VocabMismatchError, match="disagree at id"):
        plan_vocab(50257, 50257, gpt2, llama_tokenizer, "shared")


def test_added_pad_token_is_padding_but_an_added_word_is_not(llama_tokenizer, data_dir):
    """32000 vs 32001 (the official code adds [PAD] to the student): fine with shared truncation;
    a real token beyond the shared prefix would be silently cut, so it is refused."""
    from transformers import AutoTokenizer

    from rlkd.models import plan_vocab

    with_pad = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "llama2")
    with_pad.add_special_tokens({"pad_token": "[PAD]"})
    assert len(with_pad) == 32001
    assert plan_vocab(32000, 32001, llama_tokenizer, with_pad, "shared").shared_size == 32000
    with pytest.raises(VocabMismatchError, match="vocab size 32000 != student vocab size 32001"):
        plan_vocab(32000, 32001, llama_tokenizer, with_pad, "none")
    with_word = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "llama2")
    with_word.add_tokens(["distillation"])
    with pytest.raises(VocabMismatchError, match="1 real tokens beyond the shared vocab size 32000"):
        plan_vocab(32000, 32001, llama_tokenizer, with_word, "shared")


def test_missing_data_field_names_file_and_line(run_config, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 5, 2], "loss_mask": [0, 1, 1]},
                                               {"input_ids": [1, 6, 2]}])
    run_config["data"]["path"] = str(bad)
    with pytest.raises(DataError, match=rf"{bad}:2: missing field 'loss_mask'"):
        run_training(run_config)


def test_bad_config_key_is_named(run_config, tmp_path, capsys):
    from rlkd.engine.cli import main

    run_config["train"]["learning_rate"] = 1e-3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config))
    assert main(["--config", str(path)]) == 2
    assert "train.learning_rate: unknown key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(base=run_config, overrides=["train.max_steps=zero"])


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_bit_exact(run_config, tmp_path, cli_env):
    run_config["train"].update(max_steps=20, micro_batch_size=2, schedule="cosine", warmup_steps=3)
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["checkpoint"] = {"every_steps": 5, "keep_last": 2}

    killed = dict(run_config, output_dir=str(tmp_path / "killed"))
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(killed))
    command = [sys.executable, "-m", "rlkd.cli", "train", "--config", str(config_path)]
    latest = Path(killed["output_dir"]) / "checkpoints" / "latest"
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert not (Path(killed["output_dir"]) / "export").exists()

    resumed = subprocess.run(command + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((Path(killed["output_dir"]) / "manifest.json").read_text())
    assert manifest["resumed_from"] is not None and 0 < manifest["resumed_from"] < 20

    straight = run_training(dict(run_config, output_dir=str(tmp_path / "straight")))
    a, b = _state(Path(killed["output_dir"]) / "export"), _state(straight.export_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (Path(killed["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
