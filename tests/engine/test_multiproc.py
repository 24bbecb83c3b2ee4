"""Two-rank ZeRO-3 runs on CPU (gloo) under torchrun and the deepspeed launcher, compared with one-rank runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_with_free_port
from rlkd.engine.train import run_training

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("ranking, launcher", [(False, "torchrun"), (True, "deepspeed")],
                         ids=["KL-torchrun", "KL+R-deepspeed"])
def test_two_ranks_train_like_one_rank_with_the_same_global_batch(run_config, tmp_path, ranking, launcher,
                                                                  launch_run):
    """2 ranks x micro-batch 2 sees the same 4 samples per step as 1 rank x 4 (rank-strided order),
    so with global-token normalisation the two runs must agree; and the loss must fall."""
    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": ranking, "k": 5}}
    run_config["train"].update(max_steps=20, lr=3e-3)
    two = dict(run_config, output_dir=str(tmp_path / "two"), train=dict(run_config["train"], micro_batch_size=2))
    launch_run(launcher, two)
    one = run_training(dict(run_config, output_dir=str(tmp_path / "one"),
                            train=dict(run_config["train"], micro_batch_size=4)))

    two_losses = _losses(Path(two["output_dir"]) / "metrics.jsonl")
    assert len(two_losses) == 20
    assert sum(two_losses[-5:]) / 5 < 0.8 * sum(two_losses[:5]) / 5
    assert two_losses == pytest.approx(_losses(one.metrics_path), rel=1e-4)

    from safetensors.torch import load_file

    a = load_file(str(Path(two["output_dir"]) / "export" / "model.safetensors"))
    b = load_file(str(one.export_dir / "model.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)
    manifest = json.loads((Path(two["output_dir"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"


def test_two_rank_run_killed_after_a_checkpoint_resumes_bit_exact(run_config, tmp_path, launch_run, cli_env):
    """Each rank keeps its own optimizer partition and RNG state; SIGKILL the whole launch after a
    checkpoint, resume with the same world size, and the result equals an uninterrupted run."""
    import signal
    import time

    from safetensors.torch import load_file

    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"].update(max_steps=20, micro_batch_size=2, schedule="cosine", warmup_steps=2)
    run_config["checkpoint"] = {"every_steps": 5}
    killed = dict(run_config, output_dir=str(tmp_path / "killed"))
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(killed))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "rlkd.cli", "train", "--config", str(path)]
    latest = Path(killed["output_dir"]) / "checkpoints" / "latest"
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]

    resumed = run_with_free_port(lambda port: command[:8] + [str(port)] + command[9:] + ["--resume"],
                                 env=cli_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    manifest = json.loads((Path(killed["output_dir"]) / "manifest.json").read_text())
    assert 0 < manifest["resumed_from"] < 20

    straight = dict(run_config, output_dir=str(tmp_path / "straight"))
    launch_run("torchrun", straight)
    a = load_file(str(Path(killed["output_dir"]) / "export" / "model.safetensors"))
    b = load_file(str(Path(straight["output_dir"]) / "export" / "model.safetensors"))
    for key in b:
        assert torch.equal(a[key], b[key]), key
