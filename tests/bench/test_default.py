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
from rlkd.bench.store import write_cell_config
from rlkd.data.synthetic import token_text
from rlkd.eval import synthetic


def _truth(n=3, length=6, vocab=24, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(vocab) * 0.7, size=(n, length))
    targets = torch.tensor(np.array([[rng.choice(vocab, p=p) for p in row] for row in probs]))
    return torch.tensor(probs, dtype=torch.float64), targets


def test_a_student_equal_to_the_truth_scores_perfectly():
    truth, targets = _truth()
    logits = torch.log(truth).float()
    metrics = synthetic.score_logits(logits, logits.clone(), truth, targets)
    for k in (1, 2, 3, 4, 5):
        assert metrics[f"cr@{k}"] == pytest.approx(100.0) and metrics[f"true_cr@{k}"] == pytest.approx(100.0)
    assert metrics["true_kl"] == pytest.approx(0.0, abs=1e-6)
    # per-slice perplexity, then averaged over slices (the paper's aggregation)
    nll = -np.log(np.take_along_axis(truth.numpy(), targets.numpy()[..., None], axis=-1)[..., 0])
    assert metrics["ppl"] == pytest.approx(float(np.mean(np.exp(nll.mean(axis=1)))), rel=1e-5)


def test_true_kl_of_a_uniform_student_is_log_v_minus_entropy():
    truth, targets = _truth()
    uniform = torch.zeros(truth.shape)
    metrics = synthetic.score_logits(uniform, None, truth, targets)
    p = truth.numpy()
    expected = float(np.mean(np.sum(p * np.log(p), axis=-1) + math.log(p.shape[-1])))
    assert metrics["true_kl"] == pytest.approx(expected, rel=1e-9)
    assert "cr@1" not in metrics and metrics["ppl"] == pytest.approx(p.shape[-1], rel=1e-5)


def test_true_top_k_agreement_against_a_brute_force_count():
    truth, targets = _truth(n=2, length=5, vocab=24, seed=4)
    rng = np.random.default_rng(7)
    student = torch.tensor(rng.normal(size=truth.shape), dtype=torch.float32)
    metrics = synthetic.score_logits(student, None, truth, targets)
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
    metrics, per_example = synthetic.score_answers(answers, references)
    assert per_example["exact_match"] == [100.0, 0.0] and per_example["token_accuracy"] == [100.0, 50.0]
    assert metrics["exact_match"] == 50.0
    assert metrics["token_accuracy"] == pytest.approx(100 * (4 / 4 + 2 / 4) / 2)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        direct = [100 * scorer.score(token_text(r), token_text(a))[key].fmeasure for a, r in zip(answers, references)]
        assert metrics[key] == pytest.approx(sum(direct) / 2)


def test_default_spec_covers_every_objective_with_and_without_r_over_five_seeds():
    from rlkd.bench.spec import expand

    cells = expand(default.default_spec(quick=False))
    methods = {c.arm.method for c in cells}
    assert methods == {"Teacher", "Start", "Rank-5"} | {f"{o}{r}" for o in ("KL", "RKL", "JSD", "TVD", "AKL")
                                                          for r in ("", "+R")}
    assert len(cells) == 2 + 11 * 5  # five seeds per trained cell
    assert all("@results/" in c.run["models"]["teacher"] for c in cells)  # no absolute path in the hash


def test_a_plugin_objective_joins_the_default_grid(tmp_path):
    plugin = tmp_path / "sq_plugin.py"
    plugin.write_text(
        "import torch\nfrom rlkd.objectives import register_objective\n\n"
        "@register_objective('sq_default_test')\n"
        "def sq(student_logits, teacher_logits, labels=None):\n"
        "    \"\"\"Squared probability distance.\"\"\"\n"
        "    return (torch.softmax(student_logits, -1) - torch.softmax(teacher_logits, -1)).pow(2).sum(-1)\n")
    from rlkd.bench.spec import expand
    from rlkd.objectives.registry import _REGISTRY

    try:
        cells = expand(default.default_spec(quick=True, plugins=[str(plugin)]))
        assert {"SQ_DEFAULT_TEST", "SQ_DEFAULT_TEST+R"} <= {c.arm.method for c in cells}
        assert all(c.run["plugins"] == [str(plugin.resolve())] for c in cells if c.kind == "distill")
    finally:
        _REGISTRY.pop("sq_default_test", None)


def _small_default(tmp_path, monkeypatch):
    """The embedded benchmark at toy size: 64 training sequences, a 4-step teacher, 3-step students."""
    import yaml

    monkeypatch.setattr(default, "data_plan", lambda quick: {"train": 64, "heldout": 8, "downstream": 8})
    monkeypatch.setattr(default, "teacher_plan", lambda quick: {"hidden": 32, "layers": 1, "heads": 2,
                                                                "max_steps": 4, "lr": 2e-3, "global_batch": 8,
                                                                "seed": 1})
    raw = yaml.safe_load(default.SPEC_FILE.read_text())
    raw["tiny"]["defaults"]["train"] = {"max_steps": 3, "micro_batch_size": 8, "warmup_steps": 0}
    small = tmp_path / "default.yaml"
    small.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(default, "SPEC_FILE", small)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _args(results, **extra):
    return argparse.Namespace(**{"quick": True, "results_dir": results, "only": "KL,KL+R,Teacher", "dry_run": False,
                                 "jobs": 1, "skip_failed": False, "no_table": False, **extra})


@pytest.mark.slow
def test_embedded_benchmark_runs_end_to_end_and_then_only_reuses(tmp_path, monkeypatch, capsys):
    _small_default(tmp_path, monkeypatch)
    results = tmp_path / "results"
    assert default.run_default(_args(results)) == 0
    out = capsys.readouterr().out
    assert "3 run, 0 already done" in out and "0 failed" in out
    table = (results / "table.md").read_text()
    for header in ("Alignment with the teacher", "Alignment with the true next-token distribution", "Exact match"):
        assert header in table
    kl = next(p for p in results.glob("synthetic-KL-s1-*"))
    metrics = json.loads((kl / "metrics.json").read_text())
    assert 0 <= metrics["true_cr@1"] <= 100 and metrics["true_kl"] > 0 and metrics["ppl"] > 1
    per_example = json.loads((kl / "per_example.json").read_text())
    assert len(per_example["exact_match"]) == 8 and np.mean(per_example["exact_match"]) == pytest.approx(
        metrics["exact_match"])
    assert (kl / "train" / "metrics.jsonl").is_file() and not (kl / "train" / "export").exists()
    # With every cell done (a fresh clone's committed results), nothing is prepared or run again.
    monkeypatch.setattr(default, "prepare_models", lambda *a: (_ for _ in ()).throw(AssertionError("prepared")))
    assert default.run_default(_args(results)) == 0
    out = capsys.readouterr().out
    assert "already done" in out and "reusing them" in out and "--from-scratch" in out


@pytest.mark.slow
def test_long_lived_workers_give_exactly_the_fresh_process_results_and_survive_a_crash(tmp_path, monkeypatch):
    from rlkd.bench.executor import CellProcessError, LocalExecutor
    from rlkd.bench.spec import expand, filter_cells

    _small_default(tmp_path, monkeypatch)
    results = tmp_path / "results"
    paths = default.prepare_data(results, True)
    default.prepare_models(results, True, paths["train"])
    cells = filter_cells(expand(default.default_spec(quick=True)), "KL,KL+R")
    timing = {"train_seconds", "train_step_seconds"}

    def run(executor, cell, name):
        workdir = results / ".staging" / f"{name}-{cell.id}"
        workdir.mkdir(parents=True)
        write_cell_config(workdir, cell)
        metrics, per_example = executor.run(cell, workdir)
        return {k: v for k, v in metrics.items() if k not in timing}, per_example

    fresh = LocalExecutor(results)
    pool = LocalExecutor(results, reuse_processes=True)
    try:
        fresh_results = [run(fresh, cell, "fresh") for cell in cells]
        for cell, expected in zip(cells, fresh_results):  # both cells through one worker, one after the other
            assert run(pool, cell, "worker") == expected
        assert len(pool._workers) == 1
        # A cell that kills its worker fails with a reason; the next cell gets a fresh worker.
        crash = tmp_path / "crash.py"
        crash.write_text("import os\nfrom rlkd.objectives import register_objective\n\n"
                         "@register_objective('crash_now')\ndef crash(student_logits, teacher_logits, labels=None):\n"
                         "    \"\"\"Ends the process.\"\"\"\n    os._exit(3)\n")
        run_tree = json.loads(json.dumps(cells[0].run))
        run_tree["plugins"] = [str(crash)]
        run_tree["loss"]["objective"] = "crash_now"
        doomed = cells[0].model_copy(update={"run": run_tree})
        with pytest.raises(CellProcessError, match="worker died with 3"):
            run(pool, doomed, "crash")
        assert run(pool, cells[1], "after") == fresh_results[1]
        assert len(pool._workers) == 2
    finally:
        pool.close()


@pytest.mark.slow
def test_two_runners_on_one_folder_prepare_once_and_both_finish(tmp_path, monkeypatch, capsys):
    """The shared preparation (corpus, teacher) is built once under a lock; the second runner waits
    and reuses it, the teacher's log is not interleaved, every cell is done once and both exit 0."""
    import threading

    _small_default(tmp_path, monkeypatch)
    results = tmp_path / "results"
    codes = []
    runners = [threading.Thread(target=lambda: codes.append(default.run_default(_args(results, only="Teacher,KL"))))
               for _ in range(2)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(timeout=600)
    assert codes == [0, 0]
    steps = [json.loads(line)["step"] for line in
             (results / ".shared" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # trained once, in order
    done = [p for p in results.iterdir() if (p / "status.json").is_file()]
    assert len(done) == 2 and all(json.loads((p / "status.json").read_text())["status"] == "done" for p in done)
    out = capsys.readouterr().out
    assert out.count("training the teacher") == 1
