"""The distillation loop behind `rlkd train`, also callable in-process:

    from rlkd.engine.train import run_training
    result = run_training(cfg)            # cfg: RunConfig, a dict, or a YAML path
    result.export_dir, result.metrics_path

Loss normalisation: each micro-batch contributes `loss_sum`, the SUM of per-token losses over its
supervised positions; the step's loss is the total over all micro-batches and ranks divided by the
global count of supervised positions, which is all-reduced before the first backward. DeepSpeed
averages gradients over ranks and divides each micro-batch loss by the accumulation steps, so each
micro-batch loss is scaled by world_size * grad_accum / global_count to undo both.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlkd.config import RunConfig, load_config
from rlkd.data.encode import IGNORE_INDEX
from rlkd.engine import agreement, preflight, reporting, resume as resuming
from rlkd.engine.distributed import all_reduce_sum
from rlkd.engine.heads import fused_loss_and_backward
from rlkd.engine.manifest import build_manifest
from rlkd.engine.preemption import StopRequest
from rlkd.lora import is_lora, save_lora_export
from rlkd.provenance import atomic_write_json
from rlkd.engine.session import Session, build_session


# Metrics the loss reports per micro-batch rather than as sums over token positions.
COUNT_METRICS = frozenset({"rank_fallback"})


@dataclass
class TrainResult:
    output_dir: Path
    export_dir: Path | None       # consolidated HF checkpoint (save_pretrained), None if export disabled
    metrics_path: Path            # JSONL, one row per logged optimizer step
    manifest_path: Path
    steps: int                    # optimizer steps completed
    resumed_from: int | None      # step of the checkpoint resumed from, if any
    stopped_early: bool = False   # a stop request (Slurm's time-limit warning) ended it after a checkpoint
    last_metrics: dict[str, Any] = field(default_factory=dict)


def _as_config(cfg: RunConfig | dict | str | Path, overrides) -> RunConfig:
    if isinstance(cfg, RunConfig):
        return load_config(base=cfg.model_dump(), overrides=overrides) if overrides else cfg
    if isinstance(cfg, dict):
        return load_config(base=cfg, overrides=overrides)
    return load_config(cfg, overrides=overrides)


def loss_scale(engine) -> float:
    """The factor DeepSpeed's backward multiplies the loss by: fp16's current (dynamic) loss scale,
    else 1. A Python number on the optimizer; reading it costs no sync."""
    if not engine.fp16_enabled():
        return 1.0
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


def _device_scalar(value, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value))
    return value.detach().reshape(()).to(device=device, dtype=torch.float64)


def train_step(session: Session, step: int) -> dict[str, float]:
    """One optimizer step (grad_accum micro-batches); returns the step's metrics (global means).

    Host-device syncs: one a step, at its end. Token counts come from the batches' host copies, the
    normalisation stays a device tensor, the loss keeps its sums and finiteness flag on the device,
    and all of them travel back in one packed tensor (with the all-reduce over ranks).
    """
    cfg, engine = session.cfg, session.student
    host_batches = [next(session.batches) for _ in range(cfg.train.grad_accum)]
    host_batches = [b.to("cpu") for b in host_batches]  # no-op for the loader's batches (built on the host)
    micro_batches = [b.to(session.device) for b in host_batches]
    # A loss whose terms all declare counts="labelled" (cross-entropy) has nothing to learn where
    # the next token is unknown (the official mask's after-EOS position): those do not count.
    label_only = session.loss_fn.counts_labelled_only
    masks = [(b.supervised & (b.labels != IGNORE_INDEX)) if label_only else b.supervised for b in host_batches]
    local = torch.stack([m.sum() for m in masks]).sum().to(torch.float64).reshape(1)
    attended = torch.stack([b.attention_mask.sum() for b in host_batches]).sum().to(torch.float64)
    global_count = all_reduce_sum(local.to(session.device, non_blocking=True))[0]  # stays on the device
    scale = session.world_size * cfg.train.grad_accum / global_count
    # fp16 only: the loss stores its gradient already multiplied by what backward brings (the
    # normalisation times the loss scale), so that small gradients survive the cast to fp16.
    # fp32 and bf16 have fp32's exponent range; there the gradient is stored unscaled, which
    # keeps their steps bit-identical with the plain autograd order of operations.
    grad_scale = scale * loss_scale(engine) if engine.fp16_enabled() else None
    lr = engine.lr_scheduler.get_last_lr()[0] if engine.lr_scheduler is not None else cfg.train.lr

    sums: dict[str, torch.Tensor | float] = {}
    loss_total = torch.zeros((), dtype=torch.float64, device=session.device)
    finite = torch.ones((), dtype=torch.bool, device=session.device)
    for batch, host in zip(micro_batches, host_batches):
        if cfg.loss.fused_lm_head:  # hidden states and head weights; no N x V logits
            out = fused_loss_and_backward(session, batch, scale, host=host, grad_scale=grad_scale)
        else:
            teacher_logits = session.teacher_logits(batch, host)
            student_logits = session.student_logits(batch)
            out = session.loss_fn(student_logits, teacher_logits, host.supervised, labels=batch.labels,
                                  grad_scale=grad_scale)
            if agreement.due(cfg.agreement_every, step):
                out.device_metrics.update(agreement.agreement_sums(student_logits, teacher_logits, batch.supervised))
            engine.backward(out.loss_sum * scale)
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        loss_total = loss_total + out.loss_sum.detach().to(torch.float64)
        if out.finite is not None:
            finite = finite & out.finite
        for key, value in out.device_metrics.items():
            sums[key] = sums.get(key, 0.0) + value

    keys = sorted(sums)
    device = session.device
    local_values = [loss_total, attended.to(device)] + [_device_scalar(sums[k], device) for k in keys]
    packed = all_reduce_sum(torch.stack(local_values))
    grad_norm = engine.get_global_grad_norm()
    tail = [global_count.reshape(()), (~finite).to(torch.float64)]
    if isinstance(grad_norm, torch.Tensor):
        tail.append(grad_norm.detach().reshape(()).to(device=device, dtype=torch.float64))
    values = torch.cat([packed, torch.stack(tail)]).tolist()  # the step's one host-device sync
    count, nonfinite = values[len(local_values)], values[len(local_values) + 1]
    if count == 0:
        raise RuntimeError(f"step {step}: no supervised token in any micro-batch on any rank")
    if nonfinite:
        raise FloatingPointError(f"step {step}: the loss is not finite on rank {session.rank} (NaN/Inf in the "
                                 "student's or teacher's logits, or an overflow)")
    metrics = {"step": step + 1, "loss": values[0] / count, "lr": lr, "supervised_tokens": count, "tokens": values[1]}
    for index, key in enumerate(keys):
        total = values[2 + index]
        metrics[key] = total if key in COUNT_METRICS else total / count
    if isinstance(grad_norm, torch.Tensor):
        grad_norm = values[-1]
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    return metrics


def _export(session: Session, export_dir: Path) -> None:
    """Consolidate the ZeRO-3 partitions into one HF checkpoint (collective; rank 0 writes)."""
    engine = session.student
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if session.rank == 0:
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if is_lora(engine.module):
            save_lora_export(engine.module, state_dict, tmp)  # merged weights, plus tmp/adapter
        else:
            engine.module.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        if session.tokenizer is not None:
            session.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(export_dir, ignore_errors=True)
        os.replace(tmp, export_dir)
    if dist.is_initialized():
        dist.barrier()


def run_training(cfg: RunConfig | dict | str | Path, *, resume: bool = False,
                 overrides: list[str] | tuple[str, ...] = (),
                 allow_changes: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Train the student for `cfg.train.max_steps` optimizer steps; see the module docstring.

    Works under `deepspeed`/`torchrun` launchers and in a plain process (one-rank gloo group).
    `resume=True` continues from the latest checkpoint in `<output_dir>/checkpoints` if there is one,
    provided the saved config differs only in keys that cannot change results (rlkd.engine.resume;
    `allow_changes` names keys accepted anyway). Without it, a folder holding checkpoints is refused.
    Config, paths and the start plan are checked before any weights load (PreflightError, ResumeError).
    """
    from tqdm import tqdm

    cfg = _as_config(cfg, overrides)
    output_dir = Path(cfg.output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    export_dir = output_dir / "export"
    manifest_path = output_dir / "manifest.json"

    preflight.check(cfg)
    plan = resuming.plan_start(cfg, resume=resume, allow_changes=allow_changes)
    session = build_session(cfg)
    cfg = session.cfg  # train.epochs resolved to max_steps
    reporter = None
    running = False  # this run has written a manifest saying "running"
    try:
        rank = session.rank
        plan.prepare(rank)
        if dist.is_initialized():
            dist.barrier()
        start_step = resuming.restore(session, plan)
        resumed_from = plan.step
        if rank == 0:
            atomic_write_json(manifest_path, build_manifest(cfg, session.ds_configs, session.world_size,
                                                            plan.manifest_fields("running"),
                                                            data_files_sha256=plan.data_files_sha256))
            running = True

        reporter = reporting.open_reporter(cfg.report_to, output_dir, rank, resumed_from, cfg.model_dump())
        last: dict[str, Any] = {}
        stop, stopped_at = StopRequest.from_environment(), None
        bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=(rank != 0 or not cfg.progress_bar),
                   desc="rlkd train", dynamic_ncols=True)
        for step in range(start_step, cfg.train.max_steps):
            started = time.perf_counter()
            last = train_step(session, step)
            elapsed = time.perf_counter() - started
            last["step_time_s"] = elapsed
            last["tokens_per_s"] = last["tokens"] / elapsed
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.train.max_steps):
                with metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(last) + "\n")
                reporter.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            bar.update(1)
            every = cfg.checkpoint.every_steps
            stopping = step + 1 < cfg.train.max_steps and stop.requested(session.device)
            if stopping or (every and (step + 1) % every == 0 and step + 1 < cfg.train.max_steps):
                resuming.save_checkpoint(session, plan, step + 1)
            if stopping:
                stopped_at = step + 1
                break
        bar.close()
        if stopped_at is not None:  # no export: the requeued job resumes from the checkpoint just written
            if rank == 0:
                atomic_write_json(manifest_path, build_manifest(cfg, session.ds_configs, session.world_size,
                                                                plan.manifest_fields("preempted", steps=stopped_at,
                                                                                     final_metrics=last)))
            return TrainResult(output_dir=output_dir, export_dir=None, metrics_path=metrics_path,
                               manifest_path=manifest_path, steps=stopped_at, resumed_from=resumed_from,
                               last_metrics=last, stopped_early=True)

        if cfg.export:
            _export(session, export_dir)
        if rank == 0:
            atomic_write_json(manifest_path, build_manifest(cfg, session.ds_configs, session.world_size,
                                                            plan.manifest_fields("finished", steps=cfg.train.max_steps,
                                                                                 final_metrics=last)))
        return TrainResult(output_dir=output_dir, export_dir=export_dir if cfg.export else None,
                           metrics_path=metrics_path, manifest_path=manifest_path, steps=cfg.train.max_steps,
                           resumed_from=resumed_from, last_metrics=last)
    except BaseException as exc:
        if running:  # never leave a manifest claiming "running" behind a run that stopped
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            atomic_write_json(manifest_path, build_manifest(
                cfg, session.ds_configs, session.world_size,
                plan.manifest_fields(status, error=f"{type(exc).__name__}: {exc}"),
                data_files_sha256=plan.data_files_sha256))
        raise
    finally:
        if reporter is not None:
            reporter.close()
        session.close()
