"""The adapter from a neutral benchmark cell to the engine's run config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlkd.bench.cell import CellConfigError, optimizer_steps, resolve_results_refs, run_config, validate_run_config
from rlkd.bench.spec import expand, parse_spec


def _cell(**train):
    raw = {"name": "c", "tasks": [{"name": "gsm8k"}], "objectives": [{"name": "akl", "params": {"mu": 0.3}}],
           "variants": ["R_dynamic"], "seeds": [5], "ranking": {"k": 7},
           "defaults": {"teacher": "T", "student": "S", "dataset": "gsm8k", **train}}
    return expand(parse_spec(raw, registry=lambda: ["akl"]))[0]


def test_neutral_keys_map_onto_the_engine_config(tmp_path):
    cell = _cell(lr=3e-5, global_batch=64, micro_batch=4, seq_len=1024, epochs=2, train_examples=1000,
                 grad_clip=0.5, schedule="cosine", warmup_steps=3, checkpoint_every=7, precision="fp32",
                 vocab_truncation="shared", data_split="train", engine={"log_every": 5})
    tree = run_config(cell, tmp_path / "out", cache_dir=tmp_path)
    assert tree["output_dir"] == str(tmp_path / "out") and tree["seed"] == 5
    assert tree["models"] == {"teacher": "T", "student": "S", "dtype": "float32", "gradient_checkpointing": False,
                              "vocab_truncation": "shared"}
    assert tree["data"]["task"] == "gsm8k" and tree["data"]["max_length"] == 1024 and tree["data"]["limit"] == 1000
    assert tree["train"]["micro_batch_size"] == 4 and tree["train"]["grad_accum"] == 16
    assert tree["train"]["max_steps"] == math.ceil(2 * 1000 / 64) == 32
    assert (tree["train"]["lr"], tree["train"]["grad_clip"], tree["train"]["schedule"]) == (3e-5, 0.5, "cosine")
    assert tree["checkpoint"]["every_steps"] == 7 and tree["log_every"] == 5
    assert tree["loss"] == {"objective": "akl", "params": {"mu": 0.3}, "temperature": 1.0,
                            "ranking": {"enabled": True, "mode": "dynamic", "correlation": "spearman", "k": 7,
                                        "rank_weight": 2.0, "base_weight": 1.0, "scores": "logits",
                                        "fidelity": "paper"}}
    validate_run_config(tree)


def test_steps_from_epochs_or_explicit():
    assert optimizer_steps({"max_steps": 9, "epochs": 3}) == 9
    assert optimizer_steps({"epochs": 1, "train_examples": 20000, "global_batch": 64}) == 313
    assert optimizer_steps({"epochs": 0.5, "global_batch": 10}, n_rows=35) == 2
    with pytest.raises(CellConfigError, match="'epochs' or 'max_steps'"):
        optimizer_steps({})


def test_bad_training_settings_are_named(tmp_path):
    with pytest.raises(CellConfigError, match=r"unknown training key\(s\) \['learning_rate'\]"):
        run_config(_cell(learning_rate=1.0, max_steps=1), tmp_path, cache_dir=tmp_path)
    with pytest.raises(CellConfigError, match="not a multiple of micro_batch 3"):
        run_config(_cell(global_batch=64, micro_batch=3, max_steps=1), tmp_path, cache_dir=tmp_path)
    cell = _cell(max_steps=1)
    del cell["train"]["dataset"]
    with pytest.raises(CellConfigError, match="'dataset' is required"):
        run_config(cell, tmp_path, cache_dir=tmp_path)
    config = pytest.importorskip("rlkd.config")
    with pytest.raises(config.ConfigError, match="train.lr"):
        validate_run_config(run_config(_cell(max_steps=1, lr=-1.0), tmp_path, cache_dir=tmp_path))


def test_results_refs_resolve_without_entering_the_hash(tmp_path):
    cell = {"train": {"data_path": "@results/.data/x.jsonl", "list": ["@results/a", "plain"]}, "n": 3}
    assert resolve_results_refs(cell, tmp_path) == {
        "train": {"data_path": str(tmp_path / ".data/x.jsonl"), "list": [str(tmp_path / "a"), "plain"]}, "n": 3}


def test_tiny_models_are_named_in_dry_runs_and_built_otherwise(tmp_path):
    tree = run_config(_cell(max_steps=1, teacher="@tiny/teacher", student="@tiny/student"), tmp_path / "o",
                      cache_dir=tmp_path, create_models=False)
    assert tree["models"]["teacher"] == str(tmp_path / "tiny-teacher") and not (tmp_path / "tiny-teacher").exists()
    with pytest.raises(CellConfigError, match="unknown tiny model"):
        run_config(_cell(max_steps=1, teacher="@tiny/huge"), tmp_path / "o", cache_dir=tmp_path)


def test_teacher_generations_replace_responses_once_and_are_reused(tmp_path, monkeypatch):
    from rlkd.bench import cell as cell_module
    from rlkd.bench.cell import ensure_teacher_generations, resolve_model

    if cell_module._shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = resolve_model("@tiny/teacher", tmp_path / "cache")
    train = {"dataset": "gsm8k", "data_path": str(data), "train_examples": 3, "teacher_generations": True,
             "generation": {"max_new_tokens": 4, "batch_size": 2}}
    out = Path(ensure_teacher_generations(train, tmp_path / "shared", teacher))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in written] == [r["question"] for r in rows[:3]]  # order and limit kept
    assert all(w["answer"] != r["answer"] for w, r in zip(written, rows))  # a random tiny model's text
    provenance = json.loads(out.with_suffix(".provenance.json").read_text())
    assert provenance["rows"] == 3 and provenance["decoding"]["max_new_tokens"] == 4
    assert provenance["decoding"]["do_sample"] is False and str(data) in provenance["sources"]

    def no_generation(*args, **kwargs):
        raise AssertionError("cached generations must be reused")

    monkeypatch.setattr("rlkd.eval.generate.generate_texts", no_generation)
    assert ensure_teacher_generations(train, tmp_path / "shared", teacher) == str(out)
    documents = tmp_path / "docs.jsonl"
    documents.write_text(json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(CellConfigError, match="prompt/response task"):
        ensure_teacher_generations({**train, "dataset": "pretrain", "data_path": str(documents)}, tmp_path / "s2",
                                   teacher)


def _staged_spec(docs: Path, **student_sft):
    return {"name": "staged", "tasks": [{"name": "pretrain"}], "objectives": ["kl"], "variants": ["none"],
            "seeds": [1], "references": ["teacher", "student"],
            "defaults": {"teacher": "@tiny/teacher", "student": "@tiny/student", "dataset": "pretrain",
                         "data_path": str(docs), "train_examples": 3, "train_samples": 4, "seq_len": 32,
                         "global_batch": 2, "micro_batch": 2, "max_steps": 1, "precision": "fp32",
                         "teacher_cache": True,
                         "student_sft": {"skip_examples": 3, "train_examples": None, "train_samples": None,
                                         "max_steps": 2, "lr": 1e-3, **student_sft}},
            "eval": {"kind": "alignment", "source": "train", "batch_size": 2,
                     "extra_sets": {"heldout": {"text_path": str(docs), "skip_rows": 6, "slice_len": 32,
                                                "max_slices": 3}}}}


def test_reference_rows_carry_the_training_keys_only_when_staged():
    plain = {"name": "p", "tasks": [{"name": "pretrain"}], "objectives": ["kl"], "variants": ["none"],
             "references": ["student"], "defaults": {"teacher": "T", "student": "S", "dataset": "pretrain", "lr": 1.0}}
    other_lr = {**plain, "defaults": {**plain["defaults"], "lr": 2.0}}
    start = [expand(parse_spec(s, registry=lambda: ["kl"]))[0] for s in (plain, other_lr)]
    assert start[0]["train"] == {"teacher": "T", "student": "S"}
    assert start[0]["config_hash"] == start[1]["config_hash"]  # a base model does not depend on lr
    staged = [expand(parse_spec({**s, "defaults": {**s["defaults"], "student_sft": {"max_steps": 3}}},
                                registry=lambda: ["kl"]))[0] for s in (plain, other_lr)]
    assert staged[0]["train"]["student_sft"] == {"max_steps": 3}
    assert staged[0]["config_hash"] != staged[1]["config_hash"]


def test_student_stage_runs_once_and_alignment_reads_the_exact_teacher(tmp_path, monkeypatch):
    import torch

    from rlkd.bench import cell as cell_module
    from rlkd.bench.cell import run_cell_inprocess
    from rlkd.eval.alignment import compare_models
    from rlkd.eval.generate import load_checkpoint

    if cell_module._shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    words = "the cat sat on a mat while dogs ran far away from home and birds sang".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n"
                            for i in range(12)))
    cells = {c["method"]: c for c in expand(parse_spec(_staged_spec(docs), registry=lambda: ["kl"]))}
    cache, shared = tmp_path / "res" / ".cache", tmp_path / "res" / ".shared"
    start = run_cell_inprocess(cells["Start"], tmp_path / "start", cache_dir=cache, shared_dir=shared)
    stages = [p for p in shared.iterdir() if p.name.startswith("student_sft-")]
    assert len(stages) == 1 and (stages[0] / "done.json").is_file()
    stage_log = [json.loads(line) for line in (stages[0] / "train_log.jsonl").read_text().splitlines()]
    assert len(stage_log) == 2

    # The Start row is the stage's student, scored on the training sequences against the teacher;
    # recomputed here with plain models (no cache) it must agree.
    student, tokenizer = load_checkpoint(str(stages[0] / "export"), dtype="float32", device="cpu")
    teacher, _ = load_checkpoint(str(cache / "tiny-teacher"), dtype="float32", device="cpu")
    from rlkd.bench.cell import _alignment_slices

    slices = _alignment_slices(cells["Start"], {"source": "train"}, tokenizer, cache)
    assert len(slices) == 4 and all(len(s) == 32 for s in slices)
    with torch.no_grad():
        direct = compare_models(student, teacher, slices, batch_size=2).metrics
    for key in ("cr@1", "cr@3", "mor@5", "mor@20"):
        assert start[key] == pytest.approx(direct[key], abs=1e-9), key
    assert start["ppl"] == pytest.approx(direct["ppl_student"], rel=1e-5)
    assert start["teacher_ppl"] == pytest.approx(direct["ppl_teacher"], rel=1e-5)
    assert {"heldout_cr@1", "heldout_ppl"} <= set(start)

    def no_training(*args, **kwargs):
        raise AssertionError("the stage and the teacher logits must be reused")

    monkeypatch.setattr(cell_module, "_train", no_training)
    teacher_row = run_cell_inprocess(cells["Teacher"], tmp_path / "teacher", cache_dir=cache, shared_dir=shared)
    assert teacher_row["cr@5"] == 100.0 and teacher_row["ppl"] == pytest.approx(teacher_row["teacher_ppl"], rel=1e-5)


def test_a_cell_trained_by_its_slurm_job_is_evaluated_without_retraining(tmp_path, monkeypatch, capsys):
    import yaml

    from rlkd.bench import cell as cell_module
    from rlkd.bench.cli import main as bench_main
    from rlkd.bench.cell import run_cell_inprocess
    from rlkd.engine.train import run_training

    if cell_module._shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    words = "one two three four five six seven eight nine ten".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(words[(i * j) % 10] for j in range(50))}) + "\n"
                            for i in range(12)))
    spec_path = tmp_path / "staged.yaml"
    spec_path.write_text(yaml.safe_dump(_staged_spec(docs)))
    results = tmp_path / "results"
    cells = {c["method"]: c for c in expand(parse_spec(_staged_spec(docs), registry=lambda: ["kl"]))}
    kl = cells["KL"]

    assert bench_main([str(spec_path), "--dry-run", "--slurm", "--results-dir", str(results)]) == 0
    assert "student_sft stage has not run yet" in capsys.readouterr().out  # the stage comes first
    cache, shared = results / ".cache", results / ".shared"
    run_cell_inprocess(cells["Start"], results / ".staging" / cells["Start"]["id"], cache_dir=cache,
                       shared_dir=shared)
    assert bench_main([str(spec_path), "--dry-run", "--slurm", "--results-dir", str(results)]) == 0
    launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rlkd launch slurm")]
    assert len(launches) == 1 and kl["id"][:60] in launches[0]
    job_config = results / ".slurm" / f"{kl['id']}.yaml"
    assert "student_sft-pretrain-" in yaml.safe_load(job_config.read_text())["models"]["student"]

    run_training(job_config)  # what the Slurm job runs
    monkeypatch.setattr("rlkd.engine.train.run_training",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    metrics = run_cell_inprocess(kl, results / ".staging" / kl["id"], cache_dir=cache, shared_dir=shared)
    assert {"cr@1", "mor@20", "ppl", "heldout_cr@1", "final_train_loss"} <= set(metrics)
