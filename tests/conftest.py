"""Shared fixtures: tiny random LLaMA teacher/student saved to disk, synthetic token data, DS CPU env."""

from __future__ import annotations

import json
import os
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
