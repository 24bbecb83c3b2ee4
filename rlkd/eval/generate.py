"""Batched generation from a Hugging Face causal LM, greedy or with MiniLLM's sampling protocol.

Prompts are encoded one by one (with the tokenizer's own special tokens, e.g. Llama's BOS),
truncated from the left to ``max_prompt_tokens`` so the end of the prompt (``### Response:``)
survives, sorted by length, left-padded per batch and generated with an explicit
``GenerationConfig`` built from :class:`DecodingConfig` only (a checkpoint's own
``generation_config.json`` sampling defaults never leak in). The continuation is cut at the first
EOS token (the tokenizer's and the checkpoint's EOS ids both count), decoded without special
tokens, cut at the first of ``stop_strings`` if any, and stripped of surrounding whitespace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
MINILLM_SEEDS = (10, 20, 30, 40, 50)


@dataclass(frozen=True)
class DecodingConfig:
    """Every setting that changes what a model generates (stored with each result)."""

    do_sample: bool = False
    max_new_tokens: int = 256
    max_prompt_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    batch_size: int = 8
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.do_sample and self.seed is None:
            raise ValueError("sampling needs a seed so the run can be reproduced")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["stop_strings"] = list(self.stop_strings)
        return out

    def with_(self, **changes) -> "DecodingConfig":
        return replace(self, **changes)


def greedy(**overrides) -> DecodingConfig:
    """The paper's protocol: greedy decoding."""
    return DecodingConfig(do_sample=False, **overrides)


def minillm_sampling(seed: int, **overrides) -> DecodingConfig:
    """MiniLLM's protocol: T=1, top-k off, top-p 1, no repeated 6-grams, prompt <= 256 tokens,
    prompt + answer <= 512 tokens; run once per seed in :data:`MINILLM_SEEDS` and average."""
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=6,
                    max_prompt_tokens=256, max_new_tokens=256)
    settings.update(overrides)
    return DecodingConfig(do_sample=True, seed=seed, **settings)


@dataclass(frozen=True)
class Generation:
    text: str
    n_prompt_tokens: int  # after truncation
    n_new_tokens: int  # up to and excluding EOS
    hit_eos: bool
    prompt_truncated: bool


class CheckpointNotFoundError(FileNotFoundError):
    pass


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """A local checkpoint directory (checked) or a Hub id (passed through)."""
    text = str(checkpoint)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint {text!r} is a file; expected a directory "
                                          "holding config.json and the weights")
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(f"checkpoint directory {text!r} has no config.json "
                                          "(is it a Hugging Face export?)")
        return str(path)
    if _HUB_ID.fullmatch(text) and not text.startswith("."):
        return text
    raise CheckpointNotFoundError(f"checkpoint {text!r} does not exist (not a local directory, "
                                  "and not shaped like a Hub id 'org/name')")


def load_checkpoint(checkpoint: str | os.PathLike, dtype: str = "float32",
                    device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a local directory or Hub id, model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_checkpoint(checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=getattr(torch, dtype))
    except OSError as err:
        raise CheckpointNotFoundError(f"could not load checkpoint {resolved!r}: {err}") from err
    return model.to(device).eval(), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    if not ids:
        raise ValueError("neither the tokenizer nor the checkpoint defines an EOS token")
    return sorted(ids)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], config: DecodingConfig,
                   show_progress: bool = False) -> list[Generation]:
    """Generate one continuation per prompt, returned in the order of ``prompts``."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    encoded, truncated = [], []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        cut = config.max_prompt_tokens is not None and len(ids) > config.max_prompt_tokens
        encoded.append(ids[-config.max_prompt_tokens:] if cut else ids)
        truncated.append(cut)
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encodes to zero tokens; generation needs at least one")
    sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p) \
        if config.do_sample else {}
    gen_config = GenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                                  no_repeat_ngram_size=config.no_repeat_ngram_size,
                                  eos_token_id=eos_ids, pad_token_id=pad_id, **sampling)
    if config.do_sample:
        torch.manual_seed(config.seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if show_progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    for batch in batches:
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                generation_config=gen_config)
        for row, i in enumerate(batch):
            new = output[row, width:].tolist()
            stop = next((j for j, tok in enumerate(new) if tok in eos_ids), None)
            kept = new if stop is None else new[:stop]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            results[i] = Generation(text=_cut_at_stop(text, config.stop_strings).strip(),
                                    n_prompt_tokens=len(encoded[i]), n_new_tokens=len(kept),
                                    hit_eos=stop is not None, prompt_truncated=truncated[i])
    return results  # type: ignore[return-value]


def shard_indices(n: int, world_size: int, rank: int) -> list[int]:
    """Indices of the items rank ``rank`` handles: every ``world_size``-th, starting at ``rank``
    (balanced to within one item, and long and short prompts spread over ranks)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(range(rank, n, world_size))


def merge_shards(shards: Sequence[Sequence[T]], n: int) -> list[T]:
    """Inverse of :func:`shard_indices`: per-rank result lists back into input order."""
    world_size = len(shards)
    merged: list = [None] * n
    seen = 0
    for rank, shard in enumerate(shards):
        expected = len(shard_indices(n, world_size, rank))
        if len(shard) != expected:
            raise ValueError(f"rank {rank} returned {len(shard)} results, expected {expected}")
        for j, item in enumerate(shard):
            merged[rank + j * world_size] = item
        seen += len(shard)
    return merged


def generate_distributed(model, tokenizer, prompts: Sequence[str], config: DecodingConfig,
                         show_progress: bool = False) -> list[Generation]:
    """:func:`generate_texts` split over torch.distributed ranks; every rank gets all results in
    input order. Sampling seeds are offset by the rank so ranks draw different streams."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return generate_texts(model, tokenizer, prompts, config, show_progress)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [prompts[i] for i in shard_indices(len(prompts), world, rank)]
    local_config = config.with_(seed=config.seed + rank) if config.do_sample else config
    local = generate_texts(model, tokenizer, mine, local_config, show_progress and rank == 0)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return merge_shards(gathered, len(prompts))
