"""Score a checkpoint on one task: generate, score, and write predictions and metrics.

Layout under ``out_dir``::

    <task>/predictions.jsonl  one record per example, in input order, with its scores
    <task>/metrics.json       metrics + provenance (checkpoint hash, decoding, data hash, versions)
    <task>/per_example.json   {metric: [its value per example, in input order]}: each list averages
                              to the metric (GSM8K: ``score`` 0/100 per example), for paired
                              bootstraps over examples; also returned as ``result["per_example"]``
    <task>/run.json           provenance written at the start; a rerun must match it to resume
    <task>/predictions.partial.jsonl   appended chunk by chunk while generating (removed at the end)

Sampled protocols write one such folder per seed (``<task>/seed<s>/``) and ``<task>/metrics.json``
with the mean and standard deviation over seeds (``<task>/per_example.json``: each example's mean
over seeds). A rerun with the same settings returns the
finished metrics without generating; an interrupted run resumes from the partial file (a torn
last line is ignored). A rerun with different settings into the same folder is refused unless
``overwrite``.

Empty predictions (a model that emits EOS at once, or only whitespace) are kept and scored as
they are: no GSM8K answer (wrong), ROUGE 0; ``n_empty_predictions`` counts them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlkd.data.jsonl import DataError

from . import gsm8k
from .generate import (MINILLM_SEEDS, DecodingConfig, Generation, generate_distributed, greedy,
                       load_checkpoint, minillm_sampling, resolve_checkpoint)
from .provenance import (atomic_write_json, atomic_write_jsonl, checkpoint_fingerprint,
                         file_sha256, model_fingerprint, package_versions, stable_hash, utc_now)
from .rouge import rouge_example, rouge_pkg_available, rouge_pkg_example
from .tasks import Example, TaskSpec, examples_sha256, fit_prompt, get_task, load_examples

CHUNK_EXAMPLES = 64  # examples generated between two appends to the partial file


class RunMismatchError(RuntimeError):
    pass


def score_predictions(task: TaskSpec | str, examples: Sequence[Example], predictions: Sequence[str],
                      with_rouge_pkg: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-example scores and corpus metrics for ``predictions`` (aligned with ``examples``)."""
    task = get_task(task) if isinstance(task, str) else task
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    per_example: list[dict[str, Any]] = []
    if task.metric == "gsm8k":
        for ex, pred in zip(examples, predictions):
            extracted = gsm8k.extract_answer(pred)
            per_example.append({"extracted": extracted, "gold": ex.references[0],
                                "correct": gsm8k.is_correct(pred, ex.references[0])})
        result = gsm8k.GSM8KScore(correct=sum(p["correct"] for p in per_example),
                                  total=len(per_example),
                                  no_answer=sum(p["extracted"] is None for p in per_example))
        return per_example, dict(result.as_dict())
    if task.metric == "rouge":
        use_pkg = with_rouge_pkg and rouge_pkg_available()
        for ex, pred in zip(examples, predictions):
            scores = rouge_example(pred, ex.references, task.rouge_types)
            if use_pkg:
                scores.update(rouge_pkg_example(pred, ex.references, task.rouge_types))
            per_example.append(scores)
        keys = per_example[0].keys() if per_example else ()
        return per_example, {k: sum(p[k] for p in per_example) / len(per_example) for k in keys}
    raise ValueError(f"task {task.name!r} has unknown metric {task.metric!r}")


def per_example_metrics(task: TaskSpec | str, per_example: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """{metric: [value per example]} for the metrics that are means over examples, on the
    metric's own scale so that each list averages to it (GSM8K ``score``: 100 if correct else 0;
    the count ``correct`` is not a mean and is left out)."""
    task = get_task(task) if isinstance(task, str) else task
    if task.metric == "gsm8k":
        return {"score": [100.0 if p["correct"] else 0.0 for p in per_example]}
    keys = per_example[0].keys() if per_example else ()
    return {k: [float(p[k]) for p in per_example] for k in keys}


PER_EXAMPLE_FILE = "per_example.json"


def _with_per_example(result: dict, folder: Path) -> dict:
    """A finished run's metrics with its per-example scores attached (not stored in metrics.json)."""
    path = folder / PER_EXAMPLE_FILE
    if path.is_file():
        result = dict(result, per_example=json.loads(path.read_text()))
    return result


def _read_partial(path: Path, wanted: set[int]) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by an interruption; it is generated again
            if isinstance(record, dict) and record.get("index") in wanted:
                done[record["index"]] = record
    return done


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _run_one(task: TaskSpec, examples: list[Example], prompts: list[str], input_cut: list[bool],
             model, tokenizer,
             decoding: DecodingConfig, folder: Path, provenance: dict, overwrite: bool,
             with_rouge_pkg: bool, show_progress: bool) -> dict:
    metrics_path, run_path = folder / "metrics.json", folder / "run.json"
    partial_path = folder / "predictions.partial.jsonl"
    run_key = provenance["run_key"]
    if run_path.exists() and not overwrite:
        previous = json.loads(run_path.read_text())
        if previous.get("run_key") != run_key:
            raise RunMismatchError(
                f"{folder} holds a run with different settings (checkpoint, data or decoding); "
                "use another --out, or --overwrite to replace it")
        if metrics_path.exists():
            return _with_per_example(json.loads(metrics_path.read_text()), folder)
    elif overwrite and folder.exists() and _is_main():
        shutil.rmtree(folder)
    _barrier()
    if _is_main() and not run_path.exists():  # a resumed run keeps the provenance of its start
        atomic_write_json(run_path, provenance)
    done = _read_partial(partial_path, {ex.index for ex in examples})
    position = {ex.index: i for i, ex in enumerate(examples)}
    chunks = [list(range(s, min(s + CHUNK_EXAMPLES, len(examples))))
              for s in range(0, len(examples), CHUNK_EXAMPLES)]
    for chunk_id, chunk in enumerate(chunks):
        todo = [i for i in chunk if examples[i].index not in done]
        if not todo:
            continue
        # A fixed seed per chunk makes a resumed sampled run draw what an uninterrupted one would.
        chunk_decoding = decoding.with_(seed=decoding.seed * 1_000_003 + chunk_id) \
            if decoding.do_sample else decoding
        generations: list[Generation] = generate_distributed(
            model, tokenizer, [prompts[i] for i in todo], chunk_decoding, show_progress)
        records = [{"index": examples[i].index, "where": examples[i].where, "prompt": prompts[i],
                    "prediction": g.text, "references": list(examples[i].references),
                    "n_prompt_tokens": g.n_prompt_tokens, "n_new_tokens": g.n_new_tokens,
                    "hit_eos": g.hit_eos, "prompt_truncated": g.prompt_truncated,
                    "input_cut": input_cut[i]}
                   for i, g in zip(todo, generations)]
        if _is_main():
            with partial_path.open("a", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        done.update({r["index"]: r for r in records})
    ordered = sorted(done.values(), key=lambda r: position[r["index"]])
    per_example, metrics = score_predictions(task, examples, [r["prediction"] for r in ordered],
                                             with_rouge_pkg)
    for record, scores in zip(ordered, per_example):
        record.update(scores)
    result = {
        "task": task.name, "n": len(ordered), "metrics": metrics,
        "n_empty_predictions": sum(not r["prediction"] for r in ordered),
        "n_without_eos": sum(not r["hit_eos"] for r in ordered),
        "n_prompt_truncated": sum(r["prompt_truncated"] for r in ordered),
        "n_input_cut": sum(r.get("input_cut", False) for r in ordered),
        "finished_at": utc_now(), "provenance": provenance,
    }
    scores = per_example_metrics(task, per_example)
    if _is_main():
        atomic_write_jsonl(folder / "predictions.jsonl", ordered)
        atomic_write_json(folder / PER_EXAMPLE_FILE, scores)
        atomic_write_json(metrics_path, result)  # last: its presence marks the run finished
        partial_path.unlink(missing_ok=True)
    _barrier()
    return dict(result, per_example=scores)


def rescore(out_dir: str | os.PathLike, task: str, with_rouge_pkg: bool = True) -> dict:
    """Score a finished run's ``predictions.jsonl`` again with the current scorers (no model
    needed) and rewrite its ``metrics.json``; for sampled runs, every seed and the summary."""
    spec = get_task(task)
    folder = Path(out_dir) / task
    seed_folders = sorted(p for p in folder.glob("seed*") if (p / "predictions.jsonl").is_file())
    for run_folder in seed_folders or [folder]:
        predictions_path, metrics_path = run_folder / "predictions.jsonl", run_folder / "metrics.json"
        if not (predictions_path.is_file() and metrics_path.is_file()):
            raise FileNotFoundError(f"{run_folder} has no finished run (predictions.jsonl + metrics.json)")
        records = [json.loads(line) for line in predictions_path.open(encoding="utf-8")]
        examples = [Example(r["index"], "", "", tuple(r["references"]), r["where"]) for r in records]
        per_example, metrics = score_predictions(spec, examples, [r["prediction"] for r in records],
                                                 with_rouge_pkg)
        for record, scores in zip(records, per_example):
            record.update(scores)
        result = json.loads(metrics_path.read_text())
        result.update(metrics=metrics, rescored_at=utc_now(), rescored_with=package_versions())
        atomic_write_jsonl(predictions_path, records)
        atomic_write_json(run_folder / PER_EXAMPLE_FILE, per_example_metrics(spec, per_example))
        atomic_write_json(metrics_path, result)
    if not seed_folders:
        return result
    per_seed = {p.name: json.loads((p / "metrics.json").read_text())["metrics"] for p in seed_folders}
    summary = json.loads((folder / "metrics.json").read_text())
    summary["per_seed"] = per_seed
    summary["metrics"] = {}
    for key in next(iter(per_seed.values())):
        mean, std = _mean_std([m[key] for m in per_seed.values()])
        summary["metrics"][key], summary["metrics"][f"{key}_std"] = mean, std
    summary["rescored_at"] = utc_now()
    atomic_write_json(folder / PER_EXAMPLE_FILE, _mean_per_example(
        [json.loads((p / PER_EXAMPLE_FILE).read_text()) for p in seed_folders]))
    atomic_write_json(folder / "metrics.json", summary)
    return summary


def _mean_per_example(runs: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Each example's score averaged over sampling seeds (the lists then average to the summary)."""
    return {key: [math.fsum(values) / len(values) for values in zip(*(run[key] for run in runs))]
            for key in runs[0]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def evaluate_task(checkpoint: str | os.PathLike | None, task: str, *, out_dir: str | os.PathLike,
                  data_dir: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None,
                  limit: int | None = None, protocol: str | None = None,
                  prompt_style: str | None = None, seeds: Sequence[int] | None = None,
                  max_new_tokens: int | None = None, max_prompt_tokens: int | None = None,
                  batch_size: int = 8, stop_strings: Sequence[str] = (),
                  model=None, tokenizer=None, device: str | None = None, dtype: str | None = None,
                  with_rouge_pkg: bool = True, full_checkpoint_hash: bool = True,
                  overwrite: bool = False, show_progress: bool = False) -> dict:
    """Evaluate a checkpoint (a path/Hub id, or an in-memory ``model`` + ``tokenizer``) on a task.

    ``protocol``: "greedy" (the paper's) or "minillm" (sampling, one run per seed in ``seeds``,
    default 10..50); defaults to the task's. ``prompt_style``: "alpaca" | "minillm" | "chat",
    default the task's. Returns the metrics dict written to ``<out_dir>/<task>/metrics.json``.
    """
    from rlkd.device import eval_placement

    device, dtype = eval_placement(device, dtype)  # default: the GPU in bf16 when there is one
    spec = get_task(task)
    protocol = protocol or spec.protocol
    if protocol not in ("greedy", "minillm"):
        raise ValueError(f"unknown protocol {protocol!r}; choose 'greedy' or 'minillm'")
    style = prompt_style or spec.prompt_style
    if model is None:
        if checkpoint is None:
            raise ValueError("give a checkpoint path or an in-memory model and tokenizer")
        resolved = resolve_checkpoint(checkpoint)  # fails fast, before any data is read
        examples = load_examples(spec, data_dir=data_dir, path=data_path, limit=limit)
        model, tokenizer = load_checkpoint(resolved, dtype=dtype, device=device)
        fingerprint = checkpoint_fingerprint(resolved, full=full_checkpoint_hash)
    else:
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer")
        examples = load_examples(spec, data_dir=data_dir, path=data_path, limit=limit)
        fingerprint = checkpoint_fingerprint(checkpoint, full_checkpoint_hash) \
            if checkpoint is not None and Path(checkpoint).is_dir() else model_fingerprint(model)
    prompt_limit = max_prompt_tokens or spec.max_prompt_tokens
    if protocol == "minillm" and prompt_limit is None:
        prompt_limit = 256  # MiniLLM's prompt budget
    fitted = [fit_prompt(ex, style, tokenizer, prompt_limit) for ex in examples]
    prompts = [prompt for prompt, _ in fitted]
    lengths = dict(max_new_tokens=max_new_tokens or spec.max_new_tokens,
                   max_prompt_tokens=prompt_limit,
                   batch_size=batch_size, stop_strings=tuple(stop_strings))
    if protocol == "greedy":
        runs = [(None, greedy(**lengths))]
    else:
        runs = [(s, minillm_sampling(s, **lengths)) for s in (seeds or MINILLM_SEEDS)]
    first = examples[0].where
    data_source = first.split(" row ")[0] if first.startswith("hub:") else first.rsplit(":", 1)[0]
    data_info = {"source": data_source, "n_examples": len(examples), "limit": limit,
                 "examples_sha256": examples_sha256(examples)}
    if Path(data_source).is_file():
        data_info["file_sha256"] = file_sha256(data_source)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    base = {"task": task, "checkpoint": fingerprint, "protocol": protocol, "prompt_style": style,
            "data": data_info,
            "chunk_examples": CHUNK_EXAMPLES}
    folder = Path(out_dir) / task
    results = []
    for seed, decoding in runs:
        provenance = dict(base, decoding=decoding.as_dict())
        provenance["run_key"] = stable_hash(provenance)
        provenance |= {"versions": package_versions(), "created_at": utc_now(),
                       "world_size": world, "device": str(device), "dtype": dtype}
        run_folder = folder if seed is None else folder / f"seed{seed}"
        results.append(_run_one(spec, examples, prompts, [cut for _, cut in fitted], model,
                                tokenizer, decoding, run_folder,
                                provenance, overwrite, with_rouge_pkg, show_progress))
    if protocol == "greedy":
        return results[0]
    # Runs finished before per-example files existed have none: then the summary has none either.
    per_example = _mean_per_example([r["per_example"] for r in results]) \
        if all("per_example" in r for r in results) else None
    summary_metrics = {}
    for key in results[0]["metrics"]:
        mean, std = _mean_std([r["metrics"][key] for r in results])
        summary_metrics[key] = mean
        summary_metrics[f"{key}_std"] = std
    summary = {"task": task, "n": results[0]["n"], "metrics": summary_metrics,
               "seeds": [s for s, _ in runs], "per_seed": {f"seed{s}": r["metrics"]
                                                            for (s, _), r in zip(runs, results)},
               "provenance": dict(base, decoding="see per-seed metrics.json"),
               "finished_at": utc_now()}
    if _is_main():
        if per_example is not None:
            atomic_write_json(folder / PER_EXAMPLE_FILE, per_example)
        atomic_write_json(folder / "metrics.json", summary)
    return summary if per_example is None else dict(summary, per_example=per_example)


__all__ = ["evaluate_task", "rescore", "score_predictions", "per_example_metrics", "RunMismatchError", "DataError"]
