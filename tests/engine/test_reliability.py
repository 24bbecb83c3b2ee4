"""Nothing lost, nothing mixed up: checkpoint lineage, resume guards, early errors (tiny CPU runs)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl
from rlkd.config import ConfigError  # PreflightError and ResumeError are ConfigErrors: `rlkd train` exits 2
from rlkd.data import DataError
from rlkd.engine import checkpoint
from rlkd.engine.train import run_training

REPO = Path(__file__).resolve().parents[2]


def _cfg(run_config, out: Path, **train) -> dict:
    return dict(run_config, output_dir=str(out), train=dict(run_config["train"], micro_batch_size=2, **train),
                checkpoint={"every_steps": 2, "keep_last": 2})


def _tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step*") if p.is_dir())


def _latest(out: Path) -> str | None:
    marker = out / "checkpoints" / "latest"
    tag = marker.read_text().strip() if marker.is_file() else None
    return tag if tag and (out / "checkpoints" / tag).is_dir() else None


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _forbid_weights(monkeypatch) -> None:
    """Fail the test if the run gets as far as building the engines (loading weights)."""
    def refuse(cfg):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr("rlkd.engine.train.build_session", refuse)


@pytest.fixture
def no_weights(monkeypatch):
    _forbid_weights(monkeypatch)


@pytest.fixture
def finished(run_config, tmp_path):
    """A finished 6-step run, checkpointed every 2 steps (steps 2 and 4 kept)."""
    out = tmp_path / "finished"
    run_training(_cfg(run_config, out, max_steps=6))
    assert _tags(out) == ["step00000002", "step00000004"]
    return out


# ---------------------------------------------------------------------------------------------
# 1. checkpoint retention stays within the run's lineage


def test_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(run_config, finished, tmp_path, no_weights):
    stale = tmp_path / "stale"
    shutil.copytree(finished, stale)
    before = {p.relative_to(stale): p.stat().st_mtime_ns for p in stale.rglob("*")}
    with pytest.raises(ConfigError, match=r"already holds checkpoints of run .*step00000002, step00000004.*--resume"):
        run_training(_cfg(run_config, stale, max_steps=8))
    assert {p.relative_to(stale): p.stat().st_mtime_ns for p in stale.rglob("*")} == before  # nothing touched


def test_retention_never_deletes_other_runs_or_the_newest_checkpoint(run_config, finished):
    ckpts = finished / "checkpoints"
    for step in (98, 99):  # checkpoints of another run with higher step numbers
        shutil.copytree(ckpts / "step00000004", ckpts / f"step{step:08d}")
        record = ckpts / f"step{step:08d}" / "rlkd_checkpoint.json"
        if record.is_file():
            record.write_text(json.dumps(dict(json.loads(record.read_text()), run_id="other")))
    result = run_training(_cfg(run_config, finished, max_steps=10), resume=True)
    assert result.resumed_from == 4
    assert _tags(finished) == ["step00000006", "step00000008", "step00000098", "step00000099"]
    assert _latest(finished) == "step00000008"
    # unit level: only the lineage's older checkpoints go
    assert checkpoint.prune(ckpts, _manifest(finished)["run_id"], 1, newest="step00000008") == ["step00000006"]
    assert checkpoint.prune(ckpts, "other", 1, newest="step00000099") == ["step00000098"]


def test_resume_refuses_a_latest_marker_naming_a_missing_checkpoint(run_config, finished, no_weights):
    shutil.rmtree(finished / "checkpoints" / "step00000004")
    with pytest.raises(ConfigError, match="latest names step00000004, which does not exist"):
        run_training(_cfg(run_config, finished, max_steps=6), resume=True)


def test_resume_moves_incomplete_checkpoints_aside_and_starts_at_zero(run_config, tmp_path, capsys):
    out = tmp_path / "incomplete"
    (out / "checkpoints" / "step00000002").mkdir(parents=True)  # killed inside its first save
    result = run_training(_cfg(run_config, out, max_steps=3), resume=True)
    assert result.resumed_from is None and _steps(out) == [1, 2, 3]
    aside = list(out.glob("checkpoints.incomplete-*"))
    assert len(aside) == 1 and (aside[0] / "step00000002").is_dir()
    assert "moved aside" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 2. --resume compares configs


def test_resume_with_result_changing_keys_refuses_with_their_diff(run_config, tmp_path, monkeypatch):
    out = tmp_path / "mism"
    cfg = _cfg(run_config, out, max_steps=6, schedule="cosine")
    run_training(cfg)
    _forbid_weights(monkeypatch)
    changed = dict(cfg, loss={"objective": "rkl"}, train=dict(cfg["train"], lr=5e-5, max_steps=8))
    with pytest.raises(ConfigError) as caught:
        run_training(changed, resume=True)
    message = str(caught.value)
    assert "loss.objective: 'kl' -> 'rkl'" in message
    assert "train.lr: 0.001 -> 5e-05" in message
    assert "train.max_steps: 6 -> 8 (the cosine schedule's learning rate" in message
    assert _manifest(out)["status"] == "finished" and _manifest(out)["config"]["loss"]["objective"] == "kl"


def test_resume_allows_and_records_harmless_changes_and_says_where_it_resumed(run_config, finished, tmp_path,
                                                                              capsys):
    capsys.readouterr()
    result = run_training(dict(_cfg(run_config, finished, max_steps=8), log_every=2), resume=True)
    out = capsys.readouterr().out
    assert f"resuming from step 4 of 8 (checkpoint {finished / 'checkpoints' / 'step00000004'})" in out
    assert "train.max_steps: 6 -> 8" in out and "log_every: 1 -> 2" in out
    manifest = _manifest(finished)
    assert result.resumed_from == 4 and manifest["status"] == "finished"
    start, resumed = manifest["history"]
    assert start["event"] == "start" and start["config"]["train"]["max_steps"] == 6
    assert resumed["event"] == "resume" and resumed["step"] == 4
    assert resumed["changes"] == {"log_every": [1, 2], "train.max_steps": [6, 8]}
    assert resumed["config"]["train"]["max_steps"] == 8 and manifest["config"]["log_every"] == 2
    assert _steps(finished) == [1, 2, 3, 4, 6, 8]
    # extending a constant-schedule run computes what a straight run to 8 steps computes
    straight = run_training(_cfg(run_config, tmp_path / "straight", max_steps=8))
    a, b = _state(result.export_dir), _state(straight.export_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_allow_change_accepts_a_named_key_and_records_it_as_forced(run_config, finished):
    run_training(_cfg(run_config, finished, max_steps=6, lr=5e-4), resume=True, allow_changes=["train.lr"])
    resumed = _manifest(finished)["history"][-1]
    assert resumed["changes"] == {"train.lr": [0.001, 0.0005]} and resumed["forced"] == ["train.lr"]


def test_compare_data_location_world_size_and_contents():
    from rlkd.config import load_config
    from rlkd.engine.resume import compare

    base = {"output_dir": "o", "models": {"teacher": "t/t", "student": "s/s"},
            "data": {"task": "tokenized", "path": "a.jsonl"}}
    saved = load_config(base=base).model_dump(mode="json")
    moved = load_config(base=dict(base, data={"task": "tokenized", "path": "elsewhere/a.jsonl"}))
    same = {"data_files_sha256": {"a.jsonl": "x"}, "world_size": 1}
    [change] = compare(saved, moved, step=4, saved_meta=same,
                       meta={"data_files_sha256": {"elsewhere/a.jsonl": "x"}, "world_size": 1})
    assert change.key == "data.path" and change.allowed
    changes = compare(saved, moved, step=4, saved_meta=same,
                      meta={"data_files_sha256": {"elsewhere/a.jsonl": "y"}, "world_size": 2})
    assert {c.key for c in changes if not c.allowed} == {"data.path", "world_size", "data_files_sha256"}


# ---------------------------------------------------------------------------------------------
# 5. early, one-line errors; no manifest claiming "running"


def _cli(tmp_path: Path, config: dict, *extra: str) -> int:
    from rlkd.engine.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["--config", str(path), *extra])


@pytest.mark.parametrize("case", ["teacher", "k", "output"])
def test_bad_start_fails_before_weights_in_one_line_with_exit_2(run_config, tmp_path, capsys, no_weights, case):
    config = dict(run_config)
    if case == "teacher":
        config["models"] = dict(config["models"], teacher=str(tmp_path / "no" / "such" / "teacher"))
        expected = f"models.teacher: {tmp_path / 'no' / 'such' / 'teacher'}: no such folder"
    elif case == "k":
        config["loss"] = {"objective": "kl", "ranking": {"enabled": True, "k": 400}}
        expected = ("loss.ranking.k=400 is larger than the models' vocabulary of 96 tokens (vocab_size in the "
                    f"config.json of {config['models']['teacher']} and {config['models']['student']})")
    else:
        (tmp_path / "afile").write_text("x")
        config["output_dir"] = str(tmp_path / "afile" / "run")
        expected = f"output_dir: {tmp_path / 'afile' / 'run'} cannot be created: {tmp_path / 'afile'} is a file"
    assert _cli(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rlkd train: {expected}"
    assert not list(tmp_path.rglob("manifest.json"))


def test_hub_ids_pass_the_path_check():
    from rlkd.engine.preflight import PreflightError, check_model_path

    check_model_path("models.teacher", "meta-llama/Llama-2-7b-hf", model=True)
    with pytest.raises(PreflightError, match="models.student: runs/x/student: no such folder"):
        check_model_path("models.student", "runs/x/student", model=True)


def test_a_run_that_fails_after_starting_leaves_a_failed_manifest(run_config, monkeypatch):
    def boom(session, step):
        raise RuntimeError("exploded at step 1")

    monkeypatch.setattr("rlkd.engine.train.train_step", boom)
    with pytest.raises(RuntimeError):
        run_training(run_config)
    manifest = json.loads((Path(run_config["output_dir"]) / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "exploded at step 1" in manifest["error"]


def test_empty_dataset_names_the_file_and_zero_rows(run_config, tmp_path, no_weights):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run_config["data"]["path"] = str(empty)
    from rlkd.data import build_samples
    from rlkd.config import load_config

    with pytest.raises(DataError, match=rf"{empty}: 0 rows read .*empty"):
        build_samples(load_config(base=run_config).data, None)
    run_config["data"]["path"] = str(write_jsonl(tmp_path / "three.jsonl", [{"input_ids": [1, 5, 2],
                                                                             "loss_mask": [0, 1, 1]}] * 3))
    run_config["data"]["skip"] = 3
    with pytest.raises(DataError, match=r"three.jsonl: 0 rows read: it has 3 rows and data.skip=3"):
        build_samples(load_config(base=run_config).data, None)


def test_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(run_config, finished, capsys):
    with (finished / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "loss": 1.2')  # what a kill during a write leaves
    run_training(_cfg(run_config, finished, max_steps=6), resume=True)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert _steps(finished) == [1, 2, 3, 4, 5, 6]
    (finished / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    from rlkd.engine.resume import read_metrics

    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: malformed"):
        read_metrics(finished / "metrics.jsonl", 4)


# ---------------------------------------------------------------------------------------------
# 6. the command line


def test_bare_rlkd_prints_help_and_exits_2_and_version_prints_the_version():
    import tomllib

    env_cmd = [sys.executable, "-m", "rlkd.cli"]
    bare = subprocess.run(env_cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bare.returncode == 2 and "usage: rlkd <command>" in bare.stderr and "train" in bare.stderr
    version = subprocess.run(env_cmd + ["--version"], capture_output=True, text=True, cwd=REPO, timeout=60)
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version.returncode == 0 and version.stdout.strip() == f"rlkd {expected}"


# ---------------------------------------------------------------------------------------------
# A real kill: the resumed run says where it resumed, keeps its own lineage and a history


@pytest.mark.slow
def test_sigkilled_run_resumes_in_its_lineage_and_says_so(run_config, tmp_path, cli_env):
    out = tmp_path / "killed"
    config = _cfg(run_config, out, max_steps=400)
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "rlkd.cli", "train", "--config", str(config_path)]
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len(_tags(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    latest = _latest(out)
    assert latest is not None
    fresh = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 2 and "already holds checkpoints" in fresh.stderr, fresh.stderr[-2000:]
    resumed = subprocess.run(command + ["--resume", f"train.max_steps={int(latest[len('step'):]) + 3}"],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(latest[len("step"):])
    assert f"resuming from step {step} of {step + 3} (checkpoint {out / 'checkpoints' / latest})" in resumed.stdout
    manifest = _manifest(out)
    assert [h["event"] for h in manifest["history"]] == ["start", "resume"]
    assert manifest["history"][1]["changes"] == {"train.max_steps": [400, step + 3]}
    assert _steps(out) == list(range(1, step + 4))
    tags = _tags(out)
    assert _latest(out) == tags[-1] and len(tags) <= 2


def test_overrides_after_resume_are_applied(run_config, tmp_path, capsys, no_weights):
    """The issue's own command line puts overrides after --resume; they must not be rejected or lost."""
    from rlkd.engine.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config))
    code = main(["--config", str(path), f"output_dir={tmp_path / 'x'}", "--resume", "loss.ranking.enabled=true",
                 "loss.ranking.k=400"])
    assert code == 2 and "loss.ranking.k=400 is larger than" in capsys.readouterr().err


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _commit_all(repo: Path) -> None:
    """A one-commit repository of what ``repo`` holds now."""
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "init")


def test_re_rendered_result_tables_do_not_make_the_code_dirty(tmp_path, monkeypatch):
    """A benchmark rewrites committed tables under results/ while its cells run; the cells' provenance
    must still say the code was clean, and a changed source file must still say dirty."""
    from rlkd import provenance

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _commit_all(tmp_path)
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    (tmp_path / "results" / "table.md").write_text("re-rendered\n")
    state = provenance.git_state()
    assert state["sha"] and state["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.git_state()["dirty"] is True


def test_benchmark_meta_names_the_commit_the_command_and_the_load(tmp_path, monkeypatch):
    """Every benchmark report carries the commit that ran it and the command that re-runs it (its
    timings are only comparable with the code and load they came from)."""
    import os

    from rlkd import provenance

    (tmp_path / "bench.py").write_text("x = 1\n")
    _commit_all(tmp_path)
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    meta = provenance.benchmark_meta("benchmarks/x.py", ["--tokens", "64", "--out", "a b"])
    assert meta["git"] == {"sha": _git(tmp_path, "rev-parse", "HEAD").strip(), "dirty": False}
    assert meta["command"] == "python benchmarks/x.py --tokens 64 --out 'a b'"
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--quick"])  # argv=None: the process's own arguments
    assert provenance.benchmark_meta("benchmarks/x.py")["command"] == "python benchmarks/x.py --quick"
    assert meta["torch"] == torch.__version__ and f"{os.cpu_count()} cores, " in meta["machine"]
    loads = provenance.load_average().split()
    assert len(loads) == 3 and all(float(x) >= 0 for x in loads)
    monkeypatch.setattr(os, "getloadavg", lambda: (_ for _ in ()).throw(OSError("no /proc/loadavg")))
    assert provenance.load_average() == "unknown"


def test_cells_and_benchmarks_record_the_cpu_kind_their_fp32_bits_depend_on(monkeypatch):
    """A healing stage gave a different export on another kind of CPU: a cell's provenance and a
    benchmark report name the CPU model and torch's kernel instruction set."""
    import torch

    from rlkd import provenance
    from rlkd.bench.runner import code_provenance

    for name in provenance.KERNEL_ISA_VARIABLES:  # the next test covers them
        monkeypatch.delenv(name, raising=False)

    capability = torch.backends.cpu.get_cpu_capability()
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    machine = code_provenance().machine
    assert machine.torch_cpu_capability == capability and machine.cpu_model == names[0]
    assert f"{names[0]} ({capability})" in provenance.benchmark_meta("benchmarks/x.py", [])["machine"]


def test_kernel_instruction_set_overrides_are_recorded_only_when_set(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 and MKL_ENABLE_INSTRUCTIONS=AVX2 on an AVX-512 machine change its fp32
    bits (they reproduce an AVX2 machine's healed export): a record names them, and a record made
    without them stays as it was before the field existed."""
    from rlkd import provenance
    from rlkd.bench.records import Machine
    from rlkd.bench.runner import code_provenance

    for name in provenance.KERNEL_ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "kernel_isa_overrides" not in provenance.cpu_identity()
    assert "kernel_isa_overrides" not in code_provenance().model_dump(exclude_none=True)["machine"]

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")  # set but empty: not an override
    assert provenance.cpu_identity()["kernel_isa_overrides"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    machine = code_provenance().machine
    assert machine.kernel_isa_overrides == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert Machine.model_validate(machine.model_dump()) == machine  # what is written reads back
    assert "MKL_ENABLE_INSTRUCTIONS=AVX2)" in provenance.benchmark_meta("benchmarks/x.py", [])["machine"]
