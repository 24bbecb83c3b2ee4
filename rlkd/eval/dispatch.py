"""Score one model the way a benchmark cell's ``eval:`` settings say: a task, alignment, or synthetic.

    metrics, per_example = evaluate_model(settings, model_path, out_dir, teacher_path=...)

``per_example`` maps a metric to its value on each evaluation example, in a fixed example order
(the same for every model scored on those settings), for paired bootstraps over examples; it is
empty where a metric is not an average over examples (alignment metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

TASK_METRICS = ("correct", "total", "score", "no_answer", "rouge1", "rouge2", "rougeL")


def evaluate_model(settings: dict[str, Any], model_path: str, out_dir: Path, *, teacher_path: str | None,
                   task: str, train_sequences: Callable[[Any], Sequence[Sequence[int]]] | None = None,
                   teacher_cache_dir: Path | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``train_sequences(tokenizer)`` gives the trained-on sequences (alignment ``source: train``);
    ``teacher_cache_dir`` makes alignment read the teacher's cached logits instead of running it."""
    kind = settings.get("kind", "task")
    if kind == "task":
        return _task(settings, model_path, out_dir, task)
    if kind == "alignment":
        return _alignment(settings, model_path, teacher_path, train_sequences, teacher_cache_dir), {}
    if kind == "synthetic":
        from rlkd.eval.synthetic import evaluate_synthetic

        return evaluate_synthetic(settings, model_path, teacher_path)
    raise ValueError(f"unknown eval kind {kind!r}; use task, alignment or synthetic")


def _task(settings: dict[str, Any], model_path: str, out_dir: Path, task: str):
    from rlkd.eval.runner import evaluate_task

    result = evaluate_task(model_path, settings.get("task") or task, out_dir=out_dir / "eval",
                           data_dir=settings.get("data_dir"), data_path=settings.get("data_path"),
                           limit=settings.get("limit"), protocol=settings.get("protocol"),
                           max_new_tokens=settings.get("max_new_tokens"), batch_size=int(settings.get("batch_size", 8)),
                           full_checkpoint_hash=False, with_rouge_pkg=bool(settings.get("rouge_pkg", False)))
    metrics = {k: float(v) for k, v in result["metrics"].items()
               if k in TASK_METRICS or k.startswith("rouge_pkg_")}
    per_example = {k: [float(x) for x in v] for k, v in (result.get("per_example") or {}).items()}
    return metrics, per_example


def _alignment(settings, model_path, teacher_path, train_sequences, teacher_cache_dir) -> dict[str, float]:
    """CR/MOR/PPL of the model against the teacher on the main set and on each of ``extra_sets``
    (their metrics prefixed with the set's name)."""
    from rlkd.device import eval_placement
    from rlkd.eval.generate import load_checkpoint

    if teacher_path is None:
        raise ValueError("alignment evaluation needs a teacher")
    device, dtype = eval_placement()  # the GPU in bf16 when there is one
    model, tokenizer = load_checkpoint(model_path, dtype=dtype, device=device)
    teacher = None
    sets = {"": settings, **{f"{name}_": {**settings, "source": "text", **extra}
                            for name, extra in (settings.get("extra_sets") or {}).items()}}
    metrics: dict[str, float] = {}
    for prefix, current in sets.items():
        batch_size = int(current.get("batch_size", 4))
        slices = _slices(current, tokenizer, train_sequences)
        if teacher_cache_dir is not None:
            reference = _cached_teacher(teacher_path, slices, model.config.vocab_size, teacher_cache_dir, batch_size,
                                        device, dtype)
        else:
            teacher = teacher or load_checkpoint(teacher_path, dtype=dtype, device=device)[0]
            reference = teacher
        for name, value in _compare(model, reference, slices, batch_size).items():
            metrics[prefix + name] = value
    return metrics


def _slices(settings: dict[str, Any], tokenizer, train_sequences):
    from itertools import islice

    from rlkd.data.jsonl import iter_jsonl
    from rlkd.eval.alignment import make_token_slices

    source = settings.get("source", "text")
    if source == "train":
        if train_sequences is None:
            raise ValueError("alignment source 'train' needs the cell's training sequences")
        return [list(s) for s in train_sequences(tokenizer)]
    text_path = Path(settings["text_path"])
    if not text_path.is_absolute() and not text_path.exists():
        from rlkd.paths import default_data_dir

        data_dir = settings.get("data_dir") or default_data_dir()
        text_path = Path(data_dir) / text_path if data_dir else text_path
    skip = int(settings.get("skip_rows", 0))  # held-out documents after the training ones
    stop = skip + settings["max_rows"] if settings.get("max_rows") else None  # ...and before others
    texts = (row[settings.get("text_field", "text")] for _, row in islice(iter_jsonl(text_path), skip, stop))
    return make_token_slices(texts, tokenizer, int(settings.get("slice_len", 128)),
                             max_slices=settings.get("max_slices"))


def _cached_teacher(teacher_path: str, slices, vocab_size: int, cache_dir: Path, batch_size: int,
                    device: str, dtype: str):
    """The teacher as cached logits over these slices (built with a plain teacher if new)."""
    from rlkd import teacher_cache
    from rlkd.eval.generate import load_checkpoint

    cache = teacher_cache.open_or_build(
        cache_dir, teacher_path, slices, vocab_size,
        lambda: load_checkpoint(teacher_path, dtype=dtype, device=device)[0], batch_size=batch_size, device=device)
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
