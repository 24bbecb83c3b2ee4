"""Slurm launch rendering, checked by running the rendered script against fake srun/scontrol/torchrun."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from rlkd.launch.cli import main
from rlkd.launch.slurm import SlurmJob, expand_nodelist, node_commands, render, time_limit_seconds


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
                '  echo "NodeName=$3 Arch=x86_64"\n'
                '  echo "   NodeAddr=10.0.0.$(( ${3: -1} )) NodeHostName=$3 Version=22.05"\n'
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


def test_cpu_nodes_request_no_gpus_and_run_deepspeed_on_cpu(config_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    assert main(["slurm", "--nodes", "2", "--procs-per-node", "3", "--config", str(config_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "--gpus-per-node" not in printed and "gres" not in printed.lower()
    assert "\nexport DS_ACCELERATOR=cpu\n" in printed
    assert "# world size 6;" in printed
    nodes = [line for line in printed.splitlines() if line.startswith("[node ")]
    assert [n.split(": ", 1)[0] for n in nodes] == ["[node 0 node0] ranks 0-2", "[node 1 node1] ranks 3-5"]
    assert all("--nproc_per_node=3" in n for n in nodes)

    job = SlurmJob(config=config_path, nodes=2, procs_per_node=8)  # GPU nodes keep their GRES request
    assert "#SBATCH --gpus-per-node=8" in render(job) and "\nexport DS_ACCELERATOR=cuda\n" in render(job)


def test_requeue_lines_follow_the_warning(config_path):
    asked = render(SlurmJob(config=config_path, nodes=1, procs_per_node=1, requeue_warning_s=120))
    assert "#SBATCH --signal=B:USR1@120\n#SBATCH --requeue\n" in asked and "#SBATCH --open-mode=append" in asked
    off = render(SlurmJob(config=config_path, nodes=1, procs_per_node=1, requeue_warning_s=0))
    assert "#SBATCH --signal" not in off and "#SBATCH --requeue" not in off


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-node", "1", "--procs-per-node", "1"], "not allowed with argument"),
    ([], "one of the arguments --gpus-per-node --procs-per-node is required"),
])
def test_one_kind_of_node_must_be_named(config_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "--nodes", "1", *argv, "--config", str(config_path), "--dry-run"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _run_batch_script(tmp_path, config_path, *, signal_batch_shell: bool, manifest: dict, restart_count: int = 0):
    """Run the rendered script on one fake node. The fake torchrun waits until it has been started
    (and, if asked, until the stop file appears), then writes `manifest` with rlkd's own JSON writer."""
    import signal
    import sys
    import time

    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(parents=True)
    record.mkdir()
    manifest_path = tmp_path / "manifest.json"
    manifest_json = tmp_path / "manifest.in.json"
    manifest_json.write_text(json.dumps(manifest))
    _executable(bin_dir / "scontrol", f'if [[ $1 == requeue ]]; then echo "$@" >> {record}/scontrol; '
                'elif [[ $1 == show && $2 == node ]]; then echo "   NodeAddr=10.1.2.3 NodeHostName=x"; '
                'else echo n1; fi\n')
    _executable(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 "$@"\n')
    wait_for_stop = 'while [[ ! -f $RLKD_STOP_FILE ]]; do sleep 0.05; done\n' if signal_batch_shell else ''
    _executable(bin_dir / "torchrun", f'printf "%s\\n" "$@" > {record}/torchrun.args\n{wait_for_stop}'
                f'{sys.executable} -c "import json; from rlkd.provenance import atomic_write_json; '
                f'atomic_write_json(\'{manifest_path}\', json.load(open(\'{manifest_json}\')))"\n')
    job = SlurmJob(config=config_path.resolve(), nodes=1, procs_per_node=1, log_dir=tmp_path / "logs",
                   manifest=manifest_path)
    (tmp_path / "logs").mkdir(exist_ok=True)
    script = tmp_path / "train.sbatch"
    script.write_text(render(job))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1",
               SLURM_JOB_ID="77", SLURM_RESTART_COUNT=str(restart_count))
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_batch_shell:  # what --signal=B:USR1 does: only the batch shell, once the task runs
        deadline = time.monotonic() + 30
        while not (record / "torchrun.args").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    requeued = (record / "scontrol").read_text() if (record / "scontrol").exists() else ""
    return out, requeued, (record / "torchrun.args").read_text().splitlines()


def test_warning_signal_leads_to_requeue_once_the_run_reports_its_checkpoint(tmp_path, config_path):
    out, requeued, args = _run_batch_script(tmp_path, config_path, signal_batch_shell=True,
                                            manifest={"config": {"status": "x"}, "status": "preempted"})
    assert requeued == "requeue 77\n"
    assert "rlkd: USR1 at" in out and "checkpoint written; requeueing job 77" in out
    assert "--master_addr=10.1.2.3" in args and "--resume" not in args


def test_no_requeue_without_the_signal_or_when_the_run_finished(tmp_path, config_path):
    # Only a top-level "preempted" counts; a finished run is never requeued, signal or not.
    for signalled in (False, True):
        _, requeued, _ = _run_batch_script(tmp_path / str(signalled), config_path, signal_batch_shell=signalled,
                                           manifest={"config": {"status": "preempted"}, "status": "finished"})
        assert requeued == ""
    _, requeued, _ = _run_batch_script(tmp_path / "unsignalled", config_path, signal_batch_shell=False,
                                       manifest={"status": "preempted"})
    assert requeued == ""


def test_a_requeued_start_resumes(tmp_path, config_path):
    _, _, args = _run_batch_script(tmp_path, config_path, signal_batch_shell=False, manifest={"status": "finished"},
                                   restart_count=1)
    assert args[-1] == "--resume"


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("1:30", 90), ("2:00:05", 7205), ("1-2", 93600),
                                           ("1-0:30", 88200), ("0-0:1:2", 62)])
def test_slurm_time_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("argv, message", [
    (["--time", "5", "--requeue-warning", "300"], "--requeue-warning 300 must be >= 0 and shorter than --time 5"),
    (["--time", "1h"], "--time '1h': not a Slurm time"),
    (["--requeue-warning", "-1"], "--requeue-warning -1 must be >= 0"),
])
def test_bad_time_limits_fail_before_anything_is_written(tmp_path, config_path, capsys, argv, message):
    assert main(["slurm", "--nodes", "1", "--procs-per-node", "1", "--config", str(config_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_master_falls_back_to_the_node_name_when_node_details_are_hidden(tmp_path, config_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", 'if [[ $1 == show && $2 == node ]]; then echo "denied" >&2; exit 1; fi\n'
                'echo c17; echo c18\n')
    _executable(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 "$@"\n')
    _executable(bin_dir / "torchrun", f'printf "%s\\n" "$@" > {tmp_path}/args\n')
    job = SlurmJob(config=config_path.resolve(), nodes=2, procs_per_node=1, log_dir=tmp_path, requeue_warning_s=0)
    (tmp_path / "train.sbatch").write_text(render(job))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="c[17-18]", SLURM_JOB_ID="5")
    done = subprocess.run(["bash", str(tmp_path / "train.sbatch")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "--master_addr=c17" in (tmp_path / "args").read_text().splitlines()


def _fake_sinfo(tmp_path, monkeypatch, rows: str) -> None:
    bin_dir = tmp_path / "sinfo-bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "sinfo", f"cat <<'ROWS'\n{rows}ROWS\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)


def test_cpus_per_task_defaults_to_what_the_nodes_have_and_an_impossible_request_is_refused(
        tmp_path, config_path, capsys, monkeypatch):
    """Issue 27 S1: on nodes of 1 CPU the fixed default of 16 made a job that pends forever."""
    _fake_sinfo(tmp_path, monkeypatch, "n1 1 debug*\nn2 1 debug*\nbig1 64 fat\n")
    argv = ["slurm", "--nodes", "2", "--procs-per-node", "1", "--config", str(config_path), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "#SBATCH --cpus-per-task=1\n" in out.out and "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=1 " in out.out
    assert "rlkd launch: --cpus-per-task 1: what 2 node(s) of partition debug have (sinfo)" in out.err

    assert main(argv + ["--cpus-per-task", "16"]) == 2
    err = capsys.readouterr().err
    assert err == ("rlkd launch: --cpus-per-task 16: no 2 node(s) of partition debug have that many CPUs "
                   "(sinfo: n1 1, n2 1); the job would pend forever (Reason=PartitionConfig). "
                   "Use --cpus-per-task 1 or fewer\n")
    assert main(argv + ["--partition", "fat"]) == 2
    assert "--nodes 2: partition fat has 1 node(s) (big1 64, from sinfo)" in capsys.readouterr().err
    assert main(argv + ["--partition", "fat", "--nodes", "1", "--cpus-per-task", "32"]) == 0
    assert "#SBATCH --cpus-per-task=32\n" in capsys.readouterr().out


def test_gpu_jobs_set_the_accelerator_memory_and_the_step_cpus(config_path):
    """Issue 26 defect 6: the GPU branch set no DS_ACCELERATOR and no --mem, and srun steps did not
    get the job's --cpus-per-task on Slurm 22.05-23.02."""
    text = render(SlurmJob(config=config_path, nodes=2, procs_per_node=8, cpus_per_task=96))
    assert "\nexport DS_ACCELERATOR=cuda\n" in text
    assert "\n#SBATCH --mem=0\n" in text
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=96 bash -c" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "\n#SBATCH --mem=200G\n" in render(SlurmJob(config=config_path, nodes=1, procs_per_node=8, mem="200G"))
    assert "--mem" not in render(SlurmJob(config=config_path, nodes=1, procs_per_node=2, gpus=False))
