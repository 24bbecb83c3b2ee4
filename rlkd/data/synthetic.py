"""A stochastic source whose next-token distributions are multi-modal and known exactly.

The source is a probabilistic deterministic automaton: a hidden state ``s`` emits the next token
from ``emission[s]`` and moves to ``transition[s, token]``. Because the move is deterministic, the
state after any prefix is a function of the prefix, so the true next-token distribution at every
position is exactly ``emission[state(prefix)]``: no sampling estimate is involved.

Every state has a few "peaks" (3-6 plausible successors, probabilities decaying geometrically by a
random ratio, so the top two are often close: multi-modal) mixed with a small share of a
background distribution over all content tokens (so every top-k, up to k = vocab, is strict).

Token ids: 0 = PAD, 1 = BOS, 2 = EOS, content tokens 3 .. 3 + n_content - 1; the model vocabulary
may be larger (unused ids have probability 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD, BOS, EOS = 0, 1, 2
FIRST_CONTENT = 3


@dataclass(frozen=True)
class SourceConfig:
    n_states: int = 16
    n_content: int = 40
    vocab_size: int = 48  # model vocabulary (>= FIRST_CONTENT + n_content)
    min_peaks: int = 3
    max_peaks: int = 6
    decay_low: float = 0.45  # peak i has weight decay**i, decay ~ U(decay_low, decay_high)
    decay_high: float = 0.9
    background: float = 0.05  # share of the background distribution in every state
    seed: int = 0


class MarkovSource:
    def __init__(self, config: SourceConfig = SourceConfig()):
        if config.vocab_size < FIRST_CONTENT + config.n_content:
            raise ValueError(f"vocab_size {config.vocab_size} < {FIRST_CONTENT + config.n_content} needed")
        if not 1 <= config.min_peaks <= config.max_peaks <= config.n_content:
            raise ValueError("need 1 <= min_peaks <= max_peaks <= n_content")
        self.config = config
        rng = np.random.default_rng(config.seed)
        content = np.arange(FIRST_CONTENT, FIRST_CONTENT + config.n_content)
        background = rng.dirichlet(np.ones(config.n_content))
        self.emission = np.zeros((config.n_states, config.vocab_size))
        self.peaks: list[np.ndarray] = []
        for state in range(config.n_states):
            m = int(rng.integers(config.min_peaks, config.max_peaks + 1))
            decay = rng.uniform(config.decay_low, config.decay_high)
            weights = decay ** np.arange(m)
            tokens = rng.choice(content, size=m, replace=False)
            row = np.zeros(config.vocab_size)
            row[content] = config.background * background
            row[tokens] += (1 - config.background) * weights / weights.sum()
            self.emission[state] = row
            self.peaks.append(tokens)
        self.transition = rng.integers(0, config.n_states, size=(config.n_states, config.vocab_size))
        self.start_state = 0

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, length: int) -> list[int]:
        """BOS followed by ``length`` content tokens."""
        tokens = [BOS]
        state = self.start_state
        cumulative = np.cumsum(self.emission, axis=1)
        for _ in range(length):
            token = int(np.searchsorted(cumulative[state], rng.random() * cumulative[state, -1], side="right"))
            tokens.append(token)
            state = int(self.transition[state, token])
        return tokens

    # -- the truth ----------------------------------------------------------------------------
    def states(self, tokens: list[int]) -> np.ndarray:
        """State after each prefix ``tokens[:t+1]``; ``tokens[0]`` must be BOS."""
        if not tokens or tokens[0] != BOS:
            raise ValueError("a sequence starts with BOS")
        out = np.empty(len(tokens), dtype=np.int64)
        state = self.start_state
        out[0] = state
        for t in range(1, len(tokens)):
            state = int(self.transition[state, tokens[t]])
            out[t] = state
        return out

    def true_distributions(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), vocab]: row t is the exact distribution of ``tokens[t+1]`` given ``tokens[:t+1]``."""
        return self.emission[self.states(tokens)]

    def greedy_continuation(self, prefix: list[int], n: int) -> list[int]:
        """The source's most likely path: the argmax token at each of the next ``n`` steps."""
        state = int(self.states(prefix)[-1])
        out = []
        for _ in range(n):
            token = int(np.argmax(self.emission[state]))
            out.append(token)
            state = int(self.transition[state, token])
        return out

    def entropy_rate_nats(self, tokens: list[int]) -> float:
        """Mean negative log-likelihood of ``tokens[1:]`` under the true source (the best possible)."""
        probs = self.true_distributions(tokens)[:-1]
        return float(-np.mean(np.log(probs[np.arange(len(tokens) - 1), tokens[1:]])))


def token_text(tokens: list[int]) -> str:
    """A readable rendering for ROUGE: one word per token."""
    return " ".join(f"w{t}" for t in tokens)


def write_corpus(source: MarkovSource, path: Path, n_sequences: int, length: int, seed: int) -> Path:
    """Pre-tokenized JSONL, one ``{"input_ids", "loss_mask"}`` per sequence (BOS is not a target)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as handle:
        for _ in range(n_sequences):
            tokens = source.sample(rng, length)
            handle.write(json.dumps({"input_ids": tokens, "loss_mask": [False] + [True] * length}) + "\n")
    tmp.replace(path)
    return path


def read_corpus(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]
