"""The frozen teacher's logits over a fixed set of token sequences, computed once and reused.

Multi-epoch distillation (the paper's pre-training setting: 20 epochs over the same data) and the
evaluation of many students against one teacher repeat the same teacher forward passes. This
cache stores each sequence's logits once as float32 (exact for fp32, bf16 and fp16 teachers) in
memory-mapped ``.npy`` files, and looks them up by the sequence's token ids, so a batch in any
order, from any loader, finds its rows.

An entry is keyed by the teacher's weights (content hash of its checkpoint files), the token
sequences and the vocabulary width; any change builds a new entry. Building takes a file lock, so
parallel benchmark cells wait for one build instead of racing, and under torch.distributed every
rank runs the same number of teacher forwards (ZeRO-3 gathers parameters collectively) and writes
its own rows into its own file (``logits.rank<r>.npy``). One file written by every rank let rows of
two ranks share a page: on a network filesystem each node writes back whole dirty pages, so one
rank's stale copy of a shared page could overwrite the other's rows. ``layout.npy`` says where each
sequence is (file, first row). Entries written in the older one-file layout (``logits.npy``) are read as before.

What a row holds is the entry's format: :class:`ExactLogits` (this module, the default) or the top-K
format of rlkd.teacher_topk_cache, which reuses the keying, lock, per-rank files and layout here.
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

from rlkd.device import collective_device, has_peers
from rlkd.provenance import atomic_write_json, checkpoint_fingerprint, file_lock, utc_now

# Returns the teacher, called as ``teacher(input_ids=, attention_mask=, use_cache=False).logits``;
# only called when an entry has to be built.
LoadTeacher = Callable[[], Any]


def teacher_identity(teacher: str | Path) -> str:
    """Content hash of a local checkpoint's files; a Hub id stands for itself."""
    return checkpoint_fingerprint(teacher)["sha256"] or f"hub:{teacher}"


def sequence_key(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class SequenceIndex:
    """Where each sequence of an entry is: ``find(row_ids) -> (rank file, first row, length)``, and the
    entry's per-rank ``.npy`` files of one kind opened read-only (:meth:`rank_files`)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        offsets = np.load(directory / "offsets.npy")
        ids = np.load(directory / "ids.npy")
        self._per_rank = (directory / "layout.npy").is_file()  # one file per writing rank
        if self._per_rank:
            layout = np.load(directory / "layout.npy")
            self._ranks = [int(r) for r in np.unique(layout[:, 0])]
            places = [(int(r), int(row)) for r, row in layout]
        else:  # the older layout: one file, rows in sequence order
            self._ranks = [0]
            places = [(0, int(start)) for start in offsets[:-1]]
        self._where: dict[bytes, tuple[int, int, int]] = {}
        for (file, row), start, stop in zip(places, offsets[:-1], offsets[1:]):
            self._where[sequence_key(ids[start:stop])] = (file, row, int(stop - start))

    def rank_files(self, stem: str) -> dict[int, np.ndarray]:
        if not self._per_rank:
            return {0: np.load(self.directory / f"{stem}.npy", mmap_mode="r")}
        return {r: np.load(self.directory / f"{stem}.rank{r}.npy", mmap_mode="r") for r in self._ranks}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return sequence_key(ids) in self._where

    def rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """``(batch row, rank file, first row, length)`` of each right-padded row of a batch; a row the
        entry does not hold is an error naming it."""
        batch, length = input_ids.shape
        ids = input_ids.cpu()
        lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [length] * batch
        for row, n in enumerate(lengths):
            row_ids = ids[row, :int(n)].tolist()
            found = self._where.get(sequence_key(row_ids))
            if found is None:
                raise KeyError(f"teacher logit cache {self.directory}: row {row} (first ids {row_ids[:8]}, "
                               f"length {int(n)}) is not among its {len(self)} sequences; the cache was built "
                               f"for other data")
            yield (row, *found)


class TeacherLogitCache(SequenceIndex):
    """Read side: ``logits(input_ids, attention_mask)`` for sequences the entry holds."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.vocab_size = int(self.meta["vocab_size"])
        self._files = self.rank_files("logits")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[B, L, V]`` teacher logits for right-padded rows; padded positions are zero (the loss
        never reads them). A row the entry does not hold is an error naming it."""
        batch, length = input_ids.shape
        out = torch.zeros(batch, length, self.vocab_size, dtype=torch.float32)
        for row, file, start, count in self.rows(input_ids, attention_mask):
            out.numpy()[row, :count] = self._files[file][start:start + count]
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


class ExactLogits:
    """The exact format: every logit of a position, float32, in ``logits.rank<r>.npy``."""

    key_suffix = ""  # entries of other formats add theirs to the directory's name

    def bytes_per_position(self, vocab_size: int) -> int:
        return 4 * vocab_size

    def create(self, staging: Path, rank: int, rows: int, vocab_size: int) -> dict[str, np.ndarray]:
        return {"logits": np.lib.format.open_memmap(staging / f"logits.rank{rank}.npy", mode="w+", dtype=np.float32,
                                                    shape=(rows, vocab_size))}

    def write(self, stores: dict[str, np.ndarray], start: int, logits: torch.Tensor) -> None:
        """Store the fp32 logits ``[n, V]`` of one sequence from row ``start`` on."""
        stores["logits"][start:start + logits.shape[0]] = logits.numpy()

    def meta(self, vocab_size: int) -> dict:
        return {"dtype": "float32", "bytes_per_position": self.bytes_per_position(vocab_size)}

    def open(self, directory: Path) -> TeacherLogitCache:
        return TeacherLogitCache(directory)


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

    if has_peers():  # a one-process group (left up by a cell's training) has nobody to agree with
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
                  device: torch.device | str = "cpu", teacher_id: str | None = None, fmt=None):
    """The cache entry under ``root`` for (teacher, sequences, vocab, format), built first with the model
    ``load_teacher()`` returns if it does not exist yet. ``fmt``: what a row holds (default
    :class:`ExactLogits`; its ``key_suffix`` is part of the entry's key); returns ``fmt.open(entry)``.
    Collective under torch.distributed: every rank must call it."""
    fmt = fmt or ExactLogits()
    dist, rank, world = _dist()
    device = torch.device(device)
    unique: dict[bytes, list[int]] = {}
    for ids in sequences:
        unique.setdefault(sequence_key(ids), [int(t) for t in ids])
    seqs = list(unique.values())
    if not seqs:
        raise ValueError("teacher logit cache: no sequence to cache")
    teacher_id = teacher_id or teacher_identity(teacher)
    directory = Path(root) / (entry_key(teacher_id, seqs, vocab_size) + fmt.key_suffix)
    with _locked(Path(root) / f".{directory.name}.lock", enabled=rank == 0):
        ready = _agree(dist, (directory / "meta.json").is_file())
        if not ready:
            if load_teacher is None:
                raise FileNotFoundError(f"teacher logit cache {directory} does not exist and no teacher was given")
            _build(directory, teacher, teacher_id, seqs, vocab_size, load_teacher(), batch_size, pad_id, device,
                   dist, rank, world, fmt)
    return fmt.open(directory)


def shard_layout(lengths: Sequence[int], world: int) -> np.ndarray:
    """``[n, 2]``: for sequence i, the rank that computes and writes it (i mod world) and its first
    row in that rank's file (its sequences in order, back to back)."""
    layout = np.zeros((len(lengths), 2), dtype=np.int64)
    next_row = [0] * world
    for index, length in enumerate(lengths):
        owner = index % world
        layout[index] = (owner, next_row[owner])
        next_row[owner] += int(length)
    return layout


def _build(directory: Path, teacher, teacher_id: str, seqs: list[list[int]], vocab_size: int,
           model, batch_size: int, pad_id: int, device: torch.device, dist, rank: int,
           world: int, fmt) -> None:
    staging = directory.with_name(directory.name + ".building")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    layout = shard_layout(lengths, world)
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
        np.save(staging / "offsets.npy", offsets)
        np.save(staging / "ids.npy", np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))
        np.save(staging / "layout.npy", layout)
    if dist is not None:
        dist.barrier()
    mine = list(range(rank, len(seqs), world))
    my_rows = int(lengths[mine].sum()) if mine else 0
    # This rank's own file: no page of it is ever written by another rank (or node).
    store = fmt.create(staging, rank, my_rows, vocab_size) if my_rows else None
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
        logits = logits[..., :vocab_size].float().cpu()
        for row, index in enumerate(picked):
            if index % world != rank:  # a rank without sequences only keeps the collectives in step
                continue
            fmt.write(store, int(layout[index, 1]), logits[row, :lengths[index]])
    if store is not None:
        while store:  # flushed, then unmapped (no reference left)
            store.popitem()[1].flush()
    if dist is not None:
        dist.barrier()
    if rank == 0:
        atomic_write_json(staging / "meta.json", {
            "teacher": str(teacher), "teacher_id": teacher_id, "vocab_size": vocab_size, **fmt.meta(vocab_size),
            "sequences": len(seqs), "positions": int(offsets[-1]), "layout": "one file per writing rank",
            "created": utc_now()})
        os.replace(staging, directory)
    if dist is not None:
        dist.barrier()
