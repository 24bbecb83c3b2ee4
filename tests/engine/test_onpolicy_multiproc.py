"""On-policy sampling on two ZeRO-3 ranks: generation is collective, continuations differ in length."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_two_ranks_sample_together_and_train(run_config, tmp_path, launch_run):
    run_config["data"]["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 8, "temperature": 1.0}
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"].update(micro_batch_size=2, max_steps=4)
    run_config["export"] = False
    launch_run("torchrun", run_config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["supervised_tokens"] > 0 for r in rows)
    # Every supervised token is a sampled one: at most max_new_tokens per row, 2 rows on each of 2 ranks.
    assert all(r["supervised_tokens"] <= 8 * 2 * 2 for r in rows)
