"""The embedded benchmark: its scoring against hand computations, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from rlkd.bench import default
from rlkd.bench.synthetic import token_text


def _truth(n=3, length=6, vocab=24, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(vocab) * 0.7, size=(n, length))
    targets = torch.tensor(np.array([[rng.choice(vocab, p=p) for p in row] for row in probs]))
    return torch.tensor(probs, dtype=torch.float64), targets


def test_a_student_equal_to_the_truth_scores_perfectly():
    truth, targets = _truth()
    logits = torch.log(truth).float()
    metrics = default.score_logits(logits, logits.clone(), truth, targets)
    for k in (1, 2, 3, 4, 5):
        assert metrics[f"cr@{k}"] == pytest.approx(100.0) and metrics[f"true_cr@{k}"] == pytest.approx(100.0)
    assert metrics["true_kl"] == pytest.approx(0.0, abs=1e-6)
    # per-slice perplexity, then averaged over slices (the paper's aggregation)
    nll = -np.log(np.take_along_axis(truth.numpy(), targets.numpy()[..., None], axis=-1)[..., 0])
    assert metrics["ppl"] == pytest.approx(float(np.mean(np.exp(nll.mean(axis=1)))), rel=1e-5)


def test_true_kl_of_a_uniform_student_is_log_v_minus_entropy():
    truth, targets = _truth()
    uniform = torch.zeros(truth.shape)
    metrics = default.score_logits(uniform, None, truth, targets)
    p = truth.numpy()
    expected = float(np.mean(np.sum(p * np.log(p), axis=-1) + math.log(p.shape[-1])))
    assert metrics["true_kl"] == pytest.approx(expected, rel=1e-9)
    assert "cr@1" not in metrics and metrics["ppl"] == pytest.approx(p.shape[-1], rel=1e-5)


def test_true_top_k_agreement_against_a_brute_force_count():
    truth, targets = _truth(n=2, length=5, vocab=24, seed=4)
    rng = np.random.default_rng(7)
    student = torch.tensor(rng.normal(size=truth.shape), dtype=torch.float32)
    metrics = default.score_logits(student, None, truth, targets)
    s_order = np.argsort(-student.numpy(), axis=-1)
    t_order = np.argsort(-truth.numpy(), axis=-1)
    for k in (1, 2, 3):
        same = (s_order[..., :k] == t_order[..., :k]).all(axis=-1).mean(axis=1).mean()
        assert metrics[f"true_cr@{k}"] == pytest.approx(100 * same)
    overlap = np.array([[len(set(a[:5]) & set(b[:5])) / 5 for a, b in zip(sr, tr)] for sr, tr in zip(s_order, t_order)])
    assert metrics["true_mor@5"] == pytest.approx(100 * overlap.mean(axis=1).mean())


def test_downstream_scores_against_hand_counts_and_rouge_score():
    references = [[5, 6, 7, 8], [9, 9, 10, 11]]
    answers = [[5, 6, 7, 8], [9, 10, 10, 3]]
    metrics = default.score_answers(answers, references)
    assert metrics["exact_match"] == 50.0
    assert metrics["token_accuracy"] == pytest.approx(100 * (4 / 4 + 2 / 4) / 2)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        direct = [100 * scorer.score(token_text(r), token_text(a))[key].fmeasure for a, r in zip(answers, references)]
        assert metrics[key] == pytest.approx(sum(direct) / 2)


def test_default_spec_covers_every_objective_with_and_without_r():
    from rlkd.bench.spec import expand, parse_spec

    cells = expand(parse_spec(default.default_spec(quick=False)))
    methods = {c["method"] for c in cells}
    assert methods == {"Teacher", "Start", "Rank-5"} | {f"{o}{r}" for o in ("KL", "RKL", "JSD", "TVD", "AKL")
                                                          for r in ("", "+R")}
    assert len(cells) == 2 + 11 * 2  # two seeds per trained cell
    assert all("@results/" in c["train"]["teacher"] for c in cells)  # no absolute path in the hash


@pytest.mark.slow
def test_embedded_benchmark_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rlkd.engine.train")
    monkeypatch.setattr(default, "data_plan", lambda quick: {"train": 64, "heldout": 8, "downstream": 8})
    monkeypatch.setattr(default, "teacher_plan", lambda quick: {"hidden": 32, "layers": 1, "heads": 2,
                                                                "max_steps": 4, "lr": 2e-3, "global_batch": 8,
                                                                "seed": 1})
    real_spec = default.default_spec

    def small_spec(quick):
        spec = real_spec(quick)
        spec["defaults"].update(max_steps=3, global_batch=8, micro_batch=8, warmup_steps=0)
        return spec

    monkeypatch.setattr(default, "default_spec", small_spec)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = argparse.Namespace(quick=True, results_dir=tmp_path, only="KL,KL+R,Teacher", dry_run=False, jobs=1,
                              skip_failed=False, no_table=False)
    assert default.run_default(args) == 0
    out = capsys.readouterr().out
    assert "3 run, 0 already done, 0 failed" in out
    table = (tmp_path / "table.md").read_text()
    for header in ("Alignment with the teacher", "Alignment with the true next-token distribution", "Exact match"):
        assert header in table
    kl = next(p for p in tmp_path.glob("synthetic-KL-s1-*"))
    metrics = json.loads((kl / "metrics.json").read_text())
    assert 0 <= metrics["true_cr@1"] <= 100 and metrics["true_kl"] > 0 and metrics["ppl"] > 1
    assert (kl / "train" / "metrics.jsonl").is_file() and not (kl / "train" / "export").exists()
    assert default.run_default(args) == 0
    assert "0 run, 3 already done" in capsys.readouterr().out
