"""The frozen teacher's logits over a fixed set of token sequences, computed once and reused.

Multi-epoch distillation (the paper's pre-training setting: 20 epochs over the same data) and the
evaluation of many students against one teacher repeat the same teacher forward passes. This
cache stores each sequence's logits once as float32 (exact for fp32, bf16 and fp16 teachers) in a
memory-mapped ``.npy`` file, and looks them up by the sequence's token ids, so a batch in any
order, from any loader, finds its rows.

An entry is keyed by the teacher's weights (content hash of its checkpoint files), the token
sequences and the vocabulary width; any change builds a new entry. Building takes a file lock, so
parallel benchmark cells wait for one build instead of racing, and under torch.distributed every
rank runs the same number of teacher forwards (ZeRO-3 gathers parameters collectively) and writes
its own rows into the shared file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlkd.device import collective_device
from rlkd.provenance import atomic_write_json, checkpoint_fingerprint, file_lock, utc_now

# Returns the teacher, called as ``teacher(input_ids=, attention_mask=, use_cache=False).logits``;
# only called when an entry has to be built.
LoadTeacher = Callable[[], Any]


def teacher_identity(teacher: str | Path) -> str:
    """Content hash of a local checkpoint's files; a Hub id stands for itself."""
    return checkpoint_fingerprint(teacher)["sha256"] or f"hub:{teacher}"


def sequence_key(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class TeacherLogitCache:
    """Read side: ``logits(input_ids, attention_mask)`` for sequences the entry holds."""

    def __init__(self, directory: Path):
        meta = json.loads((directory / "meta.json").read_text())
        self.directory = directory
        self.vocab_size = int(meta["vocab_size"])
        self.meta = meta
        self._logits = np.load(directory / "logits.npy", mmap_mode="r")
        self._where: dict[bytes, tuple[int, int]] = {}
        offsets = np.load(directory / "offsets.npy")
        ids = np.load(directory / "ids.npy")
        for start, stop in zip(offsets[:-1], offsets[1:]):
            self._where[sequence_key(ids[start:stop])] = (int(start), int(stop - start))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return sequence_key(ids) in self._where

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[B, L, V]`` teacher logits for right-padded rows; padded positions are zero (the loss
        never reads them). A row the entry does not hold is an error naming it."""
        batch, length = input_ids.shape
        out = torch.zeros(batch, length, self.vocab_size, dtype=torch.float32)
        ids = input_ids.cpu()
        lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [length] * batch
        for row, n in enumerate(lengths):
            row_ids = ids[row, :int(n)].tolist()
            found = self._where.get(sequence_key(row_ids))
            if found is None:
                raise KeyError(f"teacher logit cache {self.directory}: row {row} (first ids {row_ids[:8]}, "
                               f"length {int(n)}) is not among its {len(self)} sequences; the cache was built "
                               f"for other data")
            start, count = found
            out.numpy()[row, :count] = self._logits[start:start + count]
        return out.to(device=input_ids.device, dtype=dtype)

    def as_model(self) -> "CachedTeacherModel":
        return CachedTeacherModel(self)


class CachedTeacherModel:
    """Stands in for the teacher where a model is called as ``model(input_ids=...).logits``."""

    def __init__(self, cache: TeacherLogitCache):
        self.cache = cache

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.cache.logits(input_ids, attention_mask))


def entry_key(teacher_id: str, sequences: Sequence[Sequence[int]], vocab_size: int) -> str:
    digest = hashlib.sha256(f"{teacher_id}\0{vocab_size}\0{len(sequences)}\n".encode())
    for ids in sequences:
        digest.update(sequence_key(ids))
    return digest.hexdigest()[:20]


@contextmanager
def _locked(path: Path, enabled: bool):
    if not enabled:
        yield
        return
    with file_lock(path):
        yield


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _agree(dist, flag: bool) -> bool:
    """Rank 0's answer on every rank (the flag travels on the group's device, whatever the model's)."""
    if dist is None:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.long, device=collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def open_or_build(root: str | Path, teacher: str | Path, sequences: Sequence[Sequence[int]], vocab_size: int,
                  load_teacher: LoadTeacher | None, *, batch_size: int = 4, pad_id: int = 0,
                  device: torch.device | str = "cpu", teacher_id: str | None = None) -> TeacherLogitCache:
    """The cache entry under ``root`` for (teacher, sequences, vocab), built first with the model
    ``load_teacher()`` returns if it does not exist yet. Collective under torch.distributed: every
    rank must call it."""
    dist, rank, world = _dist()
    device = torch.device(device)
    unique: dict[bytes, list[int]] = {}
    for ids in sequences:
        unique.setdefault(sequence_key(ids), [int(t) for t in ids])
    seqs = list(unique.values())
    if not seqs:
        raise ValueError("teacher logit cache: no sequence to cache")
    teacher_id = teacher_id or teacher_identity(teacher)
    directory = Path(root) / entry_key(teacher_id, seqs, vocab_size)
    with _locked(Path(root) / f".{directory.name}.lock", enabled=rank == 0):
        ready = _agree(dist, (directory / "meta.json").is_file())
        if not ready:
            if load_teacher is None:
                raise FileNotFoundError(f"teacher logit cache {directory} does not exist and no teacher was given")
            _build(directory, teacher, teacher_id, seqs, vocab_size, load_teacher(), batch_size, pad_id, device,
                   dist, rank, world)
    return TeacherLogitCache(directory)


def _build(directory: Path, teacher, teacher_id: str, seqs: list[list[int]], vocab_size: int,
           model, batch_size: int, pad_id: int, device: torch.device, dist, rank: int,
           world: int) -> None:
    staging = directory.with_name(directory.name + ".building")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(staging / "logits.npy", mode="w+", dtype=np.float32,
                                  shape=(int(offsets[-1]), vocab_size)).flush()
        np.save(staging / "offsets.npy", offsets)
        np.save(staging / "ids.npy", np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))
    if dist is not None:
        dist.barrier()
    store = np.load(staging / "logits.npy", mmap_mode="r+")
    mine = list(range(rank, len(seqs), world))
    per_rank = -(-len(seqs) // world)
    calls = -(-per_rank // batch_size)  # equal forward count on every rank
    for call in range(calls):
        picked = mine[call * batch_size:(call + 1) * batch_size] or mine[-1:] or [0]
        width = max(len(seqs[i]) for i in picked)
        input_ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(picked), width), dtype=torch.long)
        for row, index in enumerate(picked):
            input_ids[row, :len(seqs[index])] = torch.tensor(seqs[index])
            attention[row, :len(seqs[index])] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logits = logits[..., :vocab_size].float().cpu().numpy()
        for row, index in enumerate(picked):
            store[offsets[index]:offsets[index + 1]] = logits[row, :lengths[index]]
    store.flush()
    del store
    if dist is not None:
        dist.barrier()
    if rank == 0:
        atomic_write_json(staging / "meta.json", {
            "teacher": str(teacher), "teacher_id": teacher_id, "vocab_size": vocab_size, "dtype": "float32",
            "sequences": len(seqs), "positions": int(offsets[-1]), "created": utc_now()})
        os.replace(staging, directory)
    if dist is not None:
        dist.barrier()
