"""DeepSpeed configs: a JSON file from ds_configs/ plus the keys a run decides."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from rlkd.device import on_gpu
from rlkd.paths import REPO_ROOT

DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


def read_ds_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = DS_CONFIG_DIR / path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: DeepSpeed config is not valid JSON ({exc.msg})") from None


def prebuilt_op(name: str) -> bool:
    """Whether the installed DeepSpeed ships op ``name`` compiled (a wheel built with DS_BUILD_OPS=1);
    otherwise using it means a JIT build at start-up."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(name, False))


def _set_precision(config: dict[str, Any], dtype: torch.dtype) -> None:
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}


def student_ds_config(cfg, dtype: torch.dtype, world_size: int) -> dict[str, Any]:
    default = "zero3_bf16.json" if on_gpu() else "zero3_fp32_cpu.json"
    config = copy.deepcopy(read_ds_json(cfg.deepspeed.student_config or default))
    train = cfg.train
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    config["gradient_clipping"] = train.grad_clip
    _set_precision(config, dtype)
    zero = config.setdefault("zero_optimization", {})
    offload = cfg.deepspeed.student_offload_optimizer
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if train.optimizer == "deepspeed_adamw":
        params = {"lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}
        if not offload and not prebuilt_op("fused_adam"):
            # FusedAdam would be JIT-compiled with nvcc at start-up, which pip-only images lack;
            # DeepSpeed's own switch makes it use torch's AdamW (same update rule, no build).
            params["torch_adam"] = True
        config["optimizer"] = {"type": "AdamW", "params": params}
    else:
        config.pop("optimizer", None)
        config["zero_allow_untested_optimizer"] = True
        if offload:
            # The client torch AdamW then steps the fp32 partitions on the host. DeepSpeed refuses
            # that by default, preferring its CPUAdam, whose C++ op is JIT-built at first use (g++
            # and ninja; 4-5 min on 2 cores) and absent from pure-Python wheels; deepspeed_adamw asks for it.
            config["zero_force_ds_cpu_optimizer"] = False
    config.pop("scheduler", None)  # the schedule is ours (rlkd.engine.schedule), stepped by DeepSpeed
    return config


def teacher_ds_config(cfg, dtype: torch.dtype, world_size: int) -> dict[str, Any]:
    config = copy.deepcopy(read_ds_json(cfg.deepspeed.teacher_config or "teacher_zero3_inference.json"))
    config["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = cfg.train.micro_batch_size * world_size
    _set_precision(config, dtype)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError("the teacher config must use ZeRO stage 3 (zero_optimization.stage = 3)")
    if cfg.deepspeed.teacher_offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    return config
