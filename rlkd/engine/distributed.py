"""torch.distributed set-up that works under deepspeed/torchrun launchers and in a plain process."""

from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as dist

from rlkd.device import agree_with_deepspeed, collective_device, distributed_backend, local_device
from rlkd.paths import REPO_ROOT

# What a launcher (torchrun, deepspeed) or ensure_distributed's own one-process group puts in the
# environment: a child process that inherits them tries to join this process's group.
LAUNCHER_VARS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                           "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"})


def child_env(*, rlkd_on_path: bool = False, drop_prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment of a child rlkd process that starts its own process group: this one's without
    LAUNCHER_VARS (nor variables starting with ``drop_prefixes``), plus ``extra``. ``rlkd_on_path``
    puts this rlkd's source tree first on PYTHONPATH, so that the child imports the same code."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(drop_prefixes)}
    if rlkd_on_path:
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_distributed() -> tuple[int, int, int]:
    """Initialise the process group once; returns (rank, world_size, local_rank).

    Without a launcher (no RANK in the environment) this starts a one-process gloo group, so the
    engine can be driven in-process (tests, the benchmark harness).
    """
    # DeepSpeed still calls the collectives torch renamed; the notice repeats every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    if not dist.is_initialized():
        agree_with_deepspeed()  # before deepspeed's import picks its accelerator
        import deepspeed

        backend = distributed_backend()
        if "RANK" in os.environ:  # a launcher set up the rendezvous
            deepspeed.init_distributed(dist_backend=backend)
        else:
            # A port found free can be taken by another process (or an outgoing connection's
            # ephemeral port) before the store listens on it: pick another and try again.
            for attempt in range(5):
                os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                   "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                   "MASTER_PORT": str(_free_port())})
                try:
                    deepspeed.init_distributed(dist_backend=backend)
                    break
                except dist.DistNetworkError as exc:
                    if "EADDRINUSE" not in str(exc) or attempt == 4:
                        raise
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return dist.get_rank(), dist.get_world_size(), local_rank


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks: a copy, on the device of ``values`` (it travels on the group's own device)."""
    out = values.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        on_group = out.to(collective_device())
        dist.all_reduce(on_group, op=dist.ReduceOp.SUM)
        out = on_group.to(values.device)
    return out


def device_for(local_rank: int) -> torch.device:
    return local_device(local_rank)
