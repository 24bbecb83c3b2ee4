"""The one place that decides where rlkd computes, so that rlkd and DeepSpeed never disagree.

DeepSpeed picks its accelerator once, at import, from ``DS_ACCELERATOR`` (else by probing); rlkd
used to pick CUDA from ``torch.cuda.is_available()`` in several places. On a GPU machine with
``DS_ACCELERATOR=cpu`` exported (the test suite, the README's CPU examples) the two disagreed and
the first step failed with device-mismatch or NCCL-on-CPU errors. Now:

* ``device_type()`` is the decision: ``DS_ACCELERATOR`` when it is set (the user's explicit choice,
  which DeepSpeed reads too), otherwise ``cuda`` when torch sees a GPU, else ``cpu``.
* ``agree_with_deepspeed()`` exports that choice before DeepSpeed is imported and, if DeepSpeed
  had already settled on another accelerator, refuses with one line naming both.
* ``collective_device()`` is where tensors for the *current process group* must live (NCCL: the
  current GPU; gloo: the CPU), which is not always where a model runs (evaluation on the CPU after
  a GPU training in the same process).
* ``has_peers()``: whether that group has other ranks to agree with. A bench cell trains and
  evaluates in one process, and the one-process group its training started (NCCL on a GPU) stays
  up; evaluation ignores such a group instead of running collectives over it. (Ending it is no
  option: DeepSpeed keeps clones of the group for the next training in the same worker process.)
"""

from __future__ import annotations

import os

import torch

SUPPORTED = ("cuda", "cpu")


class DeviceMismatchError(RuntimeError):
    """rlkd and DeepSpeed would run on different devices."""


def device_type() -> str:
    """``"cuda"`` or ``"cpu"``; see the module docstring for the rule."""
    requested = os.environ.get("DS_ACCELERATOR", "").strip()
    if requested:
        if requested not in SUPPORTED:
            raise DeviceMismatchError(f"DS_ACCELERATOR={requested}: rlkd runs on {' or '.join(SUPPORTED)}")
        if requested == "cuda" and not torch.cuda.is_available():
            raise DeviceMismatchError("DS_ACCELERATOR=cuda but torch sees no CUDA device "
                                      "(torch.cuda.is_available() is False); unset it or set it to cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_gpu() -> bool:
    return device_type() == "cuda"


def agree_with_deepspeed() -> str:
    """rlkd's device type, after making sure DeepSpeed's accelerator is the same one."""
    kind = device_type()
    # Effective only before deepspeed's first import (it reads the variable once); child processes
    # (bench cells, launchers) inherit it either way.
    os.environ["DS_ACCELERATOR"] = kind
    from deepspeed.accelerator import get_accelerator

    theirs = get_accelerator().device_name()
    if theirs != kind:
        raise DeviceMismatchError(
            f"rlkd runs on {kind} but DeepSpeed's accelerator is {theirs} (DeepSpeed was imported before "
            f"DS_ACCELERATOR={kind} was set); export DS_ACCELERATOR={kind} before starting Python")
    return kind


def local_device(local_rank: int = 0) -> torch.device:
    """The device of this process's rank (and the current CUDA device set to it)."""
    if device_type() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def default_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if device_type() == "cuda" else torch.float32


def distributed_backend() -> str:
    return "nccl" if device_type() == "cuda" else "gloo"


def collective_device() -> torch.device:
    """Where a tensor handed to a collective of the default process group must live."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def has_peers() -> bool:
    """A process group is up and has more than this rank in it."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def eval_placement(device: str | None = None, dtype: str | None = None) -> tuple[str, str]:
    """``(device, dtype name)`` evaluation loads a model with: what is given, else the GPU in bf16
    when rlkd runs on one (the decision training uses), else the CPU in fp32."""
    if device is None:
        device = "cuda" if device_type() == "cuda" else "cpu"
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return device, dtype
