"""A top-K teacher cache: per position, the teacher's K most likely ids, their log-probabilities and
the log of the mass of every other id, at the KD temperature T.

What is stored and why. Log-probabilities at T, not logits: the KD loss needs log-softmax(z/T) over
the K ids and the tail mass, and both depend on logsumexp(z/T) over the *whole* vocabulary, which
the K logits alone cannot give (nor can logsumexp(z) at T = 1 be turned into another temperature's).
So the build computes, from the full fp32 logits of one teacher pass,

    log p_i    = z_i/T - logsumexp(z/T)                      for the K largest z_i (in the value dtype)
    log p_tail = logsumexp_{j not in top-K}(z_j/T) - logsumexp(z/T)      (fp32; -inf when K = V)

and T is part of the entry's key (with K and the value dtype): an entry built at another temperature
is another entry. The tail is a logsumexp over the uncached logits, never log(1 - sum p_i), which
would lose every digit of a small tail. Log-probabilities of likely ids are near 0, where bf16/fp16
keep the most relative precision; the loss renormalises the K + 1 masses, which rounding in bf16
leaves a little off 1 (rlkd.objectives.sparse_teacher.teacher_buckets). The top-K selection does not
depend on T (z -> z/T is monotone for T > 0).

Layout: the exact cache's (rlkd.teacher_cache): same sequence index, lock, resumable staging and one
file per writing rank, with three arrays per rank: ``topk_ids`` (uint16 when V <= 65536, else int32),
``topk_log_probs`` (the value dtype; bf16 as its raw 16 bits) and ``tail_log_mass`` (float32), ids
in decreasing teacher probability.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rlkd.teacher_cache import SequenceIndex

VALUE_DTYPES = {"float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, np.uint16),
                "float16": (torch.float16, np.float16)}
ROWS_PER_SELECTION = 256  # positions whose full log-softmax is formed at once while building


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.int32


def topk_bytes_per_position(vocab_size: int, top_k: int, value_dtype: str = "float32") -> int:
    """Bytes one position takes in a top-K entry: K ids, K values and one fp32 tail log-mass."""
    k = min(top_k, vocab_size)
    return k * (np.dtype(id_dtype(vocab_size)).itemsize + torch.empty((), dtype=VALUE_DTYPES[value_dtype][0]).element_size()) + 4


class TopKLogProbs:
    """The top-K format of a teacher cache entry (see the module); passed as ``fmt`` to
    :func:`rlkd.teacher_cache.open_or_build`."""

    def __init__(self, top_k: int, value_dtype: str = "float32", temperature: float = 1.0):
        if top_k < 1:
            raise ValueError(f"teacher cache top_k must be >= 1, got {top_k}")
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"teacher cache value dtype {value_dtype!r}: one of {', '.join(VALUE_DTYPES)}")
        if not temperature > 0:
            raise ValueError(f"teacher cache temperature must be > 0, got {temperature}")
        self.top_k, self.value_dtype, self.temperature = int(top_k), value_dtype, float(temperature)
        self.key_suffix = f"-top{self.top_k}-{value_dtype}-t{self.temperature!r}"

    def bytes_per_position(self, vocab_size: int) -> int:
        return topk_bytes_per_position(vocab_size, self.top_k, self.value_dtype)

    def create(self, staging: Path, rank: int, rows: int, vocab_size: int) -> dict[str, np.ndarray]:
        k = min(self.top_k, vocab_size)

        def memmap(stem, dtype, shape):
            return np.lib.format.open_memmap(staging / f"{stem}.rank{rank}.npy", mode="w+", dtype=dtype, shape=shape)

        return {"ids": memmap("topk_ids", id_dtype(vocab_size), (rows, k)),
                "log_probs": memmap("topk_log_probs", VALUE_DTYPES[self.value_dtype][1], (rows, k)),
                "tail": memmap("tail_log_mass", np.float32, (rows,))}

    def write(self, stores: dict[str, np.ndarray], start: int, logits: torch.Tensor) -> None:
        """Store the top-K of one sequence's fp32 logits ``[n, V]`` from row ``start`` on."""
        for first in range(0, logits.shape[0], ROWS_PER_SELECTION):
            ids, log_probs, tail = select_top_k(logits[first:first + ROWS_PER_SELECTION], self.top_k, self.temperature)
            rows = slice(start + first, start + first + ids.shape[0])
            stores["ids"][rows] = ids.numpy().astype(stores["ids"].dtype)
            values = log_probs.to(VALUE_DTYPES[self.value_dtype][0])
            stores["log_probs"][rows] = (values.view(torch.int16).numpy().view(np.uint16)
                                         if self.value_dtype == "bfloat16" else values.numpy())
            stores["tail"][rows] = tail.numpy()

    def meta(self, vocab_size: int) -> dict:
        return {"format": "top_k", "top_k": min(self.top_k, vocab_size), "dtype": self.value_dtype,
                "temperature": self.temperature, "bytes_per_position": self.bytes_per_position(vocab_size)}

    def open(self, directory: Path) -> "TopKTeacherCache":
        return TopKTeacherCache(directory)


def select_top_k(logits: torch.Tensor, top_k: int, temperature: float):
    """``(ids [n, K], log_probs [n, K], tail_log_mass [n])`` of fp32 logits ``[n, V]`` at ``temperature``,
    ids in decreasing probability."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)
    tail = log_p.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, values, tail


class TopKTeacherCache(SequenceIndex):
    """Read side of a top-K entry: ``sparse(input_ids, attention_mask)``."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        meta = self.meta
        self.vocab_size, self.top_k = int(meta["vocab_size"]), int(meta["top_k"])
        self.value_dtype, self.temperature = meta["dtype"], float(meta["temperature"])
        self.bytes_per_position = int(meta["bytes_per_position"])
        self._ids, self._values, self._tail = (self.rank_files(stem) for stem in
                                               ("topk_ids", "topk_log_probs", "tail_log_mass"))

    def sparse(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``(ids [B, L, K] int64, log_probs [B, L, K] float32, tail_log_mass [B, L] float32)`` for
        right-padded rows; padded positions (never read by the loss) hold ids 0..K-1 and zeros."""
        batch, length = input_ids.shape
        ids = torch.arange(self.top_k).expand(batch, length, self.top_k).clone()
        values = torch.zeros(batch, length, self.top_k, dtype=torch.float32)
        tail = torch.zeros(batch, length, dtype=torch.float32)
        for row, file, start, count in self.rows(input_ids, attention_mask):
            ids[row, :count] = torch.from_numpy(self._ids[file][start:start + count].astype(np.int64))
            stored = np.array(self._values[file][start:start + count])  # a writable copy for torch
            if self.value_dtype == "bfloat16":
                values[row, :count] = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).float()
            else:
                values[row, :count] = torch.from_numpy(stored.astype(np.float32))
            tail[row, :count] = torch.from_numpy(np.asarray(self._tail[file][start:start + count]))
        return ids, values, tail
