"""The synthetic source: its stated next-token distributions are what the sampler really draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from rlkd.data.synthetic import BOS, FIRST_CONTENT, MarkovSource, SourceConfig, read_corpus, write_corpus


@pytest.fixture(scope="module")
def source():
    return MarkovSource(SourceConfig(n_states=8, n_content=20, vocab_size=24, seed=3))


@pytest.fixture(scope="module")
def draws(source):
    rng = np.random.default_rng(11)
    return [source.sample(rng, 60) for _ in range(600)]


def _chi_square_per_state(source, sequences, shift=0):
    """Observed next tokens grouped by the state the *truth* assigns to each prefix, tested against
    that state's stated distribution (bins with expected count < 5 pooled)."""
    observed = np.zeros_like(source.emission)
    for tokens in sequences:
        states = source.states(tokens)
        for t in range(len(tokens) - 1 - shift):
            observed[states[t], tokens[t + 1 + shift]] += 1
    p_values = {}
    for state in range(source.config.n_states):
        n = observed[state].sum()
        expected = source.emission[state] * n
        big = expected >= 5
        obs = np.append(observed[state][big], observed[state][~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        keep = exp > 0
        p_values[state] = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    return p_values


def test_distributions_are_proper_and_multimodal(source):
    e = source.emission
    np.testing.assert_allclose(e.sum(axis=1), 1.0, atol=1e-12)
    assert (e[:, :FIRST_CONTENT] == 0).all() and (e[:, FIRST_CONTENT + 20:] == 0).all()
    content = np.sort(e[:, FIRST_CONTENT:FIRST_CONTENT + 20], axis=1)[:, ::-1]
    assert (content > 0).all()  # the background makes every content token possible
    assert (np.diff(content, axis=1) < 0).all()  # strict order: every top-k is well defined
    assert (content[:, 1] / content[:, 0] >= 0.4).all()  # a close second peak in every state
    assert (content[:, 2] > 0.05).all()  # at least three plausible successors everywhere


def test_the_sampler_draws_the_stated_distributions(source, draws):
    p_values = _chi_square_per_state(source, draws)
    assert min(p_values.values()) > 1e-4, p_values  # 8 tests; a correct sampler passes with a fixed seed


def test_the_check_has_power_against_an_off_by_one(source, draws):
    # Pairing each prefix with the token one step later (the classic mask bug) must be rejected.
    p_values = _chi_square_per_state(source, draws, shift=1)
    assert max(p_values.values()) < 1e-6, p_values


def test_truth_helpers(source):
    rng = np.random.default_rng(0)
    tokens = source.sample(rng, 30)
    assert tokens[0] == BOS and len(tokens) == 31
    dist = source.true_distributions(tokens)
    assert dist.shape == (31, source.config.vocab_size)
    states = source.states(tokens)
    for t in range(30):
        assert states[t + 1] == source.transition[states[t], tokens[t + 1]]
    path = source.greedy_continuation(tokens, 5)
    extended = tokens + path
    truth = source.true_distributions(extended)
    assert path == [int(np.argmax(truth[len(tokens) - 1 + i])) for i in range(5)]
    nll = -np.mean(np.log(dist[np.arange(30), tokens[1:]]))
    assert source.entropy_rate_nats(tokens) == pytest.approx(nll)
    with pytest.raises(ValueError, match="BOS"):
        source.states([5, 6])


def test_corpus_is_pretokenized_jsonl_the_engine_reads(source, tmp_path):
    path = write_corpus(source, tmp_path / "train.jsonl", n_sequences=5, length=12, seed=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["loss_mask"] == [False] + [True] * 12 and len(r["input_ids"]) == 13 for r in rows)
    assert read_corpus(path) == [r["input_ids"] for r in rows]
    again = write_corpus(source, tmp_path / "again.jsonl", n_sequences=5, length=12, seed=4)
    assert again.read_text() == path.read_text()  # deterministic given the seed
    from rlkd.data.tasks import load_rows

    loaded = load_rows("tokenized", "train", path=path)
    assert [list(r.input_ids) for r in loaded] == [r["input_ids"] for r in rows]
