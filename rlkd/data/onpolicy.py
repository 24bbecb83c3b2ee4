"""On-policy sequences (GKD, Agarwal et al. 2024): with probability λ per micro-batch the responses
are sampled from the current student instead of taken from the dataset.

``data.on_policy: {lmbda, max_new_tokens, do_sample, temperature, top_k, top_p}`` (GKD's names
and defaults where it has them). The dataset side is whatever ``data`` names, so "the teacher's
cached generations" are a dataset of teacher responses (e.g. a ``tokenized`` JSONL).

Each micro-batch keeps its prompts (the tokens up to the first supervised position); an
on-policy one replaces every response by the student's continuation, up to ``max_new_tokens``,
stopping at EOS (which is kept as a target), and supervises exactly the generated tokens, with
the shifted mask convention. The teacher then scores those sequences like any other, so every
objective, with or without the ranking term, trains on them unchanged.

Determinism and resume: whether draw number i is on-policy depends only on (seed, i), so all
ranks decide alike (ZeRO-3 generation is collective); the sampling RNG is seeded from
(seed, i, rank) inside ``torch.random.fork_rng``, leaving the training RNG untouched. The draw
counter is part of the loader state saved in checkpoints, so a resumed run samples exactly what
the uninterrupted run would have.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from rlkd.data.encode import IGNORE_INDEX, Encoded
from rlkd.data.loader import Batch, collate


class OnPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="Probability that a micro-batch's responses are "
                         "replaced by the student's own (GKD's lambda); 0: off-policy, 1: always on-policy.")
    max_new_tokens: int = Field(128, ge=1, description="Longest student continuation, in tokens (it also stops "
                                "at EOS).")
    do_sample: bool = Field(True, description="Sample the continuations; false: greedy.")
    temperature: float = Field(0.9, gt=0.0, description="Sampling temperature (GKD's default 0.9).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens only; 0: no top-k filter.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold; 1: no filter.")


def is_on_policy(seed: int, draw: int, lmbda: float) -> bool:
    """Whether micro-batch number ``draw`` (0-based, counted over the whole run) is sampled."""
    return random.Random(f"on-policy/{seed}/{draw}").random() < lmbda


def prompt_length(supervised: torch.Tensor, length: int) -> int:
    """Tokens before the response: up to and including the first supervised logit position."""
    where = supervised.nonzero()
    return int(where[0, 0]) + 1 if where.numel() else length


class OnPolicyBatches:
    """Wraps a :class:`~rlkd.data.ResumableBatches`; same iterator and state protocol."""

    def __init__(self, inner, model, cfg: OnPolicyConfig, *, seed: int, rank: int, world_size: int,
                 max_length: int, eos_id: int | None, device: torch.device):
        self.inner, self.model, self.cfg = inner, model, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_length, self.eos_id, self.device = max_length, eos_id, device
        self.draws = 0

    def state(self) -> dict[str, int]:
        return {**self.inner.state(), "on_policy_draws": self.draws}

    def load_state(self, state: dict[str, Any]) -> None:
        self.inner.load_state(state)
        self.draws = int(state.get("on_policy_draws", 0))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = next(self.inner)
        draw, self.draws = self.draws, self.draws + 1
        if not is_on_policy(self.seed, draw, self.cfg.lmbda):
            return batch
        return self.sample(batch, draw)

    @torch.no_grad()
    def sample(self, batch: Batch, draw: int) -> Batch:
        lengths = [prompt_length(batch.supervised[row], int(batch.attention_mask[row].sum()))
                   for row in range(batch.input_ids.shape[0])]
        room = self.max_length - max(lengths)
        prompts = [batch.input_ids[row, :n].tolist() for row, n in enumerate(lengths)]
        # Every rank generates, even one that will not use the result: under ZeRO-3 each forward
        # gathers parameters collectively (synced_gpus lets the ranks stop at different lengths).
        generated = self._generate(prompts, max(1, min(self.cfg.max_new_tokens, room)), draw)
        if room < 1:
            return batch  # no prompt leaves room for a response: keep the dataset's
        samples = []
        for prompt, new in zip(prompts, generated):
            if self.eos_id is not None and self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
            ids = prompt + new
            supervised = [len(prompt) - 1 <= t < len(ids) - 1 for t in range(len(ids))]
            labels = [ids[t + 1] if supervised[t] else IGNORE_INDEX for t in range(len(ids))]
            samples.append(Encoded(ids, supervised, labels))
        return collate(samples, self.inner.pad_id)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, draw: int) -> list[list[int]]:
        """The student's continuations of each prompt (left-padded batch generation)."""
        pad = self.inner.pad_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        options: dict[str, Any] = {"do_sample": self.cfg.do_sample}
        if self.cfg.do_sample:
            options.update(temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(hash_seed(self.seed, draw, self.rank))
                out = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                          max_new_tokens=max_new_tokens, pad_token_id=pad,
                                          eos_token_id=self.eos_id, synced_gpus=self.world_size > 1,
                                          **options)
        finally:
            self.model.train(was_training)
        return out[:, width:].tolist()


def hash_seed(seed: int, draw: int, rank: int) -> int:
    """A sampling seed per (run seed, draw, rank), stable across processes and Python versions."""
    return random.Random(f"sample/{seed}/{draw}/{rank}").getrandbits(63)
