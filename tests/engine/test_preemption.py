"""Stop requests (what Slurm's time-limit warning turns into): collective, checkpointed, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlkd.engine.preemption import STOP_FILE_ENV, StopRequest
from rlkd.engine.train import run_training


CASES = [(), (0,), (1,), (0, 1)]  # which ranks see the stop file


def _agree(rank: int, world: int, init_file: str, stop_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        answers = []
        for visible_to in CASES:
            request = StopRequest(Path(stop_file) if rank in visible_to else Path(f"{stop_file}.absent{rank}"))
            answers.append([request.seen_here(), request.requested(torch.device("cpu"))])
        Path(f"{out}.{rank}").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_ranks_agree_when_any_rank_sees_the_stop_file(tmp_path):
    """The batch shell leaves the file on node 0 only; every rank must still stop at the same step."""
    stop_file = tmp_path / "stop"
    stop_file.touch()
    mp.spawn(_agree, args=(2, str(tmp_path / "init"), str(stop_file), str(tmp_path / "answer")), nprocs=2, join=True)
    answers = [json.loads((tmp_path / f"answer.{rank}").read_text()) for rank in range(2)]
    for case, visible_to in enumerate(CASES):
        assert [answers[rank][case][0] for rank in range(2)] == [rank in visible_to for rank in range(2)]
        assert [answers[rank][case][1] for rank in range(2)] == [bool(visible_to)] * 2, visible_to


def test_no_stop_file_configured_never_stops(monkeypatch):
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    request = StopRequest.from_environment()
    assert request.stop_file is None and not request.requested(torch.device("cpu"))


@pytest.mark.slow
def test_a_stop_request_checkpoints_the_step_and_resume_ends_where_an_uninterrupted_run_does(
        run_config, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    run_config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
    run_config["train"].update(max_steps=6, schedule="cosine", warmup_steps=2)
    run_config["checkpoint"] = {"every_steps": 4}
    stop_file = tmp_path / "stop"
    stop_file.touch()  # already there: the run stops after its first step
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    stopped = run_training(dict(run_config, output_dir=str(tmp_path / "stopped")))
    assert stopped.stopped_early and stopped.steps == 1 and stopped.export_dir is None
    manifest = json.loads(stopped.manifest_path.read_text())
    assert manifest["status"] == "preempted" and manifest["steps"] == 1
    assert (stopped.output_dir / "checkpoints" / "latest").read_text().strip() == "step00000001"
    assert not (stopped.output_dir / "export").exists()

    stop_file.unlink()  # the requeued job starts with no stop file
    resumed = run_training(dict(run_config, output_dir=str(tmp_path / "stopped")), resume=True)
    assert not resumed.stopped_early and resumed.resumed_from == 1 and resumed.steps == 6
    assert [json.loads(line)["step"] for line in resumed.metrics_path.read_text().splitlines()] == list(range(1, 7))

    monkeypatch.delenv(STOP_FILE_ENV)
    straight = run_training(dict(run_config, output_dir=str(tmp_path / "straight")))
    a = load_file(str(resumed.export_dir / "model.safetensors"))
    b = load_file(str(straight.export_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in b)


def test_a_stop_request_at_the_last_step_still_finishes_and_exports(run_config, tmp_path, monkeypatch):
    """Nothing is left to resume after the last step: no checkpoint, no requeue, a normal export."""
    run_config["train"].update(max_steps=1)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    result = run_training(dict(run_config, output_dir=str(tmp_path / "run")))
    assert not result.stopped_early and result.export_dir is not None and result.export_dir.is_dir()
    assert json.loads(result.manifest_path.read_text())["status"] == "finished"
