"""The embedded benchmark behind a bare `rlkd bench`: offline, CPU, about 15 minutes on 2 cores.

1. A synthetic corpus from :class:`rlkd.bench.synthetic.MarkovSource`, whose true next-token
   distributions are multi-modal and known exactly, written as pre-tokenized JSONL.
2. A small Llama teacher trained on it with cross-entropy (through the engine, cached).
3. A smaller student distilled from that teacher with KL, RKL, JSD, TVD and AKL, each with and
   without the ranking loss, plus Rank-only, over several seeds (the engine again).
4. Every student scored against the teacher and against the true distribution (CR@k, MOR@k, PPL,
   KL(true‖student)) on held-out sequences, and on a downstream-style task from the same source:
   greedy continuation of a prompt, compared with the source's most likely path (exact match,
   token accuracy, ROUGE).
Results go to results/default/ (tables, CSV, LaTeX, plots). Nothing here is tuned to favour +R:
the student settings were fixed before looking at any ±R comparison and are the same for all cells.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from rlkd.bench.spec import config_hash, expand, filter_cells, parse_spec
from rlkd.bench.store import write_json_atomic
from rlkd.bench.synthetic import FIRST_CONTENT, MarkovSource, SourceConfig, read_corpus, token_text, write_corpus

SOURCE = SourceConfig(n_states=16, n_content=40, vocab_size=48, seed=0)
SEQ_TOKENS = 64  # content tokens per sequence (plus BOS)
PROMPT_TOKENS, ANSWER_TOKENS = 16, 8


def data_plan(quick: bool) -> dict[str, int]:
    return {"train": 1000 if quick else 3000, "heldout": 100 if quick else 200,
            "downstream": 100 if quick else 200}


def teacher_plan(quick: bool) -> dict[str, Any]:
    return {"hidden": 96, "layers": 3, "heads": 4, "max_steps": 120 if quick else 500, "lr": 2e-3,
            "global_batch": 32, "seed": 1}


def student_plan(quick: bool) -> dict[str, Any]:
    return {"hidden": 48, "layers": 2, "heads": 4, "max_steps": 60 if quick else 250, "lr": 2e-3,
            "global_batch": 32, "seed": 2}


def default_spec(quick: bool) -> dict[str, Any]:
    student = student_plan(quick)
    return {
        "name": "default",
        "description": "Embedded offline benchmark: multi-modal Markov source, tiny Llama teacher and student",
        "layout": "default",
        "defaults": {
            "teacher": "@results/.shared/teacher/export",
            "student": "@results/.shared/student_init",
            "dataset": "tokenized",
            "data_path": "@results/.data/train.jsonl",
            "seq_len": SEQ_TOKENS + 1,
            "global_batch": student["global_batch"],
            "micro_batch": student["global_batch"],
            "max_steps": student["max_steps"],
            "lr": student["lr"],
            "schedule": "cosine",
            "warmup_steps": 10,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "precision": "fp32",
        },
        "eval": {"kind": "synthetic", "heldout": "@results/.data/heldout.jsonl",
                 "downstream": "@results/.data/downstream.jsonl", "source_seed": SOURCE.seed},
        "tasks": [{"name": "synthetic"}],
        "objectives": ["kl", "rkl", "jsd", "tvd", "akl"],
        "variants": ["none", "R", "rank_only"],
        # k=5 as the paper's fused setting; the vocabulary here is only 40 content tokens.
        "ranking": {"k": 5, "rank_weight": 2.0, "base_weight": 1.0},
        "seeds": [1] if quick else [1, 2],
        "references": ["teacher", "student"],
    }


# ---------------------------------------------------------------------------------------------
# Preparation: data, the initial student, the trained teacher


def prepare_data(root: Path, quick: bool) -> dict[str, Path]:
    data = root / ".data"
    plan = data_plan(quick)
    marker = data / "plan.json"
    wanted = {"source": SOURCE.__dict__, "plan": plan, "seq_tokens": SEQ_TOKENS,
              "prompt": PROMPT_TOKENS, "answer": ANSWER_TOKENS}
    paths = {name: data / f"{name}.jsonl" for name in ("train", "heldout", "downstream")}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and all(p.is_file() for p in paths.values()):
        return paths
    source = MarkovSource(SOURCE)
    write_corpus(source, paths["train"], plan["train"], SEQ_TOKENS, seed=100)
    write_corpus(source, paths["heldout"], plan["heldout"], SEQ_TOKENS, seed=200)
    rng = np.random.default_rng(300)
    lines = []
    for _ in range(plan["downstream"]):
        prompt = source.sample(rng, PROMPT_TOKENS)
        lines.append(json.dumps({"prompt": prompt, "answer": source.greedy_continuation(prompt, ANSWER_TOKENS)}))
    tmp = paths["downstream"].with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(paths["downstream"])
    write_json_atomic(marker, wanted)
    return paths


def prepare_models(root: Path, quick: bool, train_path: Path) -> None:
    from rlkd.bench.cell import tiny_llama

    shared = root / ".shared"
    student, teacher = student_plan(quick), teacher_plan(quick)
    tiny_llama(shared / "student_init", hidden=student["hidden"], layers=student["layers"], heads=student["heads"],
               vocab_size=SOURCE.vocab_size, seed=student["seed"], max_positions=128)
    key = config_hash({"teacher": teacher, "source": SOURCE.__dict__, "data": data_plan(quick)})[:12]
    teacher_dir = shared / "teacher"
    done = teacher_dir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return
    init = tiny_llama(shared / f"teacher_init-{key}", hidden=teacher["hidden"], layers=teacher["layers"],
                      heads=teacher["heads"], vocab_size=SOURCE.vocab_size, seed=teacher["seed"], max_positions=128)
    from rlkd.engine.train import run_training

    print(f"[rlkd bench] training the teacher ({teacher['max_steps']} steps, cross-entropy on the synthetic corpus)")
    tree = {
        "output_dir": str(teacher_dir), "seed": teacher["seed"],
        "models": {"teacher": str(init), "student": str(init), "dtype": "float32"},
        "data": {"task": "tokenized", "path": str(train_path), "max_length": SEQ_TOKENS + 1},
        "loss": {"objective": "ce", "ranking": {"enabled": False}},
        "train": {"micro_batch_size": teacher["global_batch"], "grad_accum": 1, "max_steps": teacher["max_steps"],
                  "lr": teacher["lr"], "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 20, "grad_clip": 1.0},
        "checkpoint": {"every_steps": 100},
        "progress_bar": True,
    }
    run_training(tree, resume=True)
    write_json_atomic(done, {"key": key, "config": tree})


# ---------------------------------------------------------------------------------------------
# Evaluation of one model


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def _logits(model, sequences: list[list[int]], batch: int = 50):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch):
            ids = torch.tensor(sequences[i:i + batch])
            out.append(model(input_ids=ids).logits.float())
    return torch.cat(out)


def greedy_answers(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuation restricted to content tokens (the source never emits PAD/BOS/EOS)."""
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[:, -1, :].float()
            logits[:, :FIRST_CONTENT] = float("-inf")
            logits[:, FIRST_CONTENT + SOURCE.n_content:] = float("-inf")
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]):].tolist()


def score_logits(student, teacher, truth, targets) -> dict[str, float]:
    """Alignment metrics of ``student`` logits [N, L, V] against ``teacher`` logits (or None) and the
    true distributions ``truth`` [N, L, V] (float64 probabilities); ``targets`` [N, L] next tokens."""
    import torch

    from rlkd.eval.alignment import alignment_from_logits

    n = student.shape[0]
    metrics: dict[str, float] = {}
    if teacher is not None:
        vs_teacher = alignment_from_logits((student[i], teacher[i], targets[i]) for i in range(n))
        metrics["ppl"] = vs_teacher.metrics["ppl_student"]
        metrics.update({k: v for k, v in vs_teacher.metrics.items() if k[:3] in ("cr@", "mor") and "corpus" not in k})
    # Zero-probability ids (specials, unused) get a finite floor so top-k stays well defined.
    true_logits = torch.log(truth.clamp_min(1e-30)).float()
    vs_truth = alignment_from_logits((student[i], true_logits[i], targets[i]) for i in range(n))
    metrics.setdefault("ppl", vs_truth.metrics["ppl_student"])
    metrics.update({f"true_{k}": v for k, v in vs_truth.metrics.items()
                    if k[:3] in ("cr@", "mor") and "corpus" not in k})
    log_q = torch.log_softmax(student.double(), dim=-1)
    log_p = torch.log(truth.clamp_min(1e-300))
    kl = torch.where(truth > 0, truth * (log_p - log_q), torch.zeros((), dtype=torch.float64))
    metrics["true_kl"] = float(kl.sum(-1).mean())
    return metrics


def score_answers(answers: list[list[int]], references: list[list[int]]) -> dict[str, float]:
    """Exact match and token accuracy (%) and ROUGE-1/2/L F (x100, rouge-score) of continuations."""
    from rlkd.eval.rouge import rouge_example

    n = len(references)
    exact = sum(a == r for a, r in zip(answers, references))
    hits = sum(sum(x == y for x, y in zip(a, r)) / len(r) for a, r in zip(answers, references))
    rouge = [rouge_example(token_text(a), token_text(r)) for a, r in zip(answers, references)]
    metrics = {"exact_match": 100.0 * exact / n, "token_accuracy": 100.0 * hits / n}
    for key in ("rouge1", "rouge2", "rougeL"):
        metrics[key] = sum(r[key] for r in rouge) / n
    return metrics


def evaluate_synthetic(evaluation: dict[str, Any], model_path: str, teacher_path: str | None) -> dict[str, float]:
    import torch

    source = MarkovSource(SourceConfig(**{**SOURCE.__dict__, "seed": evaluation.get("source_seed", SOURCE.seed)}))
    heldout = read_corpus(Path(evaluation["heldout"]))
    model = _load(model_path)
    student = _logits(model, heldout)[:, :-1]
    teacher = _logits(_load(teacher_path), heldout)[:, :-1] if teacher_path else None
    targets = torch.tensor(heldout)[:, 1:]
    truth = torch.tensor(np.stack([source.true_distributions(s)[:-1] for s in heldout]), dtype=torch.float64)
    metrics = score_logits(student, teacher, truth, targets)
    rows = [json.loads(line) for line in Path(evaluation["downstream"]).read_text().splitlines() if line.strip()]
    answers = greedy_answers(model, [r["prompt"] for r in rows], ANSWER_TOKENS)
    metrics.update(score_answers(answers, [r["answer"] for r in rows]))
    return metrics


def source_reference(root: Path) -> dict[str, float]:
    """What the true source itself scores: the floor for PPL and the ceiling for the task."""
    source = MarkovSource(SOURCE)
    heldout = read_corpus(root / ".data" / "heldout.jsonl")
    nll = float(np.mean([source.entropy_rate_nats(s) for s in heldout]))
    per_slice_ppl = float(np.mean([math.exp(source.entropy_rate_nats(s)) for s in heldout]))
    return {"source_ppl_per_slice_mean": per_slice_ppl, "source_ppl_corpus": math.exp(nll)}


# ---------------------------------------------------------------------------------------------


def run_default(args) -> int:
    import time

    from rlkd.bench.cli import run_cells

    quick = bool(getattr(args, "quick", False))
    root = getattr(args, "results_dir", None) or Path("results") / "default"
    root.mkdir(parents=True, exist_ok=True)
    raw = default_spec(quick)
    if getattr(args, "seeds", None):
        from rlkd.bench.cli import parse_seeds

        raw["seeds"] = parse_seeds(args.seeds)
    spec = parse_spec(raw, source="<embedded default benchmark>")
    cells = filter_cells(expand(spec), getattr(args, "only", None))
    if getattr(args, "dry_run", False):
        from rlkd.bench.cli import _dry_run

        return _dry_run(cells, root, args)
    started = time.time()
    # One thread per cell process: with several cells at once (and other work) on few cores, more
    # OpenMP threads than cores makes small models many times slower, not faster.
    jobs = getattr(args, "jobs", None) or min(2, os.cpu_count() or 1)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    paths = prepare_data(root, quick)
    prepare_models(root, quick, paths["train"])
    write_json_atomic(root / "source.json", {"source": SOURCE.__dict__, "data": data_plan(quick),
                                             "teacher": teacher_plan(quick), "student": student_plan(quick),
                                             **source_reference(root)})
    code = run_cells(cells, root, spec_source="embedded default (rlkd/bench/default.py)", layout="default",
                     jobs=jobs, retry_failed=not getattr(args, "skip_failed", False),
                     tables=not getattr(args, "no_table", False), threads=1)
    print(f"[rlkd bench] embedded benchmark finished in {(time.time() - started) / 60:.1f} min; "
          f"tables and plots in {root}/ (table.md, table.csv, table.tex, alignment*.png)")
    return code
