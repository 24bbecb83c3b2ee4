"""The one place the benchmark touches the engine and the evaluation code.

A cell (see :mod:`rlkd.bench.spec`) carries neutral settings; this module turns them into the
engine's run config (``rlkd.config.RunConfig``), trains with ``rlkd.engine.train.run_training``,
and scores the exported checkpoint with ``rlkd.eval``. If those APIs move, only this file changes.

Neutral training keys (``defaults:`` / ``tasks[].train`` in a spec):
    teacher, student, tokenizer          model ids or paths; ``@tiny/teacher`` / ``@tiny/student``
                                         make tiny random Llama models (offline, for --tiny)
    dataset, data_split, data_path, data_dir, seq_len, train_examples, mask_convention
    epochs | max_steps, global_batch, micro_batch, lr, weight_decay, schedule, warmup_steps,
    grad_clip, optimizer, precision, gradient_checkpointing, vocab_truncation, checkpoint_every
    teacher_sft: {epochs | max_steps, lr, ...}   fine-tune the teacher on the task first (once per
                                         spec, cached), as the paper did for Dolly and XSum
    student_sft: {...}                   the same cross-entropy stage for the student (e.g. healing a
                                         layer-pruned copy on other documents); "Start" is its result
    skip_examples                        source rows passed over before train_examples are read
    train_samples                        keep the first N encoded samples (pretrain: packed sequences)
    teacher_cache: true                  compute the teacher's logits over the training samples once
                                         (exact float32, shared by every cell of the spec) instead of
                                         a teacher forward per step; alignment evaluation reuses them
    teacher_generations: true            train on the teacher's greedy responses to the training
                                         prompts instead of the references (SeqKD, FD); generated once,
                                         cached with provenance, reused by every cell
    generation: {max_new_tokens, batch_size}   decoding of those teacher generations
    engine: {...}                        raw engine config overlaid last (escape hatch)
Neutral evaluation keys (``eval:``):
    kind: task | alignment | synthetic; task (eval task name), data_path, data_dir, limit,
    max_new_tokens, batch_size, protocol
    alignment: source: text (default) with text_path, skip_rows, slice_len, max_slices; or
    source: train, the cell's own training sequences (the paper's Table 1 "data already learned");
    extra_sets: {name: {same keys}} scored too, their metrics prefixed ``name_``
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rlkd.bench.spec import config_hash, deep_merge
from rlkd.bench.store import write_json_atomic
from rlkd.provenance import atomic_write_jsonl

_TRAIN_KEYS = {
    "teacher", "student", "tokenizer", "dataset", "data_split", "data_path", "data_dir", "seq_len",
    "train_examples", "mask_convention", "epochs", "max_steps", "global_batch", "micro_batch", "lr",
    "weight_decay", "schedule", "warmup_steps", "grad_clip", "optimizer", "precision",
    "gradient_checkpointing", "vocab_truncation", "checkpoint_every", "teacher_sft", "engine",
    "exclude_eval_overlap", "keep_checkpoints", "shuffle", "teacher_generations", "generation",
    "train_samples", "teacher_cache", "skip_examples", "student_sft", "candidate",
}


class CellConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Models


def tiny_llama(path: Path, *, hidden: int, layers: int, heads: int, vocab_size: int,
               tokenizer_dir: Path | None = None, seed: int = 0, max_positions: int = 512) -> Path:
    """A random Llama model saved at ``path`` (created once; reused when present)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir is not None:
        for item in tokenizer_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _shared_tokenizer() -> Path | None:
    from rlkd.paths import default_data_dir

    data = default_data_dir()
    candidate = data / "tokenizers" / "llama2" if data else None
    return candidate if candidate and candidate.is_dir() else None


def resolve_model(ref: str, cache_dir: Path, *, create: bool = True) -> str:
    """``@tiny/teacher`` and ``@tiny/student`` -> tiny random Llama checkpoints with the local Llama-2
    tokenizer (teacher twice the student's width); anything else is returned unchanged."""
    if ref.startswith("@smollm2/"):
        return _smollm2(ref, cache_dir, create)
    if not ref.startswith("@tiny/"):
        return ref
    role = ref.removeprefix("@tiny/")
    sizes = {"teacher": dict(hidden=64, layers=2, heads=4), "student": dict(hidden=32, layers=2, heads=2)}
    if role not in sizes:
        raise CellConfigError(f"unknown tiny model {ref!r}; use @tiny/teacher or @tiny/student")
    if not create:
        return str(cache_dir / f"tiny-{role}")
    tokenizer = _shared_tokenizer()
    if tokenizer is None:
        raise CellConfigError(f"{ref}: needs the local Llama-2 tokenizer (RLKD_DATA_DIR/tokenizers/llama2)")
    return str(tiny_llama(cache_dir / f"tiny-{role}", vocab_size=32000, tokenizer_dir=tokenizer,
                          seed={"teacher": 1, "student": 2}[role], **sizes[role]))


SMOLLM2_SCRIPT = "prepare_smollm2.sh"


def _smollm2(ref: str, cache_dir: Path, create: bool) -> str:
    """``@smollm2/teacher``: SmolLM2-135M-Instruct prepared offline by ../shared/tools/prepare_smollm2.sh;
    ``@smollm2/pruned-N``: a copy keeping N of its layers, evenly spaced (first and last kept)."""
    name = ref.removeprefix("@smollm2/")
    teacher = cache_dir / "smollm2-135m-instruct"
    if name == "teacher":
        target = teacher
    elif name.startswith("pruned-") and name.removeprefix("pruned-").isdigit():
        target = cache_dir / f"smollm2-{name}"
    else:
        raise CellConfigError(f"unknown SmolLM2 model {ref!r}; use @smollm2/teacher or @smollm2/pruned-N")
    if not create:
        return str(target)
    if not (teacher / "model.safetensors").is_file():
        from rlkd.paths import REPO_ROOT

        script = REPO_ROOT.parent / "shared" / "tools" / SMOLLM2_SCRIPT
        if not script.is_file():
            raise CellConfigError(f"{ref}: {script} not found; prepare the checkpoint and place it at {teacher}")
        subprocess.run(["bash", str(script), str(teacher)], check=True)
    if target != teacher and not (target / "config.json").is_file():
        prune_layers(teacher, target, int(name.removeprefix("pruned-")))
    return str(target)


def prune_layers(source: Path, target: Path, keep: int) -> Path:
    """Save a copy of a Llama-style model with ``keep`` of its decoder layers, evenly spaced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layers = model.model.layers
    if not 1 <= keep <= len(layers):
        raise CellConfigError(f"cannot keep {keep} of {len(layers)} layers")
    chosen = sorted({round(i * (len(layers) - 1) / max(keep - 1, 1)) for i in range(keep)})
    model.model.layers = torch.nn.ModuleList(layers[i] for i in chosen)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(chosen)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in chosen]
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------
# Training config


def _count_train_rows(train: dict[str, Any]) -> int:
    return _count_rows(train["dataset"], train.get("data_split", "train"), train.get("data_path"),
                       train.get("data_dir"), bool(train.get("exclude_eval_overlap", True)), train.get("train_examples"))


@functools.lru_cache(maxsize=64)
def _count_rows(dataset: str, split: str, path: str | None, data_dir: str | None, exclude: bool,
                limit: int | None) -> int:
    from rlkd.data.tasks import load_rows

    return len(load_rows(dataset, split, path=path, data_dir=data_dir, exclude_eval_overlap=exclude, limit=limit))


def optimizer_steps(train: dict[str, Any], n_rows: int | None = None) -> int:
    if "max_steps" in train:
        return int(train["max_steps"])
    if "epochs" not in train:
        raise CellConfigError("training needs 'epochs' or 'max_steps'")
    if n_rows is None:
        n_rows = int(train["train_examples"]) if "train_examples" in train else _count_train_rows(train)
    return max(1, math.ceil(float(train["epochs"]) * n_rows / int(train.get("global_batch", 1))))


def run_config(cell: dict[str, Any], workdir: Path, *, cache_dir: Path, teacher: str | None = None,
               loss: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
               create_models: bool = True) -> dict[str, Any]:
    """The engine's run-config tree for ``cell`` (validated by ``rlkd.config`` when training).
    ``create_models=False`` (dry runs) names tiny models without building them."""
    train = dict(cell["train"] if train is None else train)
    unknown = sorted(set(train) - _TRAIN_KEYS)
    if unknown:
        raise CellConfigError(f"cell {cell.get('id')}: unknown training key(s) {unknown}; known: {sorted(_TRAIN_KEYS)}")
    for key in ("teacher", "student", "dataset"):
        if key not in train:
            raise CellConfigError(f"cell {cell.get('id')}: training key {key!r} is required")
    global_batch = int(train.get("global_batch", 1))
    micro = int(train.get("micro_batch", 1))
    if global_batch % micro:
        raise CellConfigError(f"global_batch {global_batch} is not a multiple of micro_batch {micro}")
    student = resolve_model(train["student"], cache_dir, create=create_models)
    tree: dict[str, Any] = {
        "output_dir": str(workdir),
        "seed": cell.get("seed") if cell.get("seed") is not None else 72,
        "models": {"teacher": teacher or resolve_model(train["teacher"], cache_dir, create=create_models),
                   "student": student,
                   "dtype": {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}.get(
                       train.get("precision", "auto"), train.get("precision", "auto")),
                   "gradient_checkpointing": bool(train.get("gradient_checkpointing", False)),
                   "vocab_truncation": train.get("vocab_truncation", "none")},
        "data": {"task": train["dataset"], "split": train.get("data_split", "train"),
                 "max_length": int(train.get("seq_len", 512)),
                 "exclude_eval_overlap": bool(train.get("exclude_eval_overlap", True)),
                 "shuffle": bool(train.get("shuffle", True))},
        "loss": _loss_tree(cell["loss"] if loss is None else loss),
        "train": {"micro_batch_size": micro, "grad_accum": global_batch // micro,
                  "max_steps": optimizer_steps(train), "lr": float(train.get("lr", 2e-5)),
                  "weight_decay": float(train.get("weight_decay", 0.01)),
                  "schedule": train.get("schedule", "constant"), "warmup_steps": int(train.get("warmup_steps", 0)),
                  "grad_clip": float(train.get("grad_clip", 1.0)),
                  "optimizer": train.get("optimizer", "torch_adamw")},
        "checkpoint": {"every_steps": int(train.get("checkpoint_every", 0))},
        "progress_bar": False,
    }
    if train.get("tokenizer"):
        tree["models"]["tokenizer"] = train["tokenizer"]
    for key, target in (("data_path", "path"), ("data_dir", "data_dir"), ("train_examples", "limit"),
                        ("mask_convention", "mask_convention"), ("train_samples", "max_samples"),
                        ("skip_examples", "skip")):
        if key in train:
            tree["data"][target] = train[key]
    if train.get("teacher_cache"):
        tree["teacher_cache"] = str(teacher_cache_dir(cache_dir))
    return deep_merge(tree, train.get("engine", {}))


def teacher_cache_dir(cache_dir: Path) -> Path:
    return cache_dir / "teacher_logits"


def _loss_tree(loss: dict[str, Any]) -> dict[str, Any]:
    ranking = dict(loss.get("ranking") or {"enabled": False})
    return {"objective": loss["objective"], "params": dict(loss.get("params", {})),
            "temperature": float(loss.get("temperature", 1.0)), "ranking": ranking}


def validate_run_config(tree: dict[str, Any]) -> None:
    """Validate against the engine's schema (raises its ConfigError naming the key)."""
    from rlkd.config import load_config

    load_config(base=tree)


# ---------------------------------------------------------------------------------------------
# Stages


def _train(tree: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    from rlkd.engine.train import run_training

    finished = finished_training(tree)
    if finished is not None:
        return finished
    result = run_training(tree, resume=True)
    log = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
    if result.export_dir is None:
        raise RuntimeError("training finished without an exported checkpoint")
    return Path(result.export_dir), log


def finished_training(tree: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]] | None:
    """A training that already finished in the cell's directory with exactly this engine config (a
    Slurm job from ``rlkd bench --dry-run --slurm``): its export and log are used as they are."""
    from rlkd.config import load_config

    out = Path(tree["output_dir"])
    manifest_path, export, metrics = out / "manifest.json", out / "export", out / "metrics.jsonl"
    if not (manifest_path.is_file() and (export / "config.json").is_file() and metrics.is_file()):
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("status") != "finished":
        return None
    if manifest.get("config") != load_config(base=tree).model_dump(mode="json"):
        print(f"{out}: a finished training with another config is there; training again", flush=True)
        return None
    return export, [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


CE_LOSS = {"objective": "ce", "params": {}, "temperature": 1.0, "ranking": {"enabled": False}}


def _sft_stage(cell: dict[str, Any], role: str, shared_dir: Path) -> tuple[Path, dict[str, Any]]:
    stage = {k: v for k, v in cell["train"].items() if k not in ("teacher_sft", "student_sft", "teacher_cache")}
    stage.update(cell["train"][f"{role}_sft"])
    stage["student"] = cell["train"][role]  # the model being fine-tuned
    key = config_hash({f"{role}_sft": stage, "task": cell["task"]})[:12]
    return shared_dir / f"{role}_sft-{cell['task']}-{key}", stage


def finished_stage(cell: dict[str, Any], role: str, shared_dir: Path) -> str | None:
    """The export of the cell's ``<role>_sft`` stage if it has run, else None."""
    out, _ = _sft_stage(cell, role, shared_dir)
    return str(out / "export") if (out / "done.json").is_file() and (out / "export").is_dir() else None


def ensure_sft(cell: dict[str, Any], role: str, shared_dir: Path, cache_dir: Path) -> str:
    """Fine-tune the base ``role`` model ("teacher" or "student") with cross-entropy on the stage
    given by ``train.<role>_sft`` (overlaid on the cell's training keys) once; every cell reuses it."""
    out, stage = _sft_stage(cell, role, shared_dir)
    export = out / "export"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel cells wait for one fine-tuning
        if (out / "done.json").is_file() and export.is_dir():
            return str(export)
        fake = {**cell, "id": f"{role}_sft-{cell['task']}", "seed": stage.get("seed", 72)}
        tree = run_config(fake, out, cache_dir=cache_dir, loss=CE_LOSS, train=stage)
        export_dir, log = _train(tree)
        atomic_write_jsonl(out / "train_log.jsonl", log)
        write_json_atomic(out / "done.json", {"config": tree})
        return str(export_dir)


def _stage_models(cell: dict[str, Any], shared_dir: Path, cache_dir: Path) -> tuple[str | None, str | None]:
    """(teacher, student) paths after their optional cross-entropy stages."""
    train = cell["train"]
    teacher = (ensure_sft(cell, "teacher", shared_dir, cache_dir) if train.get("teacher_sft")
               else resolve_model(train["teacher"], cache_dir) if "teacher" in train else None)
    student = (ensure_sft(cell, "student", shared_dir, cache_dir) if train.get("student_sft")
               else resolve_model(train["student"], cache_dir) if "student" in train else None)
    return teacher, student


def _response_field(task: str, row: dict[str, Any]) -> str:
    """The field of a training row that holds the response (as the data layer reads it)."""
    if task == "gsm8k":
        return "answer" if "question" in row else "response"
    if task == "xsum":
        return "summary"
    if task == "dolly":
        return "response" if "response" in row else "output"
    return "output"


def ensure_teacher_generations(train: dict[str, Any], shared_dir: Path, teacher_path: str) -> str:
    """The training rows with each response replaced by the teacher's greedy generation for its
    prompt, as a JSONL file in the task's own schema; generated once per (teacher, rows, decoding)
    and reused by every cell (SeqKD trains on it with cross-entropy, FD with KL)."""
    from rlkd.data.tasks import PromptResponse, load_rows
    from rlkd.eval.generate import generate_texts, greedy, load_checkpoint
    from rlkd.eval.provenance import checkpoint_fingerprint, file_sha256

    dataset = train["dataset"]
    settings = dict(train.get("generation") or {})
    decoding = greedy(max_new_tokens=int(settings.get("max_new_tokens", 256)),
                      batch_size=int(settings.get("batch_size", 8)))
    items = load_rows(dataset, train.get("data_split", "train"), path=train.get("data_path"),
                      data_dir=train.get("data_dir"), exclude_eval_overlap=bool(train.get("exclude_eval_overlap", True)),
                      limit=train.get("train_examples"))
    if not items or not isinstance(items[0], PromptResponse):
        raise CellConfigError(f"teacher_generations needs a prompt/response task, not {dataset!r}")
    if any(item.where.startswith("hub:") for item in items):
        raise CellConfigError("teacher_generations needs the training data as a local file (data_path or data_dir)")
    key = config_hash({"teacher": teacher_path, "dataset": dataset, "rows": [i.where for i in items],
                       "decoding": decoding.as_dict()})[:12]
    out = shared_dir / f"teacher_generations-{dataset}-{key}.jsonl"
    shared_dir.mkdir(parents=True, exist_ok=True)
    with open(shared_dir / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return str(out)
        model, tokenizer = load_checkpoint(teacher_path, dtype="float32", device="cuda" if _cuda() else "cpu")
        generations = generate_texts(model, tokenizer, [item.prompt for item in items], decoding)
        lines_by_file: dict[str, list[str]] = {}
        rows = []
        for item, generation in zip(items, generations):
            file, _, line = item.where.rpartition(":")
            if file not in lines_by_file:
                lines_by_file[file] = Path(file).read_text(encoding="utf-8").splitlines()
            row = json.loads(lines_by_file[file][int(line) - 1])
            row[_response_field(dataset, row)] = generation.text.strip()
            rows.append(row)
        write_json_atomic(out.with_suffix(".provenance.json"), {
            "teacher": teacher_path, "teacher_fingerprint": checkpoint_fingerprint(teacher_path, full=False)
            if Path(teacher_path).is_dir() else teacher_path,
            "decoding": decoding.as_dict(), "rows": len(rows),
            "sources": {f: file_sha256(f) for f in lines_by_file}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hit_eos": sum(g.hit_eos for g in generations)})
        atomic_write_jsonl(out, rows)
        return str(out)


def evaluate(cell: dict[str, Any], model_path: str, workdir: Path, *, teacher_path: str | None,
             cache_dir: Path | None = None) -> dict[str, float]:
    evaluation = dict(cell.get("eval") or {})
    kind = evaluation.get("kind", "task")
    if kind == "task":
        from rlkd.eval.runner import evaluate_task

        task = evaluation.get("task", cell["task"])
        result = evaluate_task(model_path, task, out_dir=workdir / "eval", data_dir=evaluation.get("data_dir"),
                               data_path=evaluation.get("data_path"), limit=evaluation.get("limit"),
                               protocol=evaluation.get("protocol"), max_new_tokens=evaluation.get("max_new_tokens"),
                               batch_size=int(evaluation.get("batch_size", 8)), full_checkpoint_hash=False,
                               with_rouge_pkg=False)
        metrics = result["metrics"]
        keep = ("correct", "total", "score", "no_answer", "rouge1", "rouge2", "rougeL")
        return {k: float(v) for k, v in metrics.items() if k in keep}
    if kind == "alignment":
        return _alignment(cell, evaluation, model_path, teacher_path, cache_dir)
    if kind == "synthetic":
        from rlkd.bench.default import evaluate_synthetic

        return evaluate_synthetic(evaluation, model_path, teacher_path)
    raise CellConfigError(f"unknown eval kind {kind!r}; use task, alignment or synthetic")


def _alignment(cell: dict[str, Any], evaluation: dict[str, Any], model_path: str, teacher_path: str | None,
               cache_dir: Path | None) -> dict[str, float]:
    """CR/MOR/PPL of the model against the teacher on the main set and on each of ``extra_sets``."""
    from rlkd.eval.generate import load_checkpoint

    if teacher_path is None:
        raise CellConfigError("alignment evaluation needs a teacher")
    model, tokenizer = load_checkpoint(model_path, dtype="float32", device="cpu")
    teacher = None
    use_cache = bool(cell["train"].get("teacher_cache")) and cache_dir is not None
    sets = {"": evaluation, **{f"{name}_": {**evaluation, "source": "text", **extra}
                              for name, extra in (evaluation.get("extra_sets") or {}).items()}}
    metrics: dict[str, float] = {}
    for prefix, settings in sets.items():
        slices = _alignment_slices(cell, settings, tokenizer, cache_dir)
        if use_cache:
            reference = _cached_teacher(teacher_path, slices, model.config.vocab_size, cache_dir,
                                        int(settings.get("batch_size", 4)))
        else:
            teacher = teacher or load_checkpoint(teacher_path, dtype="float32", device="cpu")[0]
            reference = teacher
        for name, value in _compare(model, reference, slices, int(settings.get("batch_size", 4))).items():
            metrics[prefix + name] = value
    return metrics


def _alignment_slices(cell: dict[str, Any], settings: dict[str, Any], tokenizer, cache_dir: Path | None):
    from rlkd.data.jsonl import iter_jsonl
    from rlkd.eval.alignment import make_token_slices

    source = settings.get("source", "text")
    if source == "train":
        from rlkd.config import load_config
        from rlkd.data import build_samples

        tree = run_config(cell, Path("unused"), cache_dir=cache_dir or Path("unused"), loss=CE_LOSS,
                          create_models=False)
        samples = build_samples(load_config(base=tree).data, tokenizer)
        return [s.input_ids for s in samples]
    if source != "text":
        raise CellConfigError(f"alignment source {source!r}: use text or train")
    text_path = Path(settings["text_path"])
    if not text_path.is_absolute() and not text_path.exists():
        from rlkd.paths import default_data_dir

        data_dir = settings.get("data_dir") or default_data_dir()
        text_path = Path(data_dir) / text_path if data_dir else text_path
    skip = int(settings.get("skip_rows", 0))  # held-out documents after the training ones
    texts = (row[settings.get("text_field", "text")] for i, (_, row) in enumerate(iter_jsonl(text_path))
             if i >= skip)
    return make_token_slices(texts, tokenizer, int(settings.get("slice_len", 128)),
                             max_slices=settings.get("max_slices"))


def _cached_teacher(teacher_path: str, slices, vocab_size: int, cache_dir: Path, batch_size: int):
    """The teacher as cached logits over these slices (built with a plain fp32 teacher if new)."""
    from rlkd import teacher_cache
    from rlkd.eval.generate import load_checkpoint

    cache = teacher_cache.open_or_build(
        teacher_cache_dir(cache_dir), teacher_path, slices, vocab_size,
        lambda: load_checkpoint(teacher_path, dtype="float32", device="cpu")[0], batch_size=batch_size)
    return cache.as_model()


def _compare(model, reference, slices, batch_size: int) -> dict[str, float]:
    import torch

    from rlkd.eval.alignment import compare_models

    with torch.no_grad():
        result = compare_models(model, reference, slices, batch_size=batch_size)
    metrics = {k: v for k, v in result.metrics.items() if k.startswith(("cr@", "mor@")) and "corpus" not in k}
    metrics["ppl"] = result.metrics.get("ppl_student", float("nan"))
    metrics["teacher_ppl"] = result.metrics.get("ppl_teacher", float("nan"))
    return metrics


RESULTS_REF = "@results/"


def resolve_results_refs(value: Any, results_dir: Path) -> Any:
    """``@results/x`` -> ``<results_dir>/x`` anywhere in a cell: configs name files inside the results
    directory without the directory's absolute path entering the config hash."""
    if isinstance(value, str) and value.startswith(RESULTS_REF):
        return str(results_dir / value.removeprefix(RESULTS_REF))
    if isinstance(value, dict):
        return {k: resolve_results_refs(v, results_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_results_refs(v, results_dir) for v in value]
    return value


def run_cell_inprocess(cell: dict[str, Any], workdir: Path, *, cache_dir: Path, shared_dir: Path) -> dict[str, float]:
    cell = resolve_results_refs(cell, cache_dir.parent)
    train = cell["train"]
    teacher, student = _stage_models(cell, shared_dir, cache_dir)
    if cell["kind"] == "reference":
        model = {"teacher": teacher, "student": student}.get(cell["reference"]) \
            or resolve_model(train["candidate"], cache_dir)
        return evaluate(cell, model, workdir, teacher_path=teacher, cache_dir=cache_dir)
    if train.get("teacher_generations"):
        generated = ensure_teacher_generations(train, shared_dir, teacher)
        # The generated file already holds exactly the selected rows.
        train = {**{k: v for k, v in train.items() if k not in ("train_examples", "teacher_generations", "generation")},
                 "data_path": generated, "exclude_eval_overlap": False}
    train = {**train, "student": student}
    tree = run_config(cell, workdir / "train", cache_dir=cache_dir, teacher=teacher, train=train)
    started = time.perf_counter()
    export_dir, log = _train(tree)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(cell, str(export_dir), workdir, teacher_path=tree["models"]["teacher"], cache_dir=cache_dir)
    metrics["train_seconds"] = train_seconds
    metrics["train_step_seconds"] = sum(float(row.get("step_time_s", 0.0)) for row in log)
    if log:
        metrics["final_train_loss"] = float(log[-1]["loss"])
    if not train.get("keep_checkpoints", False):
        shutil.rmtree(export_dir, ignore_errors=True)
        shutil.rmtree(workdir / "train" / "checkpoints", ignore_errors=True)
    return metrics


# A process group set up in the runner (e.g. by training the embedded benchmark's teacher in-process)
# must not leak into the cell processes, which each start their own one-process group.
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}


class LocalExecutor:
    """Runs each cell in a fresh Python process (isolates memory, threads and crashes)."""

    def __init__(self, results_dir: Path, *, subprocess_per_cell: bool = True, threads: int | None = None):
        self.results_dir = results_dir
        self.cache_dir = results_dir / ".cache"
        self.shared_dir = results_dir / ".shared"
        self.subprocess_per_cell = subprocess_per_cell
        self.threads = threads

    def run(self, cell: dict[str, Any], workdir: Path) -> dict[str, float]:
        if not self.subprocess_per_cell:
            return run_cell_inprocess(cell, workdir, cache_dir=self.cache_dir, shared_dir=self.shared_dir)
        out = workdir / "cell_metrics.json"
        out.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
        env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else env.get("DS_ACCELERATOR", "cuda"))
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log_path = workdir / "cell.log"
        with open(log_path, "a") as log:
            code = subprocess.call([sys.executable, "-m", "rlkd.bench.cell", str(workdir), str(self.cache_dir),
                                    str(self.shared_dir)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_die_with_parent)
        if code != 0 or not out.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"cell process exited with {code}; last lines of {log_path}:\n" + "\n".join(tail))
        return json.loads(out.read_text())


def _die_with_parent() -> None:
    """Linux: the cell process gets SIGKILL when the runner dies, so a killed runner leaves no orphan
    training into a staging directory that the next runner will use."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing means CPU
        return False


def main(argv: list[str]) -> int:
    workdir, cache_dir, shared_dir = (Path(a) for a in argv[:3])
    cell = json.loads((workdir / "config.json").read_text())
    metrics = run_cell_inprocess(cell, workdir, cache_dir=cache_dir, shared_dir=shared_dir)
    write_json_atomic(workdir / "cell_metrics.json", metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
