"""`rlkd launch slurm --nodes N (--gpus-per-node G | --procs-per-node P) --config run.yaml [key=value ...]`
[--dry-run] [--time T --requeue-warning S]."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from rlkd.config import ConfigError, load_config
from rlkd.launch.slurm import (PartitionError, SlurmJob, cpus_per_task, hosts_from_environment, node_address,
                               node_commands, partition_node_cpus, render, time_limit_seconds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlkd launch", description="Launch `rlkd train` on a cluster.")
    sub = parser.add_subparsers(dest="target", required=True)
    slurm = sub.add_parser("slurm", help="render (and submit) a Slurm batch script: srun + torchrun per node")
    slurm.add_argument("--config", required=True, help="run config YAML (validated before anything is written)")
    slurm.add_argument("overrides", nargs="*", metavar="key=value", help="passed on to `rlkd train`")
    slurm.add_argument("--nodes", type=int, required=True)
    per_node = slurm.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="GPU nodes: one process per GPU (NCCL)")
    per_node.add_argument("--procs-per-node", type=int,
                          help="CPU nodes: processes per node, no GPU request (gloo, DS_ACCELERATOR=cpu)")
    slurm.add_argument("--dry-run", action="store_true", help="print the script and each node's command; submit nothing")
    slurm.add_argument("--resume", action="store_true", help="pass --resume to `rlkd train`")
    slurm.add_argument("--job-name", default="rlkd-train")
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--requeue-warning", type=int, default=300, metavar="SECONDS",
                       help="Slurm signals the job this long before --time; it checkpoints at the next step and "
                            "requeues itself, and the requeued job resumes (0: no signal, no requeue)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--cpus-per-task", type=int, default=None,
                       help="CPUs of each node's task (default: what the partition's nodes have, from sinfo; "
                            "refused if no --nodes nodes have that many)")
    slurm.add_argument("--mem", help="#SBATCH --mem per node (default on GPU nodes: 0, all of each node's memory)")
    slurm.add_argument("--master-port", type=int, default=29500)
    slurm.add_argument("--script", help="where to write the sbatch script (default <output_dir>/slurm/train.sbatch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    per_node = args.gpus_per_node if args.gpus_per_node is not None else args.procs_per_node
    if args.nodes < 1 or per_node < 1:
        print("rlkd launch: --nodes and --gpus-per-node/--procs-per-node must be >= 1", file=sys.stderr)
        return 2
    try:
        limit_s = time_limit_seconds(args.time)
    except ValueError as exc:
        print(f"rlkd launch: {exc}", file=sys.stderr)
        return 2
    # A warning as long as the limit would stop every start after its first step, forever.
    if not 0 <= args.requeue_warning < limit_s:
        print(f"rlkd launch: --requeue-warning {args.requeue_warning} must be >= 0 and shorter than --time "
              f"{args.time} ({limit_s} s)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"rlkd launch: {exc}", file=sys.stderr)
        return 2
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        print("rlkd launch: --cpus-per-task must be >= 1", file=sys.stderr)
        return 2
    try:
        cpus, origin = cpus_per_task(args.cpus_per_task, args.nodes, partition_node_cpus(args.partition))
    except PartitionError as exc:
        print(f"rlkd launch: {exc}", file=sys.stderr)
        return 2
    if origin:
        print(f"rlkd launch: {origin}", file=sys.stderr)
    output_dir = Path(cfg.output_dir).resolve()
    job = SlurmJob(config=Path(args.config).resolve(), nodes=args.nodes, procs_per_node=per_node,
                   gpus=args.gpus_per_node is not None, overrides=list(args.overrides), resume=args.resume,
                   job_name=args.job_name, time=args.time, cpus_per_task=cpus, mem=args.mem,
                   master_port=args.master_port, log_dir=output_dir / "slurm-logs",
                   manifest=output_dir / "manifest.json", requeue_warning_s=args.requeue_warning,
                   partition=args.partition, account=args.account)
    script_text = render(job)
    script_path = Path(args.script) if args.script else output_dir / "slurm" / "train.sbatch"

    if args.dry_run:
        hosts, origin = hosts_from_environment(args.nodes)
        master = (node_address(hosts[0]) if origin.startswith("SLURM_JOB_NODELIST") else None) or hosts[0]
        try:
            commands = node_commands(job, hosts, master)
        except ValueError as exc:
            print(f"rlkd launch: {exc}", file=sys.stderr)
            return 2
        print(f"# sbatch script (would be written to {script_path}):")
        print(script_text)
        print(f"# hosts: {origin}")
        print(f"# world size {args.nodes * per_node}; master {master}:{args.master_port} (the first node's NodeAddr)")
        if job.requeue_warning_s:
            print(f"# {job.requeue_warning_s} s before --time the job checkpoints and requeues itself; "
                  "the requeued job runs these commands with --resume")
        for node_rank, (host, ranks, command) in enumerate(commands):
            print(f"[node {node_rank} {host}] ranks {ranks.start}-{ranks.stop - 1}: {command}")
        return 0

    script_path.parent.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script_text, encoding="utf-8")
    if shutil.which("sbatch") is None:
        print(f"rlkd launch: wrote {script_path}, but `sbatch` is not on PATH; submit it on the cluster",
              file=sys.stderr)
        return 1
    done = subprocess.run(["sbatch", str(script_path)], capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
