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
