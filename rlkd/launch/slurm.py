"""Render the Slurm batch script for a multi-node `rlkd train` (srun + torchrun static rendezvous)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rlkd.paths import REPO_ROOT

TEMPLATE = REPO_ROOT / "scripts" / "slurm" / "rlkd_train.sbatch.template"


@dataclass
class SlurmJob:
    config: Path
    nodes: int
    procs_per_node: int           # torchrun processes per node: one per GPU, or CPU processes (gloo)
    gpus: bool = True             # request `--gpus-per-node=procs_per_node`; False: CPU nodes, no GRES
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    job_name: str = "rlkd-train"
    time: str = "24:00:00"
    cpus_per_task: int = 16       # rlkd launch slurm: what the partition's nodes have (sinfo), else 16
    mem: str | None = None        # #SBATCH --mem; GPU jobs default to 0 (all of each node's memory)
    master_port: int = 29500
    log_dir: Path = Path("slurm-logs")
    manifest: Path = Path("manifest.json")   # the run's manifest: says whether a stopped run wants requeueing
    requeue_warning_s: int = 300  # seconds before the time limit to checkpoint and requeue; 0: neither
    partition: str | None = None
    account: str | None = None
    omp_num_threads: int = 4
    launcher: str = "torchrun"
    env: dict[str, str] = field(default_factory=dict)

    def train_args(self) -> list[str]:
        return list(self.overrides) + (["--resume"] if self.resume else [])

    def environment(self) -> dict[str, str]:
        # DeepSpeed's accelerator is set either way, never guessed on the node: cpu on CPU nodes
        # (torch.distributed then uses gloo), cuda on GPU nodes (NCCL).
        return {"DS_ACCELERATOR": "cuda" if self.gpus else "cpu"} | self.env

    def memory(self) -> str | None:
        if self.mem is not None:
            return self.mem
        # A GPU job holds its nodes' GPUs: without a request it gets the partition's default memory
        # per CPU, far too little for ranks that each load a checkpoint into host memory.
        return "0" if self.gpus else None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[001-003,7],login1") as `scontrol show hostnames` prints it."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-", 1)
                width = len(start)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(start), int(end) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def time_limit_seconds(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise ValueError(f"--time {text!r}: not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    if third is not None:  # H:M:S
        return (first * 60 + second) * 60 + third
    return first * 60 + (second or 0)  # M or M:S


def render(job: SlurmJob) -> str:
    extra = []
    if job.partition:
        extra.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        extra.append(f"#SBATCH --account={job.account}")
    if job.memory() is not None:
        if job.memory() == "0":
            extra.append("# --mem=0: all of each node's memory")
        extra.append(f"#SBATCH --mem={job.memory()}")
    requeue = [f"#SBATCH --signal=B:USR1@{job.requeue_warning_s}", "#SBATCH --requeue"] if job.requeue_warning_s else []
    env_lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(job.environment().items())]
    values = {
        "JOB_NAME": job.job_name, "NODES": str(job.nodes), "PROCS_PER_NODE": str(job.procs_per_node),
        "GRES": f"#SBATCH --gpus-per-node={job.procs_per_node}" if job.gpus else "# CPU nodes: no GPU request",
        "CPUS_PER_TASK": str(job.cpus_per_task), "TIME": job.time, "LOG_DIR": str(job.log_dir),
        "REQUEUE_SBATCH": "\n".join(requeue) or "# no time-limit warning, no requeue (--requeue-warning 0)",
        "EXTRA_SBATCH": "\n".join(extra), "MASTER_PORT": str(job.master_port),
        "OMP_NUM_THREADS": str(job.omp_num_threads), "EXTRA_ENV": "\n".join(env_lines),
        "LAUNCHER": job.launcher, "CONFIG": shlex.quote(str(job.config)),
        "TRAIN_ARGS": "".join(" " + shlex.quote(a) for a in job.overrides),
        "RESUME_ARG": "--resume" if job.resume else "", "MANIFEST": shlex.quote(str(job.manifest)),
    }
    if any(c.isspace() for c in str(job.log_dir)):
        raise ValueError(f"log directory {job.log_dir}: Slurm's #SBATCH --output cannot hold whitespace")
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    leftover = re.findall(r"@@[A-Z_]+@@", text)
    if leftover:
        raise ValueError(f"{TEMPLATE}: unfilled placeholders {leftover}")
    if "'" in values["CONFIG"] + values["TRAIN_ARGS"]:
        raise ValueError("config path and overrides must not need shell quoting inside the srun command")
    return text


def node_commands(job: SlurmJob, hosts: list[str], master: str | None = None) -> list[tuple[str, range, str]]:
    """(host, global ranks, command) for each node: what torchrun runs there (a requeued job adds --resume).

    `master` is the first node's address (its NodeAddr); the script looks it up, default: its name."""
    if len(hosts) != job.nodes:
        raise ValueError(f"--nodes {job.nodes} but the node list has {len(hosts)} hosts: {hosts}")
    master = master or hosts[0]
    out = []
    for node_rank, host in enumerate(hosts):
        command = [job.launcher, f"--nnodes={job.nodes}", f"--nproc_per_node={job.procs_per_node}",
                   f"--node_rank={node_rank}", f"--master_addr={master}", f"--master_port={job.master_port}",
                   "-m", "rlkd.cli", "train", "--config", str(job.config), *job.train_args()]
        ranks = range(node_rank * job.procs_per_node, (node_rank + 1) * job.procs_per_node)
        out.append((host, ranks, shlex.join(command)))
    return out


class PartitionError(ValueError):
    """The job asks for more than the partition's nodes have: it would pend forever."""


def partition_node_cpus(partition: str | None) -> tuple[str, dict[str, int]] | None:
    """``(partition, {node: CPUs})`` of the named partition (the default one when None), from
    ``sinfo``; None where sinfo is missing or fails (not on a cluster) or no default is marked."""
    if shutil.which("sinfo") is None:
        return None
    try:
        done = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %c %P"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    nodes: dict[str, int] = {}
    chosen = partition
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) != 3 or not fields[1].isdigit():
            continue
        name, cpus, part = fields
        if partition is None and part.endswith("*"):
            chosen = part.rstrip("*")
        if part.rstrip("*") == chosen:
            nodes[name] = int(cpus)
    if chosen is None:
        return None
    return chosen, nodes


def cpus_per_task(requested: int | None, nodes: int, found: tuple[str, dict[str, int]] | None) -> tuple[int, str | None]:
    """The ``--cpus-per-task`` of a job of ``nodes`` nodes (one task each) and a line saying where
    it came from; raises PartitionError where no ``nodes`` nodes of the partition could run it."""
    if found is None:
        if requested is not None:
            return requested, None
        return 16, "--cpus-per-task 16: sinfo could not say what the nodes have (not on the cluster?); pass --cpus-per-task"
    partition, node_cpus = found
    counts = sorted(node_cpus.values(), reverse=True)
    listed = ", ".join(f"{name} {cpus}" for name, cpus in sorted(node_cpus.items())[:8]) + (
        f" and {len(node_cpus) - 8} more" if len(node_cpus) > 8 else "")
    if len(counts) < nodes:
        raise PartitionError(f"--nodes {nodes}: partition {partition} has {len(counts)} node(s) ({listed or 'none'}, "
                             "from sinfo); the job would never start")
    fits = counts[nodes - 1]  # the most CPUs that `nodes` nodes all have
    if requested is None:
        return fits, f"--cpus-per-task {fits}: what {nodes} node(s) of partition {partition} have (sinfo)"
    if requested > fits:
        raise PartitionError(f"--cpus-per-task {requested}: no {nodes} node(s) of partition {partition} have that many "
                             f"CPUs (sinfo: {listed}); the job would pend forever (Reason=PartitionConfig). "
                             f"Use --cpus-per-task {fits} or fewer")
    return requested, None


def node_address(node: str) -> str | None:
    """The address Slurm reaches `node` at (NodeAddr of `scontrol show node`), None without Slurm."""
    if shutil.which("scontrol") is None:
        return None
    done = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True)
    match = re.search(r"NodeAddr=(\S+)", done.stdout) if done.returncode == 0 else None
    return match.group(1) if match else None


def hosts_from_environment(nodes: int) -> tuple[list[str], str]:
    """Hosts of the current allocation (SLURM_JOB_NODELIST), or placeholders outside one."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        return expand_nodelist(nodelist), f"SLURM_JOB_NODELIST={nodelist}"
    return [f"node{i}" for i in range(nodes)], "placeholder hosts (no SLURM_JOB_NODELIST; Slurm picks the nodes)"
