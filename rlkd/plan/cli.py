"""`rlkd plan CONFIG_OR_SPEC --gpus N --gpu-mem GB [--nodes M]`: per-GPU memory of a run before it is queued.

A run config (`rlkd train --config`) gives one teacher/student pair with its micro-batch, sequence
length, dtype, offload, checkpointing and fused-loss settings; a benchmark spec gives each pair its
training cells use (the cells as `rlkd bench` expands them) with their micro-batch and sequence
length. Models are resolved from config files only (see rlkd.plan.shapes).
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
    if "tasks" in tree:
        return _spec_pairs(path)
    raise PlanInputError(f"{path}: neither a run config (no `models:`) nor a benchmark spec (no `tasks:`)")


def _spec_pairs(path: Path) -> tuple[list[tuple[str, str | None, str]], dict]:
    """The (student, teacher) pairs a benchmark spec's training cells use, each labelled by its tasks,
    read from the cells as `rlkd bench` expands them (defaults, task, objective and variant merged);
    the teacher only where a cell's loss loads one. A student trained without a teacher (SFT,
    SeqKD) is planned only if no cell pairs it with one: that run needs less of everything.
    Micro-batch, sequence length and dtype are the first training cell's."""
    from rlkd.bench.spec import SpecError, expand, load_spec, run_config
    from rlkd.objectives import DistillLoss

    try:
        cells = [cell for cell in expand(load_spec(path)) if cell.kind == "distill"]
    except SpecError as exc:
        raise PlanInputError(str(exc)) from None
    if not cells:
        raise PlanInputError(f"{path}: no cell of this spec trains a model (evaluation only): nothing to plan")
    tasks: dict[tuple[str, str | None], list[str]] = {}
    limits: dict[tuple[str, str | None], dict[str, int | None]] = {}
    top_ks: list[int] = []
    cache_dtype = None
    for cell in cells:
        cfg = run_config(cell.run)
        pair = (cfg.models.student, cfg.models.teacher if DistillLoss(cfg.loss).needs_teacher else None)
        tasks.setdefault(pair, [])
        if cell.task not in tasks[pair]:
            tasks[pair].append(cell.task)
        limits.setdefault(pair, {})[cell.task] = cfg.data.limit
        if cfg.teacher_cache_top_k is not None:
            top_ks += [] if cfg.teacher_cache_top_k in top_ks else [cfg.teacher_cache_top_k]
            cache_dtype = cfg.teacher_cache_dtype
    taught = {student for student, teacher in tasks if teacher is not None}
    kept = [pair for pair in tasks if pair[1] is not None or pair[0] not in taught]
    pairs = [(student, teacher, ", ".join(tasks[(student, teacher)])) for student, teacher in kept]
    # a pair's positions: its tasks' sample caps summed (None where one task has no cap)
    samples = {label: (None if None in limits[(student, teacher)].values() else sum(limits[(student, teacher)].values()))
               for student, teacher, label in pairs}
    first = run_config(cells[0].run)
    settings = {"micro_batch": first.train.micro_batch_size, "seq_len": first.data.max_length,
                "dtype": first.models.dtype, "samples": samples,
                "cache_top_ks": tuple(sorted(top_ks)) or None, "cache_dtype": cache_dtype}
    return pairs, settings


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
