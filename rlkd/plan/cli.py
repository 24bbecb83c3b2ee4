"""`rlkd plan CONFIG_OR_SPEC --gpus N --gpu-mem GB [--nodes M]`: per-GPU memory of a run before it is queued.

A run config (`rlkd train --config`) gives one teacher/student pair with its micro-batch, sequence
length, dtype, offload, checkpointing and fused-loss settings; a benchmark spec gives a pair per
task (its `defaults.student` and each task's `train.teacher`, read best-effort) with the spec's
`micro_batch` and `seq_len`. Models are resolved from config files only (see rlkd.plan.shapes).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from rlkd.plan.memory import (GIB, Setup, Variant, fused_block, largest_micro_batch, per_gpu, student_states,
                              teacher_partition)
from rlkd.plan.cache_size import DEFAULT_TOP_KS, cache_size_lines
from rlkd.plan.shapes import ModelConfigNotFound, ModelShape, model_shape
from rlkd.teacher_topk_cache import VALUE_DTYPES

VARIANTS = [Variant(offload=o, checkpointing=c, fused=f) for o in (False, True) for c in (False, True) for f in (False, True)]


class PlanInputError(ValueError):
    pass


def _dig(tree: dict, *keys: str):
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _pairs_from(path: Path) -> tuple[list[tuple[str, str | None, str]], dict]:
    """``([(student, teacher or None, label)], settings)`` from a run config or a benchmark spec
    (a file, or a preset name under benchmarks/ as `rlkd bench` takes it: ``paper/table2``)."""
    if not path.is_file():
        from rlkd.bench.cli import resolve_spec_path
        from rlkd.bench.spec import SpecError

        try:
            path = resolve_spec_path(str(path))
        except SpecError as exc:
            raise PlanInputError(str(exc)) from None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanInputError(f"{path}: file not found") from None
    if not isinstance(tree, dict):
        raise PlanInputError(f"{path}: expected a YAML mapping (a run config or a benchmark spec)")
    if "models" in tree:  # a run config: validate it as `rlkd train` would
        from rlkd.config import load_config

        from rlkd.objectives import DistillLoss

        cfg = load_config(path)
        needs_teacher = DistillLoss(cfg.loss).needs_teacher  # e.g. "ce" alone never loads the teacher
        settings = {"micro_batch": cfg.train.micro_batch_size, "seq_len": cfg.data.max_length,
                    "dtype": cfg.models.dtype, "checkpointing": cfg.models.gradient_checkpointing,
                    "fused": cfg.loss.fused_lm_head, "fused_block_mib": cfg.loss.fused_block_mib,
                    "offload": cfg.deepspeed.student_offload_optimizer or cfg.deepspeed.teacher_offload_params,
                    "samples": {"run": cfg.data.limit}, "cache_dtype": cfg.teacher_cache_dtype,
                    "cache_top_ks": (cfg.teacher_cache_top_k,) if cfg.teacher_cache_top_k else None}
        return [(cfg.models.student, cfg.models.teacher if needs_teacher else None, "run")], settings
    if "tasks" in tree:  # a benchmark spec: per-cell run-config trees (older specs: flat keys)
        defaults = tree.get("defaults") or {}
        student = _dig(defaults, "models", "student") or defaults.get("student")
        pairs: list[tuple[str, str | None, str]] = []
        samples: dict[str, int | None] = {}  # a pair's label -> its tasks' sample caps summed (None: one has none)
        for task in tree["tasks"]:
            task = task or {}
            run = task.get("run") or task.get("train") or {}
            pair = (_dig(run, "models", "student") or run.get("student") or student,
                    _dig(run, "models", "teacher") or run.get("teacher"))
            if pair[0] is None:
                raise PlanInputError(f"{path}: task {task.get('name')!r} has no student (defaults.models.student)")
            known = [p[:2] for p in pairs]
            limit = _dig(run, "data", "limit")
            if pair in known:
                index = known.index(pair)
                before = samples.pop(pairs[index][2])
                pairs[index] = (*pair, f"{pairs[index][2]}, {task.get('name')}")
                samples[pairs[index][2]] = before + limit if before and limit else None
            else:
                pairs.append((*pair, str(task.get("name"))))
                samples[pairs[-1][2]] = limit
        settings = {"micro_batch": int(_dig(defaults, "train", "micro_batch_size") or defaults.get("micro_batch") or 1),
                    "seq_len": int(_dig(defaults, "data", "max_length") or defaults.get("seq_len") or 2048),
                    "dtype": _dig(defaults, "models", "dtype") or defaults.get("precision") or "auto",
                    "samples": samples}
        return pairs, settings
    raise PlanInputError(f"{path}: neither a run config (no `models:`) nor a benchmark spec (no `tasks:`)")


def _gb(n: int) -> str:
    return f"{n / GIB:6.1f}"


def runnable_variants(student: ModelShape, teacher: ModelShape | None) -> list[Variant]:
    """The variants a run can use: the fused path only where both heads are plain ``hidden @ W.T``."""
    plain = student.plain_head and (teacher is None or teacher.plain_head)
    return [v for v in VARIANTS if plain or not v.fused]


def fused_block_line(setup: Setup, vocab: int) -> str:
    rows, _ = fused_block(setup, vocab)
    source = (f"loss.fused_block_mib={setup.fused_block_mib:g}" if setup.fused_block_mib is not None
              else f"{setup.device} default")
    return (f"   fused block            {rows} rows x {vocab} = {rows * vocab * setup.dtype_bytes / 2**20:.0f} MiB "
            f"of logits ({source})")


def render(student: ModelShape, teacher: ModelShape | None, setup: Setup, gpu_bytes: int, label: str,
           chosen: Variant | None = None) -> str:
    head = (f"== {label}: student {student.name} ({student.params / 1e9:.2f}B params), teacher "
            f"{teacher.name + f' ({teacher.params / 1e9:.2f}B)' if teacher else 'none'}\n"
            f"   {setup.gpus_per_node} GPU(s) x {setup.nodes} node(s), {gpu_bytes / GIB:.0f} GiB each; micro-batch "
            f"{setup.micro_batch} x seq {setup.seq_len}; {'bf16' if setup.dtype_bytes == 2 else 'fp32'}")
    lines = [head, "",
             "   per GPU, GiB                              no offload   offload (student optimizer, teacher params)"]
    states = [student_states(student, setup, offload_optimizer=o) for o in (False, True)]
    lines.append(f"   student ZeRO-3 states (param/grad/Adam)   {_gb(states[0]['gpu'])}       {_gb(states[1]['gpu'])}"
                 f"   (host RAM per node {states[1]['cpu'] / GIB:.1f})")
    if teacher is not None:
        parts = [teacher_partition(teacher, setup, offload_params=o) for o in (False, True)]
        lines.append(f"   teacher ZeRO-3 partition                  {_gb(parts[0]['gpu'])}       {_gb(parts[1]['gpu'])}"
                     f"   (host RAM per node {parts[1]['cpu'] / GIB:.1f})")
    base = per_gpu(student, teacher, setup, VARIANTS[0])
    ckpt = per_gpu(student, teacher, setup, Variant(False, True, True))
    lines.append(f"   student activations    no ckpt / ckpt     {_gb(base['activations'])} / {_gb(ckpt['activations']).strip()}")
    lines.append(f"   loss working set       logits / fused     {_gb(base['loss'])} / {_gb(ckpt['loss']).strip()}")
    lines.append(fused_block_line(setup, setup.vocab or student.vocab))
    variants = runnable_variants(student, teacher)
    if len(variants) < len(VARIANTS):
        lines.append("   (fused variants left out: a model's logits are not hidden @ lm_head.weight.T)")
    lines += ["", "   variant                          total GiB   fits   largest micro-batch"]
    for variant in variants:
        total = per_gpu(student, teacher, setup, variant)["total"]
        best = largest_micro_batch(student, teacher, setup, variant, gpu_bytes)
        mark = " <- this config" if chosen == variant else ""
        lines.append(f"   {variant.label():<32} {_gb(total)}     {'yes' if total <= gpu_bytes else 'NO ':<4}   {best}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkd plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a run config YAML or a benchmark spec YAML")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--config-dir", default=None,
                        help="folder holding <org>/<name>/config.json for Hub ids (offline); e.g. tests/data/model_configs")
    parser.add_argument("--micro-batch", type=int, default=None, help="override the config's micro-batch")
    parser.add_argument("--seq-len", type=int, default=None, help="override the config's sequence length")
    parser.add_argument("--cache-top-k", type=int, nargs="+", default=None,
                        help="top-K sizes of the teacher cache to report (default: the run config's "
                             f"teacher_cache_top_k, else {' '.join(map(str, DEFAULT_TOP_KS))})")
    parser.add_argument("--cache-dtype", choices=sorted(VALUE_DTYPES), default=None,
                        help="value dtype of the top-K cache (default: the run config's, else bfloat16)")
    args = parser.parse_args(argv)
    for key in ("gpus", "nodes"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1")
    if args.gpu_mem <= 0:
        parser.error("--gpu-mem must be positive")
    try:
        pairs, settings = _pairs_from(args.config)
        dtype = settings.get("dtype", "auto")
        gpu_bytes = int(args.gpu_mem * GIB)
        setup = Setup(gpus_per_node=args.gpus, nodes=args.nodes,
                      micro_batch=args.micro_batch or settings["micro_batch"], seq_len=args.seq_len or settings["seq_len"],
                      dtype_bytes=4 if dtype == "float32" else 2, device="cuda", device_bytes=gpu_bytes,
                      fused_block_mib=settings.get("fused_block_mib"))
        chosen = None
        if "fused" in settings:
            chosen = Variant(offload=settings["offload"], checkpointing=settings["checkpointing"], fused=settings["fused"])
        blocks = []
        for student_name, teacher_name, label in pairs:
            student = model_shape(student_name, args.config_dir)
            teacher = model_shape(teacher_name, args.config_dir) if teacher_name else None
            vocab = min(student.vocab, teacher.vocab) if teacher else student.vocab
            block = render(student, teacher, replace(setup, vocab=vocab), gpu_bytes, label, chosen)
            if teacher is not None:
                top_ks = tuple(args.cache_top_k or settings.get("cache_top_ks") or DEFAULT_TOP_KS)
                dtype_name = args.cache_dtype or settings.get("cache_dtype") or "bfloat16"
                block += "\n\n" + "\n".join(cache_size_lines(vocab, top_ks, dtype_name, setup.seq_len,
                                                             (settings.get("samples") or {}).get(label)))
            blocks.append(block)
    except (PlanInputError, ModelConfigNotFound, ValueError) as err:
        print(f"rlkd plan: {err}", file=sys.stderr)
        return 2
    print("\n\n".join(blocks))
    print("\n   (estimates: DeepSpeed's ZeRO-3 estimator for model states, counted activations, 2 GiB CUDA/NCCL "
          "runtime; see rlkd/plan/memory.py)")
    return 0
