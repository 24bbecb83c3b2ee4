"""On-policy sequences: responses sampled from the current student with probability λ per micro-batch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rlkd.config import ConfigError, load_config
from rlkd.data.onpolicy import hash_seed, is_on_policy, prompt_length
from rlkd.engine.train import run_training


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_coin_has_probability_lambda_and_is_a_function_of_seed_and_draw():
    draws = range(4000)
    assert sum(is_on_policy(1, d, 0.3) for d in draws) / 4000 == pytest.approx(0.3, abs=0.03)
    assert not any(is_on_policy(1, d, 0.0) for d in draws) and all(is_on_policy(1, d, 1.0) for d in draws)
    assert [is_on_policy(5, d, 0.5) for d in range(50)] == [is_on_policy(5, d, 0.5) for d in range(50)]
    assert [is_on_policy(5, d, 0.5) for d in range(50)] != [is_on_policy(6, d, 0.5) for d in range(50)]


def test_on_policy_with_a_teacher_cache_is_rejected_by_name(run_config, tmp_path):
    with pytest.raises(ConfigError, match="data.on_policy"):
        load_config(base=dict(run_config, teacher_cache=str(tmp_path / "cache"),
                              data=dict(run_config["data"], on_policy={"lmbda": 0.5})))
    with pytest.raises(ConfigError, match="data.*on_policy needs mask_convention 'shifted'"):
        load_config(base=dict(run_config, data=dict(run_config["data"], on_policy={},
                                                    mask_convention="official_off_by_one")))
    with pytest.raises(ConfigError, match="data.on_policy.lmbda"):
        load_config(base=dict(run_config, data=dict(run_config["data"], on_policy={"lmbda": 1.5})))


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_sampled_responses_come_from_the_student(run_config, tiny_models, do_sample):
    from rlkd.engine.session import build_session

    run_config["data"]["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 6, "do_sample": do_sample, "temperature": 1.0}
    session = build_session(load_config(base=run_config))
    try:
        dataset = copy.deepcopy(session.batches.inner)
        batch, original = next(session.batches), next(dataset)
        pad = session.batches.inner.pad_id
    finally:
        session.close()
    student = _plain(tiny_models["student"])
    prompts = []
    for row in range(batch.input_ids.shape[0]):
        p = prompt_length(original.supervised[row], int(original.attention_mask[row].sum()))
        prompts.append(original.input_ids[row, :p].tolist())
        n = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row, :n].tolist()
        assert ids[:p] == prompts[-1]                       # the dataset's prompt is kept
        assert 1 <= n - p <= 6                              # and up to max_new_tokens are new
        supervised = batch.supervised[row, :n].tolist()
        assert supervised == [p - 1 <= t < n - 1 for t in range(n)]
        assert batch.labels[row, : n - 1][batch.supervised[row, : n - 1]].tolist() == ids[p:]
        if not do_sample:  # greedy: the plain student's own continuation of this prompt alone
            out = student.generate(torch.tensor([prompts[-1]]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=pad, eos_token_id=2)[0, p:].tolist()
            assert ids[p:] == (out[: out.index(2) + 1] if 2 in out else out)
    assert not torch.equal(batch.input_ids, original.input_ids)
    if do_sample:  # the same left-padded batch and sampling seed, on the plain student
        width = max(map(len, prompts))
        with torch.random.fork_rng():
            torch.manual_seed(hash_seed(run_config["seed"], 0, 0))
            out = student.generate(torch.tensor([[pad] * (width - len(q)) + q for q in prompts]),
                                   attention_mask=torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts]),
                                   max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   pad_token_id=pad, eos_token_id=2)[:, width:].tolist()
        for row, (q, new) in enumerate(zip(prompts, out)):
            new = new[: new.index(2) + 1] if 2 in new else new
            n = int(batch.attention_mask[row].sum())
            assert batch.input_ids[row, len(q):n].tolist() == new


@pytest.mark.slow
def test_loss_falls_on_a_half_on_policy_mix(run_config):
    run_config["data"]["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 8}
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"].update(max_steps=30, lr=3e-3)
    run_config["export"] = False
    losses = [r["loss"] for r in _rows(run_training(run_config).metrics_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_resume_reproduces_the_uninterrupted_run(run_config):
    # A seed whose draws 3-5 (the steps after the checkpoint) mix sampled and dataset batches.
    seed = next(s for s in range(100) if len({is_on_policy(s, d, 0.5) for d in (3, 4, 5)}) == 2)
    run_config.update(seed=seed, export=False, checkpoint={"every_steps": 3},
                      loss={"objective": "jsd", "ranking": {"enabled": True, "k": 5}})
    run_config["data"]["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 6}
    run_config["train"]["max_steps"] = 6
    whole = _rows(run_training(run_config).metrics_path)
    resumed = run_training(run_config, resume=True)
    assert resumed.resumed_from == 3
    again = _rows(resumed.metrics_path)
    keys = ("loss", "grad_norm", "supervised_tokens", "rank", "base")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in whole]


def test_the_lambda_grid_spec_gives_each_cell_its_on_policy_block(tmp_path):
    """benchmarks/onpolicy/gkd_lambda.yaml sweeps data.on_policy.lmbda: every trained cell's run
    config validates and carries its own value, and no cell uses the teacher cache."""
    from pathlib import Path

    from rlkd.bench.spec import expand, load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "benchmarks" / "onpolicy" / "gkd_lambda.yaml")
    trained = [c for c in expand(spec) if c.kind == "distill"]
    assert len(trained) == 2 * 2 * 3  # (KL, JSD) x (none, R) x three lmbda values
    seen = set()
    for cell in trained:
        cfg = load_config(base=dict(cell.run, output_dir=str(tmp_path / cell.id)))
        assert cfg.data.on_policy.lmbda == cell.arm.sweep["lmbda"] and not cell.teacher_cache
        assert cfg.data.on_policy.max_new_tokens == 256 and cfg.data.on_policy.temperature == 0.9
        seen.add((cfg.loss.label(), cfg.data.on_policy.lmbda))
    assert len(seen) == 12


def test_a_prompt_without_room_keeps_the_dataset_batch_but_still_generates(tiny_models):
    """At max_length no response fits: the dataset's batch is kept. The student still generates,
    because under ZeRO-3 every rank must take part in each forward."""
    from rlkd.data import ResumableBatches
    from rlkd.data.encode import from_targets
    from rlkd.data.onpolicy import OnPolicyBatches, OnPolicyConfig

    samples = [from_targets(list(range(3, 13)), [i >= 6 for i in range(10)], "shifted") for _ in range(2)]
    student = _plain(tiny_models["student"])
    calls = []
    original_generate = student.generate
    student.generate = lambda **kw: calls.append(kw["max_new_tokens"]) or original_generate(**kw)
    wrapped = OnPolicyBatches(ResumableBatches(samples, 2, shuffle=False), student, OnPolicyConfig(lmbda=1.0),
                              seed=0, rank=0, world_size=1, max_length=6, eos_id=2, device=torch.device("cpu"))
    batch = next(wrapped)
    expected = next(ResumableBatches(samples, 2, shuffle=False))
    assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.supervised, expected.supervised)
    assert calls == [1] and wrapped.state()["on_policy_draws"] == 1
