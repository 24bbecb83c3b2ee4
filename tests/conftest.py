"""Shared fixtures: tiny random LLaMA teacher/student saved to disk, synthetic token data, DS CPU env."""

from __future__ import annotations

import ast
import functools
import json
import os
import threading
from pathlib import Path

# DeepSpeed reads these at import time; set them before any test imports it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never download: without this a lookup of a model that is not on disk waits for the
# unreachable Hub's timeouts (measured: 26 s for one `rlkd plan` error test) before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlkd.objectives import RankingConfig  # noqa: E402
from rlkd.objectives.fused import HeadInput, fused_distill_loss  # noqa: E402
from rlkd.paths import default_data_dir  # noqa: E402

TINY_VOCAB = 96


def tiny_llama(path: Path, *, hidden: int, layers: int, heads: int, vocab: int = TINY_VOCAB, seed: int = 0) -> Path:
    """A random LLaMA saved with save_pretrained, to be loaded back by path."""
    from rlkd.factory import tiny_llama_model

    model = tiny_llama_model(vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, seed=seed,
                             max_positions=256, pad_token_id=None)
    model.save_pretrained(path, safe_serialization=True)
    return path


def synthetic_token_rows(n_rows: int, length: int, vocab: int = TINY_VOCAB, seed: int = 0) -> list[dict]:
    """Rows of the `tokenized` task: a 'prompt' half and a 'response' half (loss_mask over tokens)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        n = rng.randint(length // 2, length)
        ids = [1] + [rng.randrange(3, vocab) for _ in range(n - 2)] + [2]
        prompt = n // 2
        rows.append({"input_ids": ids, "loss_mask": [int(i >= prompt) for i in range(n)]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Teacher bigger than student, same vocab; plus a teacher with 8 padding vocab rows."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "teacher": tiny_llama(root / "teacher", hidden=48, layers=3, heads=4, seed=1),
        "student": tiny_llama(root / "student", hidden=24, layers=2, heads=2, seed=2),
        "teacher_padded": tiny_llama(root / "teacher_padded", hidden=48, layers=3, heads=4, vocab=TINY_VOCAB + 8, seed=3),
    }


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "tokens.jsonl", synthetic_token_rows(64, 24))


@pytest.fixture
def run_config(tiny_models, token_data, tmp_path):
    """A small valid run config (dict) for the tokenized task on CPU."""
    return {
        "output_dir": str(tmp_path / "run"),
        "seed": 7,
        "models": {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])},
        "data": {"task": "tokenized", "path": str(token_data), "max_length": 64},
        "loss": {"objective": "kl"},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 3, "lr": 1e-3},
        "progress_bar": False,
    }


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = default_data_dir()
    if found is None or not found.is_dir():
        pytest.skip("real data not available (set RLKD_DATA_DIR)")
    return found


@pytest.fixture(scope="session")
def llama_tokenizer(data_dir):
    folder = data_dir / "tokenizers" / "llama2"
    if not folder.is_dir():
        pytest.skip("llama2 tokenizer not available")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def run_with_free_port(make_command, attempts: int = 3, **run_kwargs):
    """``subprocess.run(make_command(port))`` with a port found free; if the launcher still finds it
    taken (another process or an outgoing connection got it first: EADDRINUSE), again with a new one."""
    import socket
    import subprocess

    for attempt in range(attempts):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        done = subprocess.run(make_command(port), **run_kwargs)
        if done.returncode == 0 or "EADDRINUSE" not in (done.stderr or "") or attempt == attempts - 1:
            return done


# ---- child processes ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cli_env():
    """``cli_env(**extra)``: the environment of a test's child rlkd process (rlkd's own
    :func:`rlkd.engine.distributed.child_env`: without this process's rendezvous variables, this rlkd
    first on PYTHONPATH), plus ``extra``; ``drop_prefixes=("SLURM_",)`` drops more."""
    from rlkd.engine.distributed import child_env

    return functools.partial(child_env, rlkd_on_path=True)


@pytest.fixture
def launch_run(tmp_path, cli_env):
    """``launch_run(launcher, config, nproc=2)``: ``rlkd train`` on ``nproc`` CPU ranks under torchrun
    or the deepspeed launcher, with a free rendezvous port; fails the test if it fails."""
    import sys

    import yaml

    def launch(launcher: str, config: dict, nproc: int = 2) -> None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))

        def command(port: int) -> list[str]:
            if launcher == "torchrun":
                return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_addr", "127.0.0.1", "--master_port", str(port),
                        "-m", "rlkd.cli", "train", "--config", str(path)]
            # the deepspeed launcher; --no_local_rank keeps its --local_rank flag out of our argv
            return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--no_local_rank",
                    "--master_port", str(port), "--module", "rlkd.cli", "train", "--config", str(path)]

        done = run_with_free_port(command, env=cli_env(), capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-4000:]

    return launch


# ---- the fused path against the logits path (objectives/test_fused.py on CPU, test_gpu.py on CUDA) ----

FUSED_H, FUSED_V = 12, 40
# Every ranking configuration the loss has: the paper's fixed weighting, App. D's dynamic one and
# the released code's fidelity (batch-level union, its own weights and NaN fallback).
RANKINGS = {
    "none": RankingConfig(enabled=False),
    "R": RankingConfig(k=4, backend="torch"),
    "R_dynamic": RankingConfig(k=4, mode="dynamic", backend="torch"),
    "R_official": RankingConfig(k=4, fidelity="official", backend="torch"),
}


def fused_inputs(b=3, l=11, h=FUSED_H, v=FUSED_V, t_h=16, t_v=None, seed=0, dtype=None):
    """(student hidden, student head, teacher hidden, teacher head, mask, labels), random but fixed."""
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(b, l, h, generator=g).to(dtype)
    s_weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).to(dtype)
    t_hidden = torch.randn(b, l, t_h, generator=g).to(dtype)
    t_weight = (torch.randn(t_v or v, t_h, generator=g) / t_h**0.5 * 3).to(dtype)
    mask = torch.rand(b, l, generator=g) > 0.3
    labels = torch.randint(0, v, (b, l), generator=g)
    return s_hidden, s_weight, t_hidden, t_weight, mask, labels


def fused_and_logits_paths(loss_fn, s_hidden, s_weight, t_hidden, t_weight, mask, labels, vocab=None,
                           teacher_as_logits=False):
    """(fused output, its grads), (logits-path output, its grads) on identical inputs."""
    vocab = vocab or s_weight.shape[0]
    h1, w1 = s_hidden.clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
    t_logits = t_hidden @ t_weight.t()
    teacher = t_logits if teacher_as_logits else HeadInput(t_hidden, t_weight)
    fused = fused_distill_loss(loss_fn, HeadInput(h1, w1), teacher, mask, labels, vocab_size=vocab)
    fused_grads = torch.autograd.grad(fused.loss_sum, (h1, w1))
    h2, w2 = s_hidden.clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
    ref = loss_fn((h2 @ w2.t())[..., :vocab], t_logits[..., :vocab], mask, labels)
    ref_grads = torch.autograd.grad(ref.loss_sum, (h2, w2))
    return (fused, fused_grads), (ref, ref_grads)


def assert_same_outputs(fused, ref, rtol=1e-5, atol=1e-5):
    """The two paths' values, per-token losses, gradients and logged metrics agree."""
    (out, grads), (ref_out, ref_grads) = fused, ref
    torch.testing.assert_close(out.loss_sum, ref_out.loss_sum, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.per_token, ref_out.per_token.detach(), rtol=rtol, atol=atol)
    for name, a, b in zip(("hidden", "head weight"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad wrt {name}: {m}")
    assert out.n_tokens == ref_out.n_tokens
    assert out.metrics.keys() == ref_out.metrics.keys()
    for key in ref_out.metrics:
        assert out.metrics[key] == pytest.approx(ref_out.metrics[key], rel=1e-5, abs=1e-5), key


class ThreadRanks:
    """torch.distributed's barrier and broadcast for ranks that are threads of this process."""

    def __init__(self, world: int):
        self.world, self._barrier, self._local, self._box = world, threading.Barrier(world), threading.local(), {}

    def as_rank(self, rank: int):
        self._local.rank = rank

    def dist(self):
        return self, self._local.rank, self.world

    def barrier(self):
        self._barrier.wait()

    def broadcast(self, tensor, src=0):
        if self._local.rank == src:
            self._box["value"] = tensor.clone()
        self._barrier.wait()
        tensor.copy_(self._box["value"])
        self._barrier.wait()


@pytest.fixture
def thread_ranks(monkeypatch):
    """``ThreadRanks``: threads of one interpreter standing in for rank processes. numpy reads a
    .npy header with ``ast.literal_eval``, which CPython 3.11 cannot run in two threads at once
    (SystemError "AST constructor recursion depth mismatch", CPython gh-106905; seen once in a full
    run); rank processes never share an interpreter, so the stand-in serialises that call."""
    lock, literal_eval = threading.Lock(), ast.literal_eval

    def serialised(node_or_string):
        with lock:
            return literal_eval(node_or_string)

    monkeypatch.setattr(ast, "literal_eval", serialised)
    return ThreadRanks
