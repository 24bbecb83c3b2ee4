"""Resumable, rank-sharded micro-batches.

The order is a pure function of (seed, epoch), so a run restarted from a checkpoint continues from
the stored (epoch, batch) position with exactly the batches it would have seen.

``group_by_length`` puts samples of similar length in the same micro-batch, as Hugging Face's
``LengthGroupedSampler`` does: the shuffled order is cut into megabatches of
``MEGABATCH_MULT`` global batches, each megabatch sorted by length, cut into global batches
(``micro_batch_size x world_size`` samples, dealt round-robin to the ranks so that every rank
pads to about the same length), and the global batches are shuffled, so no length curriculum
arises. Every padded position costs a full forward and backward, and prompt-response rows of
mixed length are about half padding in a batch of 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlkd.data.encode import IGNORE_INDEX, Encoded

MEGABATCH_MULT = 50  # Hugging Face's default: global batches per length-sorted megabatch


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    supervised: torch.Tensor      # [B, L] bool, per logit position
    labels: torch.Tensor          # [B, L] long, next-token ids, IGNORE_INDEX elsewhere

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.supervised, self.labels)))


def collate(samples: Sequence[Encoded], pad_id: int) -> Batch:
    length = max(len(s.input_ids) for s in samples)
    size = (len(samples), length)
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention = torch.zeros(size, dtype=torch.long)
    supervised = torch.zeros(size, dtype=torch.bool)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        attention[row, :n] = 1
        supervised[row, :n] = torch.tensor(s.supervised)
        labels[row, :n] = torch.tensor(s.labels)
    return Batch(input_ids, attention, supervised, labels)


class ResumableBatches:
    """Endless iterator over micro-batches for one rank; `state()`/`load_state()` give its position."""

    def __init__(self, samples: Sequence[Encoded], micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, pad_id: int = 0, group_by_length: bool = False):
        per_rank = len(samples) // world_size
        if per_rank < micro_batch_size:
            raise ValueError(f"{len(samples)} samples cannot fill one micro-batch of {micro_batch_size} "
                             f"on each of {world_size} ranks")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.group_by_length = group_by_length
        self.batches_per_epoch = per_rank // micro_batch_size
        self.epoch, self.batch = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self.samples)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.shuffle:
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.group_by_length:
            return self._length_grouped(order, generator)
        # equal counts on every rank so collectives line up
        return order[self.rank::self.world_size][: n // self.world_size]

    def _length_grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        """This rank's order: its share of each global batch, the global batches length-grouped."""
        size = self.micro_batch_size * self.world_size
        order = order[: self.batches_per_epoch * size]  # whole global batches only, as without grouping
        mega = size * MEGABATCH_MULT
        length = lambda i: len(self.samples[i].input_ids)  # noqa: E731
        ranked = [i for start in range(0, len(order), mega)
                  for i in sorted(order[start:start + mega], key=length, reverse=True)]
        batches = [ranked[start:start + size] for start in range(0, len(ranked), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [i for batch in batches for i in batch[self.rank::self.world_size]]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order(self.epoch)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        start = self.batch * self.micro_batch_size
        picked = [self.samples[i] for i in self._order[start:start + self.micro_batch_size]]
        self.batch += 1
        return collate(picked, self.pad_id)
