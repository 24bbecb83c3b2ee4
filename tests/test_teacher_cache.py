"""The teacher logit cache: exact lookups by content, one build, and training through it equals
training against the live ZeRO-3 teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlkd import teacher_cache
from rlkd.engine.train import run_training


def _plain(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _sequences(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_lookup_returns_the_teacher_logits_of_each_row_in_any_order(tiny_models, tmp_path):
    model = _plain(tiny_models["teacher"])
    vocab = model.config.vocab_size
    seqs = _sequences(7, vocab)
    calls = []

    def counting_teacher(**inputs):
        calls.append(inputs["input_ids"].shape)
        return model(**inputs)

    cache = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, lambda: counting_teacher,
                                        batch_size=3)
    assert len(calls) == 3 and len(cache) == 7
    # a right-padded batch in another order, one sequence repeated
    picked = [seqs[5], seqs[0], seqs[5]]
    width = max(map(len, picked))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, s in enumerate(picked):
        ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
    got = cache.logits(ids, mask)
    for row, s in enumerate(picked):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([s])).logits[0]
        torch.testing.assert_close(got[row, :len(s)], alone, rtol=0, atol=1e-5)
        assert not got[row, len(s):].any()  # padding rows are left at zero

    unknown = torch.tensor([[4, 5, 6, 7]])
    with pytest.raises(KeyError, match="not among its 7 sequences"):
        cache.logits(unknown)


def test_second_open_reuses_the_entry_and_other_weights_get_another(tiny_models, tmp_path):
    model = _plain(tiny_models["teacher"])
    vocab = model.config.vocab_size
    seqs = _sequences(4, vocab, seed=1)
    first = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, lambda: model)
    again = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, None)
    assert again.directory == first.directory
    assert json.loads((first.directory / "meta.json").read_text())["sequences"] == 4

    changed = tmp_path / "changed_teacher"
    shutil.copytree(tiny_models["teacher"], changed)
    other = _plain(changed)
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)
    other.save_pretrained(changed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        teacher_cache.open_or_build(tmp_path, changed, seqs, vocab, None)


def test_training_on_the_cache_equals_training_on_the_live_teacher(run_config, tmp_path):
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"].update(max_steps=4, micro_batch_size=4)
    run_config["data"]["max_samples"] = 8  # two micro-batches: every epoch revisits the cached rows
    live = run_training(dict(run_config, output_dir=str(tmp_path / "live")))
    cached = run_training(dict(run_config, output_dir=str(tmp_path / "cached"), teacher_cache=str(tmp_path / "tc")))
    entries = [p for p in (tmp_path / "tc").iterdir() if p.is_dir()]
    assert len(entries) == 1 and json.loads((entries[0] / "meta.json").read_text())["sequences"] == 8

    def rows(result):
        return [json.loads(line) for line in result.metrics_path.read_text().splitlines()]

    for a, b in zip(rows(live), rows(cached), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["rank"] == pytest.approx(a["rank"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    x = load_file(str(live.export_dir / "model.safetensors"))
    y = load_file(str(cached.export_dir / "model.safetensors"))
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=0, atol=1e-5, msg=key)
