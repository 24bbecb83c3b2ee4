"""From a cell to the engine: its complete run config, model references, cached stages, teacher
generations, and Slurm-trained cells collected without retraining."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from rlkd.bench.executor import resolve_results_refs
from rlkd.bench.spec import expand, parse_spec
from rlkd.bench.stages import engine_tree
from rlkd.config import load_config
from rlkd.factory import ModelRefError, shared_tokenizer


def _cell(**run):
    raw = {"name": "c", "tasks": [{"name": "gsm8k"}], "objectives": [{"name": "akl", "params": {"mu": 0.3}}],
           "variants": ["R_dynamic"], "seeds": [5],
           "defaults": {"models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"},
                        "loss": {"ranking": {"k": 7}}, **run}}
    return expand(parse_spec(raw))[0]


def test_a_cell_run_is_the_engine_config_plus_output_and_resolved_models(tmp_path):
    cell = _cell(train={"lr": 3e-5, "micro_batch_size": 4, "grad_accum": 16, "epochs": 2},
                 data={"task": "gsm8k", "max_length": 1024, "limit": 1000}, checkpoint={"every_steps": 7})
    tree = engine_tree(cell.run, tmp_path / "out", cache_dir=tmp_path)
    assert tree["output_dir"] == str(tmp_path / "out") and tree["seed"] == 5 and tree["progress_bar"] is False
    cfg = load_config(base=tree)
    assert (cfg.models.teacher, cfg.models.student) == ("T", "S")
    assert (cfg.data.task, cfg.data.max_length, cfg.data.limit) == ("gsm8k", 1024, 1000)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs, cfg.train.lr) == (4, 16, 2, 3e-5)
    assert cfg.checkpoint.every_steps == 7
    assert cfg.loss.objective == "akl" and cfg.loss.params == {"mu": 0.3}
    r = cfg.loss.ranking
    assert (r.enabled, r.mode, r.correlation, r.k, r.rank_weight, r.base_weight) == (True, "dynamic", "spearman", 7, 2.0, 1.0)
    cached = engine_tree(cell.run, tmp_path / "out", cache_dir=tmp_path, teacher_cache=True)
    assert cached["teacher_cache"] == str(tmp_path / "teacher_logits")


def test_epochs_become_steps_from_the_samples_and_ranks():
    from rlkd.engine.session import with_epoch_steps

    cfg = load_config(base={"output_dir": "o", "models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"},
                            "train": {"epochs": 2, "micro_batch_size": 4, "grad_accum": 8}})
    assert with_epoch_steps(cfg, 1000, world_size=1).train.max_steps == 63   # ceil(2 * 1000 / 32)
    assert with_epoch_steps(cfg, 1000, world_size=2).train.max_steps == 32   # ceil(2 * 1000 / 64)
    plain = load_config(base={"output_dir": "o", "models": {"teacher": "T", "student": "S"}, "data": {"task": "gsm8k"},
                              "train": {"max_steps": 9}})
    assert with_epoch_steps(plain, 1000, world_size=4).train.max_steps == 9


def test_results_refs_resolve_without_entering_the_hash(tmp_path):
    cell = {"run": {"data": {"path": "@results/.data/x.jsonl"}, "list": ["@results/a", "plain"]}, "n": 3}
    assert resolve_results_refs(cell, tmp_path) == {
        "run": {"data": {"path": str(tmp_path / ".data/x.jsonl")}, "list": [str(tmp_path / "a"), "plain"]}, "n": 3}


def test_tiny_models_are_named_in_dry_runs_and_built_otherwise(tmp_path):
    cell = _cell(models={"teacher": "@tiny/teacher", "student": "@tiny/student"})
    tree = engine_tree(cell.run, tmp_path / "o", cache_dir=tmp_path, create_models=False)
    assert tree["models"]["teacher"] == str(tmp_path / "tiny-teacher") and not (tmp_path / "tiny-teacher").exists()
    with pytest.raises(ModelRefError, match="unknown tiny model"):
        engine_tree(_cell(models={"teacher": "@tiny/huge", "student": "S"}).run, tmp_path / "o", cache_dir=tmp_path)


def test_teacher_generations_replace_responses_once_and_are_reused(tmp_path, monkeypatch):
    from rlkd.config import DataConfig
    from rlkd.data.jsonl import DataError
    from rlkd.eval.teacher_generations import ensure_teacher_generations
    from rlkd.factory import resolve_model

    if shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = resolve_model("@tiny/teacher", tmp_path / "cache")
    selected = DataConfig(task="gsm8k", path=str(data), limit=3)
    out = ensure_teacher_generations(selected, teacher, tmp_path / "shared", max_new_tokens=4, batch_size=2)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in written] == [r["question"] for r in rows[:3]]  # order and limit kept
    assert all(w["answer"] != r["answer"] for w, r in zip(written, rows))  # a random tiny model's text
    provenance = json.loads(out.with_suffix(".provenance.json").read_text())
    assert provenance["rows"] == 3 and provenance["decoding"]["max_new_tokens"] == 4
    assert provenance["decoding"]["do_sample"] is False and data.name in provenance["sources_sha256"]

    def no_generation(*args, **kwargs):
        raise AssertionError("cached generations must be reused")

    monkeypatch.setattr("rlkd.eval.generate.generate_texts", no_generation)
    assert ensure_teacher_generations(selected, teacher, tmp_path / "shared", max_new_tokens=4, batch_size=2) == out
    documents = tmp_path / "docs.jsonl"
    documents.write_text(json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(DataError, match="prompt/response task"):
        ensure_teacher_generations(DataConfig(task="pretrain", path=str(documents)), teacher, tmp_path / "s2")


def _staged_spec(docs: Path, **student_sft):
    return {"name": "staged", "tasks": [{"name": "pretrain"}], "objectives": ["kl"], "variants": ["none"],
            "seeds": [1], "references": ["teacher", "student"], "teacher_cache": True,
            "defaults": {"models": {"teacher": "@tiny/teacher", "student": "@tiny/student", "dtype": "float32"},
                         "data": {"task": "pretrain", "path": str(docs), "limit": 3, "max_samples": 4,
                                  "max_length": 32},
                         "train": {"micro_batch_size": 2, "max_steps": 1}},
            "stages": {"student_sft": {"data": {"skip": 3, "limit": None, "max_samples": None},
                                       "train": {"max_steps": 2, "lr": 1e-3}, **student_sft}},
            "eval": {"kind": "alignment", "source": "train", "batch_size": 2,
                     "extra_sets": {"heldout": {"text_path": str(docs), "skip_rows": 6, "slice_len": 32,
                                                "max_slices": 3}}}}


def test_reference_rows_carry_the_training_keys_only_when_staged():
    base = {"models": {"teacher": "T", "student": "S"}, "data": {"task": "pretrain"}}
    plain = {"name": "p", "tasks": [{"name": "pretrain"}], "objectives": ["kl"], "variants": ["none"],
             "references": ["student"], "defaults": {**base, "train": {"lr": 1.0}}}
    other_lr = {**plain, "defaults": {**base, "train": {"lr": 2.0}}}
    start = [expand(parse_spec(s))[0] for s in (plain, other_lr)]
    assert start[0].run == {"models": {"teacher": "T", "student": "S"}}
    assert start[0].config_hash == start[1].config_hash  # a base model does not depend on lr
    staged = [expand(parse_spec({**s, "stages": {"student_sft": {"train": {"max_steps": 3}}}}))[0]
              for s in (plain, other_lr)]
    assert staged[0].stages["student"]["train"] == {"lr": 1.0, "max_steps": 3}
    assert staged[0].stages["student"]["loss"] == {"objective": "ce"}
    assert staged[0].config_hash != staged[1].config_hash


@pytest.mark.slow
def test_student_stage_runs_once_and_alignment_reads_the_exact_teacher(tmp_path, monkeypatch):
    import torch

    from rlkd.bench import stages as stages_module
    from rlkd.bench.executor import train_sequences, run_cell_inprocess
    from rlkd.eval.alignment import compare_models
    from rlkd.eval.generate import load_checkpoint

    if shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    words = "the cat sat on a mat while dogs ran far away from home and birds sang".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n"
                            for i in range(12)))
    cells = {c.arm.method: c for c in expand(parse_spec(_staged_spec(docs)))}
    cache, shared = tmp_path / "res" / ".cache", tmp_path / "res" / ".shared"
    start, _ = run_cell_inprocess(cells["Start"], tmp_path / "start", cache_dir=cache, shared_dir=shared)
    stages = [p for p in shared.iterdir() if p.name.startswith("student_sft-") and p.is_dir()]
    assert len(stages) == 1 and (stages[0] / "done.json").is_file()
    stage_log = [json.loads(line) for line in (stages[0] / "train_log.jsonl").read_text().splitlines()]
    assert len(stage_log) == 2

    # The Start row is the stage's student, scored on the training sequences against the teacher;
    # recomputed here with plain models (no cache) it must agree.
    student, tokenizer = load_checkpoint(str(stages[0] / "export"), dtype="float32", device="cpu")
    teacher, _ = load_checkpoint(str(cache / "tiny-teacher"), dtype="float32", device="cpu")
    slices = train_sequences(cells["Start"], cache)(tokenizer)
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

    monkeypatch.setattr(stages_module, "train", no_training)
    teacher_row, _ = run_cell_inprocess(cells["Teacher"], tmp_path / "teacher", cache_dir=cache, shared_dir=shared)
    assert teacher_row["cr@5"] == 100.0 and teacher_row["ppl"] == pytest.approx(teacher_row["teacher_ppl"], rel=1e-5)


@pytest.mark.slow
def test_a_cell_trained_by_its_slurm_job_is_evaluated_without_retraining(tmp_path, monkeypatch, capsys):
    import yaml

    from rlkd.bench.cli import main as bench_main
    from rlkd.bench.executor import run_cell_inprocess
    from rlkd.engine.train import run_training

    if shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    words = "one two three four five six seven eight nine ten".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(words[(i * j) % 10] for j in range(50))}) + "\n"
                            for i in range(12)))
    spec_path = tmp_path / "staged.yaml"
    spec_path.write_text(yaml.safe_dump(_staged_spec(docs)))
    results = tmp_path / "results"
    cells = {c.arm.method: c for c in expand(parse_spec(_staged_spec(docs)))}
    kl = cells["KL"]

    assert bench_main([str(spec_path), "--dry-run", "--slurm", "--results-dir", str(results)]) == 0
    assert "student_sft stage has not run yet" in capsys.readouterr().out  # the stage comes first
    cache, shared = results / ".cache", results / ".shared"
    run_cell_inprocess(cells["Start"], results / ".staging" / cells["Start"].id, cache_dir=cache,
                       shared_dir=shared)
    assert bench_main([str(spec_path), "--dry-run", "--slurm", "--results-dir", str(results)]) == 0
    launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rlkd launch slurm")]
    assert len(launches) == 1 and kl.id[:60] in launches[0]
    job_config = results / ".slurm" / f"{kl.id}.yaml"
    assert "student_sft-pretrain-" in yaml.safe_load(job_config.read_text())["models"]["student"]

    run_training(job_config)  # what the Slurm job runs
    monkeypatch.setattr("rlkd.engine.train.run_training",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    metrics, _ = run_cell_inprocess(kl, results / ".staging" / kl.id, cache_dir=cache, shared_dir=shared)
    assert {"cr@1", "mor@20", "ppl", "heldout_cr@1", "final_train_loss"} <= set(metrics)


def _heal(lr: float = 1e-3):
    return {"models": {"teacher": "@tiny/teacher", "dtype": "float32"},
            "data": {"task": "pretrain", "path": None, "skip": 6, "max_length": 32},
            "train": {"micro_batch_size": 2, "max_steps": 3, "lr": lr},
            "loss": {"objective": "kl", "ranking": {"enabled": False}}}


def _healed_spec(docs: Path, name: str, heal: dict, **stages):
    raw = _staged_spec(docs)
    heal = json.loads(json.dumps(heal))
    heal["data"]["path"] = str(docs)
    return {**raw, "name": name, "stages": {"student_heal": heal, **stages}}


@pytest.mark.slow
def test_heal_stage_is_shared_across_specs_and_the_student_stage_starts_from_it(tmp_path, monkeypatch):
    import torch

    from rlkd.bench import stages as stages_module
    from rlkd.bench.executor import run_cell_inprocess
    from rlkd.bench.spec import SpecError
    from rlkd.eval.generate import load_checkpoint

    if shared_tokenizer() is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    words = "a b c d e f g h i j k l m n o p".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(words[(i * j + j) % 16] for j in range(60))}) + "\n"
                            for i in range(12)))
    sft = {"student_sft": {"data": {"skip": 3, "limit": None, "max_samples": None}, "train": {"max_steps": 2}}}
    a = {c.arm.method: c for c in expand(parse_spec(_healed_spec(docs, "a", _heal(), **sft)))}
    b = {c.arm.method: c for c in expand(parse_spec(_healed_spec(docs, "b", _heal())))}
    assert a["Start"].stages["student_heal"]["loss"]["objective"] == "kl"
    assert a["Start"].stages["student_heal"]["models"]["student"] == "@tiny/student"
    other = expand(parse_spec(_healed_spec(docs, "b", _heal(lr=2e-3))))
    assert {c.config_hash for c in other}.isdisjoint(c.config_hash for c in b.values())  # healing enters every cell

    results = tmp_path / "results"
    for spec_name, cells in (("a", a), ("b", b)):
        res = results / spec_name
        run_cell_inprocess(cells["Start"], tmp_path / f"start-{spec_name}", cache_dir=res / ".cache",
                           shared_dir=res / ".shared")
        if spec_name == "a":  # spec b must find a's healing and not train again
            monkeypatch.setattr(stages_module, "train", lambda *x, **y: (_ for _ in ()).throw(AssertionError("retrained")))
    heals = [p for p in (results / ".stages").iterdir() if p.is_dir()]
    assert len(heals) == 1 and heals[0].name.startswith("student_heal-")
    log = [json.loads(line) for line in (heals[0] / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(row["base"] > 0 for row in log)  # a KL from the teacher, not cross-entropy
    sft_done = next((results / "a" / ".shared").glob("student_sft-*/done.json"))
    assert json.loads(sft_done.read_text())["config"]["models"]["student"] == str(heals[0] / "export")
    assert set(stages_module.stage_seconds(a["Start"], results / "a" / ".shared")) == {"student_heal", "student_sft"}
    from rlkd.bench.orchestrate import RUN_TIMES, record_run_times

    def run(started, minutes, jobs):
        return {"started": started, "finished": "later", "wall_minutes": minutes, "jobs": jobs, "cells_run": 1}

    record_run_times(list(a.values()), results / "a", run=run("t1", 1.5, 1))
    times = json.loads((results / "a" / RUN_TIMES).read_text())
    (results / "a" / RUN_TIMES).write_text(json.dumps({**times, "note": "quiet machine"}))
    record_run_times(list(a.values()), results / "a", run=run("t2", 0.5, 2))  # a resumed run adds its wall time
    times = json.loads((results / "a" / RUN_TIMES).read_text())
    assert set(times["stage_minutes"]) == {"student_heal", "student_sft"} and times["wall_minutes_total"] == 2.0
    assert [r["jobs"] for r in times["runs"]] == [1, 2] and times["note"] == "quiet machine"

    # The healed student differs from the configured one, and spec b's Start row scores it.
    healed, _ = load_checkpoint(str(heals[0] / "export"), dtype="float32", device="cpu")
    raw, _ = load_checkpoint(str(results / "a" / ".cache" / "tiny-student"), dtype="float32", device="cpu")
    assert not torch.equal(healed.lm_head.weight, raw.lm_head.weight)
    teacher, student = stages_module.stage_models(b["Start"], results / "b" / ".shared", results / "b" / ".cache")
    assert student == str(heals[0] / "export")

    bad = _healed_spec(docs, "c", {**_heal(), "train": {"max_stepz": 3}})
    with pytest.raises(SpecError, match=r"(?s)stages\.student_heal.*train\.max_stepz: unknown key"):
        expand(parse_spec(bad))


def test_a_parallel_run_trains_each_missing_stage_first_in_one_cell_with_every_core(tmp_path, monkeypatch):
    """With --jobs 2 a cell gets one thread; the stage it waits for must not run at that one thread
    while the other slot idles. The first cell needing each missing stage runs alone, with no
    thread limit, then the rest in parallel at one thread each."""
    from rlkd.bench import orchestrate
    from rlkd.bench.stages import finished_stage, stage_dir

    docs = tmp_path / "docs.jsonl"
    docs.write_text("")
    cells = expand(parse_spec(_healed_spec(docs, "a", _heal())))
    out = tmp_path / "results" / "a"
    runs: list[tuple[str, int | None, bool]] = []

    class FakeExecutor:
        def __init__(self, results_dir, *, threads=None, reuse_processes=False):
            self.threads = threads

        def run(self, cell, workdir):
            heal = stage_dir(cell, "student_heal", out / ".shared")
            runs.append((cell.id, self.threads, finished_stage(cell, "student_heal", out / ".shared") is None))
            (heal / "export").mkdir(parents=True, exist_ok=True)  # what the stage leaves behind
            # atomically, as the real stage does: the other cell's thread may be reading it
            temporary = heal / f"done.json.{threading.get_ident()}"
            temporary.write_text("{}")
            os.replace(temporary, heal / "done.json")
            return {"cr@1": 1.0}, {}

    monkeypatch.setattr(orchestrate, "LocalExecutor", FakeExecutor)
    assert orchestrate.run_cells(cells, out, spec_source="a.yaml", layout=None, jobs=2, tables=False) == 0
    assert len(runs) == len(cells) > 2
    first, rest = runs[0], runs[1:]
    assert first[1] is None and first[2]  # the stage ran in the first cell, with no thread limit
    assert all(threads == 1 and not missing for _, threads, missing in rest)
    assert sorted(r[0] for r in runs) == sorted(c.id for c in cells)  # each cell exactly once
    times = json.loads((out / orchestrate.RUN_TIMES).read_text())
    assert len(times["runs"]) == 1 and times["runs"][0]["cells_run"] == len(cells) and times["runs"][0]["finished"]

    # Nothing is missing any more: a second parallel run starts no cell alone.
    assert orchestrate.stage_leaders(cells, tmp_path / "elsewhere") == cells[:1]
    assert orchestrate.stage_leaders(cells, out) == []


def test_a_killed_run_keeps_its_wall_time_up_to_its_last_finished_cell(tmp_path):
    """Issue 29 runs over several sittings, each ended by a kill: every invocation's wall time must
    be in run_times.json, not only those that reached the end."""
    from rlkd.bench import orchestrate

    docs = tmp_path / "docs.jsonl"
    docs.write_text("")
    cells = expand(parse_spec(_healed_spec(docs, "a", _heal())))
    out = tmp_path / "results" / "a"

    class KilledAtTheSecondCell:
        def __init__(self, results_dir, **_):
            self.calls = 0

        def run(self, cell, workdir):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt  # what a kill leaves of this invocation: nothing after this point
            return {"cr@1": 1.0}, {}

    with pytest.raises(KeyboardInterrupt):
        orchestrate.run_cells(cells, out, spec_source="a.yaml", layout=None, jobs=1, tables=False,
                              executor=KilledAtTheSecondCell(out))
    (killed,) = json.loads((out / orchestrate.RUN_TIMES).read_text())["runs"]
    assert killed["finished"] is None and killed["cells_run"] == 1 and killed["wall_minutes"] >= 0
    # the resumed run adds its own entry and keeps the killed one
    assert orchestrate.run_cells(cells, out, spec_source="a.yaml", layout=None, jobs=1, tables=False,
                                 executor=type("Fine", (), {"run": lambda self, c, w: ({"cr@1": 1.0}, {})})()) == 0
    first, resumed = json.loads((out / orchestrate.RUN_TIMES).read_text())["runs"]
    assert first == killed and resumed["finished"] and resumed["cells_run"] == len(cells) - 1


def test_each_cell_records_the_export_of_its_stages_and_the_table_says_when_cells_differ(tmp_path, monkeypatch):
    """A stage is keyed by its config, and a re-run of it (a fresh machine: the stage lives outside
    git) is not bit-identical on CPU. Each cell's provenance records the content hash of the exports
    it started from, and the table notes cells that started from different ones."""
    import hashlib

    from rlkd.bench import orchestrate
    from rlkd.bench.stages import stage_dir
    from rlkd.bench.store import load_results
    from rlkd.bench.report.tables import stage_version_notes

    docs = tmp_path / "docs.jsonl"
    docs.write_text("")
    cells = expand(parse_spec(_healed_spec(docs, "a", _heal())))[:3]
    out = tmp_path / "results" / "a"
    weights = {"first": b"healed once", "second": b"healed again, slightly differently"}
    current = {"run": "first"}

    class FakeExecutor:
        def __init__(self, results_dir, *, threads=None, reuse_processes=False):
            pass

        def run(self, cell, workdir):
            heal = stage_dir(cell, "student_heal", out / ".shared")
            if not (heal / "done.json").is_file():  # what a finished stage leaves behind
                (heal / "export").mkdir(parents=True, exist_ok=True)
                (heal / "export" / "model.safetensors").write_bytes(weights[current["run"]])
                (heal / "done.json").write_text("{}")  # as a stage finished before hashes were recorded
            return {"cr@1": 1.0}, {}

    monkeypatch.setattr(orchestrate, "LocalExecutor", FakeExecutor)
    assert orchestrate.run_cells(cells[:2], out, spec_source="a.yaml", layout=None, jobs=1, tables=False) == 0
    assert stage_version_notes(load_results(out)) == []  # both started from the same export

    # A fresh machine: the stage is gone, runs again and gives other weights.
    heal = stage_dir(cells[0], "student_heal", out / ".shared")
    import shutil

    shutil.rmtree(heal)
    current["run"] = "second"
    assert orchestrate.run_cells(cells, out, spec_source="a.yaml", layout=None, jobs=1, tables=False) == 0

    def expected(content: bytes) -> str:  # the checkpoint hash: sha256 over "name\0sha256(file)\n"
        return hashlib.sha256(f"model.safetensors\0{hashlib.sha256(content).hexdigest()}\n".encode()).hexdigest()

    recorded = {c.id: json.loads((out / c.id / "provenance.json").read_text())["stages"] for c in cells}
    assert recorded[cells[0].id] == recorded[cells[1].id] == {"student_heal": expected(weights["first"])}
    assert recorded[cells[2].id] == {"student_heal": expected(weights["second"])}
    assert json.loads((heal / "done.json").read_text())["export_sha256"] == expected(weights["second"])
    notes = stage_version_notes(load_results(out))
    assert notes[0].startswith("These cells started from 2 different exports")
    assert f"student_heal@{expected(weights['first'])[:10]}: 2 cell(s)" in notes[1]
    assert f"student_heal@{expected(weights['second'])[:10]}: 1 cell(s): `{cells[2].id}`" in notes[2]

    # The same grouping tells cells that ran on other code (a sha and a dirty flag recorded apart).
    from rlkd.bench.report.tables import code_version_notes

    assert code_version_notes(load_results(out)) == []
    moved = out / cells[1].id / "provenance.json"
    moved.write_text(json.dumps({**json.loads(moved.read_text()), "git_sha": "f" * 40, "git_dirty": True}))
    notes = code_version_notes(load_results(out))
    assert notes[0].startswith("These cells ran on 2 different code versions")
    assert notes[2] == f"ffffffffff (uncommitted changes): 1 cell(s): `{cells[1].id}`"


def test_a_cell_from_another_stage_export_than_the_tables_is_refused(tmp_path, monkeypatch):
    """A healing re-run on another kind of CPU gave another export: a new cell started from it must
    not join the cells that started from the first one."""
    from rlkd.bench import stages as stages_module

    first, other = "a" * 64, "b" * 64

    def finished(name: str, provenance: str) -> None:
        """A done cell's record as the runner writes it, with this provenance.json text."""
        folder = tmp_path / name
        folder.mkdir()
        config = {"id": name, "spec": "s", "config_hash": name, "task": "dolly", "kind": "distill", "method": "KL",
                  "objective_label": "KL", "variant": "none", "seed": 1, "sweep": {}, "reference": None,
                  "candidate": None, "run": {}, "stages": {}, "teacher_generations": None, "teacher_cache": False,
                  "keep_checkpoints": False, "eval": {}}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "status.json").write_text(json.dumps({"status": "done", "config_hash": name}))
        (folder / "metrics.json").write_text(json.dumps({"score": 1.0}))
        (folder / "provenance.json").write_text(provenance)

    finished("dolly-KL-s1-x", json.dumps({"stages": {"student_heal": first}}))
    finished("old-cell", json.dumps({"git_sha": "0"}))  # before stages were recorded
    finished("torn-cell", '{"stages": ')
    monkeypatch.setattr(stages_module, "stage_fingerprints", lambda cell, shared: {"student_heal": first})
    stages_module.check_stage_exports(None, tmp_path / ".shared", tmp_path)  # the same export: runs
    monkeypatch.setattr(stages_module, "stage_fingerprints", lambda cell, shared: {"student_heal": other})
    with pytest.raises(stages_module.StageExportMismatch) as info:
        stages_module.check_stage_exports(None, tmp_path / ".shared", tmp_path)
    text = str(info.value)
    assert "dolly-KL-s1-x" in text and first[:12] in text and other[:12] in text and "student_heal" in text
    assert "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2" in text  # the way an AVX-512 machine reproduced it
