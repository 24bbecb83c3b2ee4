"""Slurm launch rendering, checked by running the rendered script against fake srun/scontrol/torchrun."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from rlkd.launch.cli import main
from rlkd.launch.slurm import SlurmJob, expand_nodelist, node_commands, render


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                    "models": {"teacher": "/models/teacher", "student": "/models/student"},
                                    "data": {"task": "gsm8k"}}))
    return path


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a1,b[7,9-10],c", ["a1", "b7", "b9", "b10", "c"]),
    ("node5", ["node5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_rendered_script_runs_exactly_the_dry_run_commands(tmp_path, config_path, capsys, monkeypatch):
    """Run the sbatch script with stand-ins: srun starts the task once per node with that node's
    SLURM_NODEID, torchrun records its arguments. They must equal what --dry-run prints, and the
    master is the first node's NodeAddr, not its name."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    record.mkdir()
    _executable(bin_dir / "scontrol", 'if [[ $1 == show && $2 == node ]]; then\n'
                '  echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.0.0.$(( ${3: -1} )) NodeHostName=$3 Version=22.05"\n'
                'else echo gpu001; echo gpu002; fi\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-002]")
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", str(config_path),
                 "train.max_steps=100", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    dry_run = [line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("[node ")]
    assert len(dry_run) == 2 and "--node_rank=1 --master_addr=10.0.0.1 " in dry_run[1]

    # srun: drop its own options, then run the task once per node
    _executable(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit 1; done\n')
    _executable(bin_dir / "torchrun", f'printf "%s\\n" torchrun "$@" > {record}/node$SLURM_NODEID\n')

    job = SlurmJob(config=config_path.resolve(), nodes=2, procs_per_node=8, overrides=["train.max_steps=100"],
                   log_dir=tmp_path / "logs")
    script = tmp_path / "train.sbatch"
    script.write_text(render(job))
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu[001-002]",
               SLURM_NNODES="2", SLURM_JOB_ID="42")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for node, expected in enumerate(dry_run):
        ran = (record / f"node{node}").read_text().splitlines()
        assert ran == shlex.split(expected)


def test_sbatch_header_and_commands_follow_the_request(config_path):
    job = SlurmJob(config=config_path, nodes=3, procs_per_node=4, partition="gpu", resume=True)
    text = render(job)
    for line in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", 'scontrol show hostnames "$SLURM_JOB_NODELIST"'):
        assert line in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    commands = node_commands(job, ["h1", "h2", "h3"])
    assert [c[1] for c in commands] == [range(0, 4), range(4, 8), range(8, 12)]
    assert all(c[2].endswith("--resume") and "--master_addr=h1" in c[2] for c in commands)
    with pytest.raises(ValueError, match="--nodes 3 but the node list has 2 hosts"):
        node_commands(job, ["h1", "h2"])


def test_launch_rejects_a_bad_config_key(tmp_path, config_path, capsys):
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", str(config_path),
                 "train.bogus=1", "--dry-run"]) == 2
    assert "train.bogus: unknown key" in capsys.readouterr().err
