"""The top-K teacher cache: what it stores against the teacher's own log-softmax (float64 here), its
key (K, dtype, temperature), its size, and training through it end to end on the tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlkd import teacher_cache
from rlkd.config import RunConfig
from rlkd.engine.train import run_training
from rlkd.objectives import DistillLoss
from rlkd.objectives.sparse_teacher import SparseTeacher
from rlkd.teacher_topk_cache import TopKLogProbs, topk_bytes_per_position


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _sequences(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _batch(seqs):
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
    return ids, mask


def test_it_stores_the_top_k_log_probs_and_tail_mass_at_the_temperature(tiny_models, tmp_path):
    model = _plain(tiny_models["teacher"])
    vocab = model.config.vocab_size
    seqs = _sequences(5, vocab)
    k, temperature = 8, 2.0
    cache = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, lambda: model, batch_size=2,
                                        fmt=TopKLogProbs(k, "float32", temperature))
    picked = [seqs[3], seqs[0]]
    ids, log_probs, tail = cache.sparse(*_batch(picked))
    for row, s in enumerate(picked):
        with torch.no_grad():
            exact = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].double() / temperature, -1)
        best = exact.topk(k, -1)
        assert torch.equal(ids[row, :len(s)].sort(-1).values, best.indices.sort(-1).values)
        torch.testing.assert_close(log_probs[row, :len(s)].double(), exact.gather(-1, ids[row, :len(s)]),
                                   rtol=0, atol=1e-5)
        rest = torch.ones_like(exact, dtype=torch.bool).scatter(-1, best.indices, False)
        expected_tail = (exact.exp() * rest).sum(-1).log()
        torch.testing.assert_close(tail[row, :len(s)].double(), expected_tail, rtol=1e-5, atol=1e-5)
        # ids in decreasing probability
        assert (log_probs[row, :len(s)].diff(dim=-1) <= 0).all()


def test_the_key_holds_k_dtype_and_temperature_and_an_entry_is_reused(tiny_models, tmp_path):
    model = _plain(tiny_models["teacher"])
    vocab = model.config.vocab_size
    seqs = _sequences(3, vocab, seed=2)
    calls = []

    def load():
        calls.append(1)
        return model

    entries = {teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, load, fmt=fmt).directory
               for fmt in (TopKLogProbs(4), TopKLogProbs(8), TopKLogProbs(4, "bfloat16"), TopKLogProbs(4, temperature=2.0),
                           None)}
    assert len(entries) == 5 and len(calls) == 5
    again = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, None, fmt=TopKLogProbs(8))
    assert again.directory in entries and len(calls) == 5


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 2 ** -8), ("float16", 2 ** -10)])
def test_half_precision_values_round_to_their_dtype_and_the_size_is_what_is_on_disk(tiny_models, tmp_path, dtype, atol):
    model = _plain(tiny_models["teacher"])
    vocab = model.config.vocab_size
    seqs = _sequences(4, vocab, seed=3)
    exact = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, lambda: model,
                                        fmt=TopKLogProbs(6))
    half = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, lambda: model,
                                       fmt=TopKLogProbs(6, dtype))
    batch = _batch(seqs)
    ids, full, _ = exact.sparse(*batch)
    ids_half, rounded, _ = half.sparse(*batch)
    assert torch.equal(ids, ids_half)
    torch.testing.assert_close(rounded, full, rtol=atol, atol=atol)
    positions = sum(map(len, seqs))
    on_disk = sum(np.load(f, mmap_mode="r").nbytes for f in half.directory.glob("*.rank*.npy"))
    # V = 96 < 2^16: uint16 ids; 2-byte values; one float32 tail
    assert half.bytes_per_position == 6 * 2 + 6 * 2 + 4 == on_disk / positions
    assert topk_bytes_per_position(49152, 32, "bfloat16") == 132
    assert json.loads((half.directory / "meta.json").read_text())["bytes_per_position"] == 28


def test_with_k_equal_to_the_vocabulary_the_loss_through_the_cache_is_the_exact_one(tiny_models, tmp_path):
    model = _plain(tiny_models["teacher"])
    vocab = model.config.vocab_size
    seqs = _sequences(3, vocab, seed=4)
    cache = teacher_cache.open_or_build(tmp_path, tiny_models["teacher"], seqs, vocab, lambda: model,
                                        fmt=TopKLogProbs(vocab, temperature=1.5))
    ids, mask = _batch(seqs)
    with torch.no_grad():
        teacher = model(input_ids=ids, attention_mask=mask).logits
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(0))
    loss_fn = DistillLoss(objective="jsd", temperature=1.5, ranking={"enabled": True, "k": 5})
    sparse = SparseTeacher(*cache.sparse(ids, mask), cache.temperature, cache.vocab_size)
    assert math.isinf(float(sparse.tail_log_mass[0, 0]))
    exact = loss_fn(student, teacher, mask.bool()).per_token
    torch.testing.assert_close(loss_fn(student, sparse, mask.bool()).per_token, exact, rtol=1e-5, atol=1e-5)


def test_a_loss_that_cannot_use_a_sparse_teacher_is_refused_at_config_time(run_config, tmp_path):
    run_config.update(teacher_cache=str(tmp_path / "tc"), teacher_cache_top_k=4)
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    with pytest.raises(ValueError, match=r"teacher_cache_top_k=4: ranking.k=5 exceeds the cached top-K \(4\)"):
        RunConfig.model_validate(run_config)
    run_config.pop("teacher_cache")
    run_config["loss"] = {"objective": "kl"}
    with pytest.raises(ValueError, match="set teacher_cache"):
        RunConfig.model_validate(run_config)

    from rlkd.objectives import register_objective
    from rlkd.objectives.registry import _REGISTRY

    @register_objective("test_logit_mse")
    def logit_mse(student_logits, teacher_logits, labels=None):
        """Mean squared logit gap: needs the teacher's raw logits, which a top-K cache drops."""
        return (student_logits - teacher_logits).pow(2).mean(-1)

    try:
        run_config.update(teacher_cache=str(tmp_path / "tc"))
        run_config["loss"] = {"terms": [{"objective": "kl"}, {"objective": "test_logit_mse"}]}
        with pytest.raises(ValueError, match="objective 'test_logit_mse' does not support a sparse"):
            RunConfig.model_validate(run_config)
    finally:
        del _REGISTRY["test_logit_mse"]


@pytest.mark.slow
def test_training_on_a_top_k_cache_runs_end_to_end_and_with_k_equal_to_v_equals_the_exact_cache(run_config, tmp_path):
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 3}}
    run_config["train"].update(max_steps=3, micro_batch_size=4)
    run_config["data"]["max_samples"] = 8
    exact = run_training(dict(run_config, output_dir=str(tmp_path / "exact"), teacher_cache=str(tmp_path / "tc")))
    full = run_training(dict(run_config, output_dir=str(tmp_path / "full"), teacher_cache=str(tmp_path / "tc"),
                             teacher_cache_top_k=96))
    top8 = run_training(dict(run_config, output_dir=str(tmp_path / "top8"), teacher_cache=str(tmp_path / "tc"),
                             teacher_cache_top_k=8, teacher_cache_dtype="bfloat16"))

    def rows(result):
        return [json.loads(line) for line in result.metrics_path.read_text().splitlines()]

    for a, b in zip(rows(exact), rows(full), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    sparse_rows = rows(top8)
    assert len(sparse_rows) == 3 and all(math.isfinite(r["loss"]) for r in sparse_rows)
    # KL on buckets < exact KL (data processing; strict unless p/q is constant over every tail): the
    # first step starts from the same student, so this also shows the top-8 run read the sparse entry
    assert sparse_rows[0]["base"] < rows(exact)[0]["base"]
    assert (top8.export_dir / "model.safetensors").is_file()


def test_two_ranks_build_one_entry_each_writing_its_own_files(tmp_path, monkeypatch, thread_ranks):
    import threading

    vocab, world, k = 37, 2, 5
    sequences = [[1 + (5 * i + 3 * j) % 90 for j in range(3 + i % 9)] for i in range(11)]

    def teacher(input_ids, attention_mask=None, **_):  # logits depend on the ids up to each position
        from types import SimpleNamespace

        prefix = input_ids.double().cumsum(-1).unsqueeze(-1)
        return SimpleNamespace(logits=torch.sin(prefix * 0.37 + torch.arange(vocab) * 0.11).float())

    ranks = thread_ranks(world)
    monkeypatch.setattr(teacher_cache, "_dist", ranks.dist)
    errors = []

    def build(rank):
        ranks.as_rank(rank)
        try:
            teacher_cache.open_or_build(tmp_path, "teacher", sequences, vocab, lambda: teacher, batch_size=2,
                                        teacher_id="fixed", fmt=TopKLogProbs(k))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            ranks._barrier.abort()

    threads = [threading.Thread(target=build, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    monkeypatch.undo()
    cache = teacher_cache.open_or_build(tmp_path, "teacher", sequences, vocab, None, teacher_id="fixed",
                                        fmt=TopKLogProbs(k))
    assert {p.name for p in cache.directory.glob("topk_ids.rank*.npy")} == {"topk_ids.rank0.npy", "topk_ids.rank1.npy"}
    for ids in sequences:
        row = torch.tensor([ids])
        exact = torch.log_softmax(teacher(row).logits[0].double(), -1)
        got_ids, got_values, _ = cache.sparse(row)
        torch.testing.assert_close(got_values[0].double(), exact.topk(k, -1).values, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_values[0].double(), exact.gather(-1, got_ids[0]), rtol=0, atol=1e-6)
