"""A distillation session: the frozen ZeRO-3 teacher engine, the ZeRO-3 student engine, the loss.

The teacher gets its own DeepSpeed inference engine (no optimizer, its own config, optional CPU
parameter offload), so it is partitioned like the student but never enters the optimizer or the
student's checkpoints. Each model is loaded while its own HfDeepSpeedConfig is the active one, so
`from_pretrained` puts weights straight into ZeRO-3 partitions; both config objects are kept alive
for the session because transformers only holds a weak reference to the active one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from rlkd.config import RunConfig
from rlkd.data import Batch, ResumableBatches, build_samples
from rlkd.data.jsonl import DataError
from rlkd.data.onpolicy import OnPolicyBatches
from rlkd.engine.distributed import device_for, ensure_distributed
from rlkd.engine.ds_config import student_ds_config, teacher_ds_config
from rlkd.engine.host_memory import keep_freed_host_memory
from rlkd.engine.schedule import lr_multiplier
from rlkd.lora import wrap_student
from rlkd.models import VocabPlan, config_vocab_size, load_causal_lm, load_tokenizer, plan_vocab, resolve_dtype


def build_loss(cfg: RunConfig):
    from rlkd.objectives import DistillLoss

    # The training step checks the loss's finiteness in its one host sync a step (rlkd.engine.train).
    return DistillLoss(cfg.loss, defer_finite_check=True)


def _scheduler_factory(cfg: RunConfig):
    train = cfg.train
    fn = partial(lr_multiplier, schedule=train.schedule, warmup_steps=train.warmup_steps,
                 total_steps=train.max_steps, min_lr_ratio=train.min_lr_ratio)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def with_epoch_steps(cfg: RunConfig, n_samples: int, world_size: int) -> RunConfig:
    """``train.epochs`` turned into ``train.max_steps`` for this many samples and ranks."""
    import math

    if cfg.train.epochs is None:
        return cfg
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    steps = max(1, math.ceil(cfg.train.epochs * n_samples / per_step))
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})


def _pad_id(tokenizer, vocab: VocabPlan) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None and candidate < vocab.shared_size:
            return int(candidate)
    return 0  # padded positions are masked out of attention and loss; any in-vocab id will do


@dataclass
class Session:
    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    vocab: VocabPlan
    tokenizer: Any
    batches: ResumableBatches | OnPolicyBatches
    teacher: Any  # DeepSpeedEngine (inference); None with a teacher cache or a loss that needs no teacher
    student: Any  # DeepSpeedEngine
    loss_fn: Any
    ds_configs: dict[str, dict]
    _hf_ds_configs: list = field(default_factory=list)
    teacher_cache: Any = None  # rlkd.teacher_cache.TeacherLogitCache
    heads_checked: bool = False  # the fused path checked once that logits are hidden @ head.T

    def teacher_logits(self, batch: Batch, host: Batch | None = None) -> torch.Tensor | None:
        """``host``: the batch's CPU copy, from which the teacher cache looks rows up without a sync."""
        if not self.loss_fn.needs_teacher:  # e.g. "ce": the teacher is never loaded
            return None
        if self.teacher_cache is not None:
            source = host if host is not None else batch
            if self.cfg.teacher_cache_top_k is not None:  # rlkd.objectives.sparse_teacher
                from rlkd.objectives.sparse_teacher import SparseTeacher

                ids, log_probs, tail = self.teacher_cache.sparse(source.input_ids, source.attention_mask)
                return SparseTeacher(ids, log_probs, tail, self.teacher_cache.temperature,
                                     self.teacher_cache.vocab_size).to(self.device)
            logits = self.teacher_cache.logits(source.input_ids, source.attention_mask, dtype=self.dtype)
            return logits[..., : self.vocab.shared_size].to(self.device, non_blocking=True)
        with torch.no_grad():
            out = self.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.logits[..., : self.vocab.shared_size]

    def student_logits(self, batch: Batch) -> torch.Tensor:
        out = self.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.logits[..., : self.vocab.shared_size]

    def close(self) -> None:
        """Drop the engines and the global HfDeepSpeedConfig so later plain `from_pretrained` calls
        in this process load ordinary (unpartitioned) models."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.teacher = self.student = None
        self._hf_ds_configs.clear()
        unset_hf_deepspeed_config()


def _check_data_ids(samples, vocab: VocabPlan) -> None:
    for index, sample in enumerate(samples):
        top = max(sample.input_ids)
        if top >= vocab.shared_size:
            raise DataError(f"training sample {index} contains token id {top}, outside the shared vocab "
                            f"of size {vocab.shared_size}")


def build_session(cfg: RunConfig) -> Session:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    rank, world_size, local_rank = ensure_distributed()
    device = device_for(local_rank)
    dtype = resolve_dtype(cfg.models.dtype)
    if device.type == "cpu":
        # The ranking term's gradients leave subnormal floats in the backward pass and Adam's
        # moments; x86 CPUs compute on those many times slower (measured: the whole KL+R step
        # 1.14x KL with them, 1.04x without). Flushing them to zero changes no value above 1e-38.
        torch.set_flush_denormal(True)
        keep_freed_host_memory()  # no page faults on every step's fresh N x V tensors (see the module)
    torch.manual_seed(cfg.seed)

    # Everything that can be wrong with vocabularies or data is checked before weights load.
    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.student)
    teacher_tokenizer = load_tokenizer(cfg.models.teacher_tokenizer or cfg.models.teacher)
    vocab = plan_vocab(config_vocab_size(cfg.models.teacher), config_vocab_size(cfg.models.student),
                       teacher_tokenizer, tokenizer, cfg.models.vocab_truncation)
    samples = build_samples(cfg.data, tokenizer)
    _check_data_ids(samples, vocab)
    cfg = with_epoch_steps(cfg, len(samples), world_size)
    batches = ResumableBatches(samples, cfg.train.micro_batch_size, rank=rank, world_size=world_size,
                               seed=cfg.seed, shuffle=cfg.data.shuffle, pad_id=_pad_id(tokenizer, vocab),
                               group_by_length=cfg.data.group_by_length)

    t_config = teacher_ds_config(cfg, dtype, world_size)
    s_config = student_ds_config(cfg, dtype, world_size)
    hf_refs = []

    def build_teacher():
        hf_refs.append(HfDeepSpeedConfig(t_config))
        teacher_model = load_causal_lm(cfg.models.teacher, dtype)
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        engine, *_ = deepspeed.initialize(model=teacher_model, config=t_config)
        engine.eval()
        return engine

    loss_fn = build_loss(cfg)
    teacher_engine = cache = None
    if loss_fn.needs_teacher and cfg.teacher_cache:
        # The ZeRO-3 teacher is built only if the cache entry is new, and dropped once it is written.
        from rlkd import teacher_cache

        fmt = None
        if cfg.teacher_cache_top_k is not None:
            from rlkd.teacher_topk_cache import TopKLogProbs

            fmt = TopKLogProbs(cfg.teacher_cache_top_k, cfg.teacher_cache_dtype, cfg.loss.temperature)
        cache = teacher_cache.open_or_build(cfg.teacher_cache, cfg.models.teacher, [s.input_ids for s in samples],
                                            vocab.shared_size, build_teacher,
                                            batch_size=cfg.train.micro_batch_size, device=device, fmt=fmt)
        if rank == 0:
            size = cache.meta.get("bytes_per_position", 4 * vocab.shared_size)
            print(f"rlkd: teacher cache {cache.directory}: {size:,} bytes per position "
                  f"(every logit in float32: {4 * vocab.shared_size:,})", flush=True)
    elif loss_fn.needs_teacher:
        teacher_engine = build_teacher()

    hf_refs.append(HfDeepSpeedConfig(s_config))
    student_model = load_causal_lm(cfg.models.student, dtype,
                                   gradient_checkpointing=cfg.models.gradient_checkpointing)
    if cfg.models.student_lora is not None:
        student_model = wrap_student(student_model, cfg.models.student_lora, cfg.models.gradient_checkpointing)
    student_model.train()
    trainable = [p for p in student_model.parameters() if p.requires_grad]  # all of them, except with LoRA
    optimizer = None
    if cfg.train.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
        if cfg.deepspeed.student_offload_optimizer and rank == 0:
            print("rlkd: deepspeed.student_offload_optimizer with train.optimizer=torch_adamw: torch's AdamW steps "
                  "the offloaded fp32 partitions on the host (train.optimizer=deepspeed_adamw uses DeepSpeed's "
                  "CPUAdam, faster, but JIT-built with g++ and ninja at first use)", flush=True)
    student_engine, *_ = deepspeed.initialize(model=student_model, optimizer=optimizer,
                                              model_parameters=trainable,
                                              lr_scheduler=_scheduler_factory(cfg), config=s_config)
    if cfg.data.on_policy is not None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        batches = OnPolicyBatches(batches, student_engine.module, cfg.data.on_policy, seed=cfg.seed, rank=rank,
                                  world_size=world_size, max_length=cfg.data.max_length, device=device,
                                  eos_id=eos_id if eos_id is not None else student_model.config.eos_token_id)
    return Session(cfg=cfg, rank=rank, world_size=world_size, device=device, dtype=dtype, vocab=vocab,
                   tokenizer=tokenizer, batches=batches, teacher=teacher_engine, student=student_engine,
                   loss_fn=loss_fn, ds_configs={"teacher": t_config, "student": s_config},
                   _hf_ds_configs=hf_refs, teacher_cache=cache)

