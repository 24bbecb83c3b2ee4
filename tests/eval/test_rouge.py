import itertools
import random

import pytest
from rouge_score import rouge_scorer

from rlkd.eval.rouge import corpus_rouge, rouge_example, rouge_pkg_available, rouge_pkg_example


def _lcs_brute_force(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by enumerating every subsequence of the shorter list."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for size in range(len(short), 0, -1):
        for combo in itertools.combinations(short, size):
            it = iter(long_)
            if all(token in it for token in combo):  # `in` consumes the iterator: subsequence test
                return size
    return 0


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 100 * 2 * p * r / (p + r)


def test_hand_computed_case():
    scores = rouge_example("the cat sat on the mat", "the cat was on the mat", use_stemmer=False)
    # LCS "the cat on the mat" = 5 of 6 tokens each side; 5 shared unigrams; bigrams
    # the-cat, on-the, the-mat shared out of 5 each.
    assert scores["rougeL"] == pytest.approx(_f(5, 6, 6))
    assert scores["rouge1"] == pytest.approx(_f(5, 6, 6))
    assert scores["rouge2"] == pytest.approx(_f(3, 5, 5))


def test_lcs_with_gaps_hand_computed():
    # LCS of "a b c d e" and "b x d y e z" is "b d e" (3): P = 3/5, R = 3/6.
    scores = rouge_example("a b c d e", "b x d y e z", ("rougeL",), use_stemmer=False)
    assert scores["rougeL"] == pytest.approx(_f(3, 5, 6))


def test_random_texts_match_brute_force_lcs():
    rng = random.Random(0)
    vocab = ["red", "blue", "green", "cat", "dog", "sun", "moon"]
    for _ in range(60):
        pred = [rng.choice(vocab) for _ in range(rng.randint(1, 9))]
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 9))]
        got = rouge_example(" ".join(pred), " ".join(ref), ("rougeL",), use_stemmer=False)["rougeL"]
        assert got == pytest.approx(_f(_lcs_brute_force(pred, ref), len(pred), len(ref)))


def test_stemmer_is_on_by_default():
    assert rouge_example("running dogs", "run dog")["rouge1"] == pytest.approx(100.0)
    assert rouge_example("running dogs", "run dog", use_stemmer=False)["rouge1"] == 0.0


def test_matches_rouge_score_called_directly_with_max_over_references():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    cases = [
        ("The quick brown fox jumps over the lazy dog.", ["A fast brown fox leaped over a dog.",
                                                          "The lazy dog sleeps.", "Quick foxes jump."]),
        ("Paris is the capital of France", ["Paris", "The capital of France is Paris."]),
        ("", ["anything at all"]),
        ("Numbers 1 2 3 and words", ["numbers 3 2 1 and more words"]),
    ]
    for pred, refs in cases:
        ours = rouge_example(pred, refs)
        for kind in ("rouge1", "rouge2", "rougeL"):
            direct = max(scorer.score(ref, pred)[kind].fmeasure for ref in refs)
            assert ours[kind] == pytest.approx(100 * direct)
    preds = [c[0] for c in cases]
    refs = [c[1] for c in cases]
    corpus = corpus_rouge(preds, refs)
    expected = sum(max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in cases) / len(cases)
    assert corpus["rougeL"] == pytest.approx(100 * expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_example("x", [])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        corpus_rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        corpus_rouge([], [])


@pytest.mark.skipif(not rouge_pkg_available(), reason="the `rouge` package is not installed")
def test_rouge_package_variant():
    # pltrdy/rouge's ROUGE-1 counts distinct unigrams: {the,cat,sat,on,mat} vs {a,cat,sat,on,mat}
    # share 4 of 5 -> F = 0.8. No stemming: "dogs" and "dog" differ.
    scores = rouge_pkg_example("the cat sat on the mat", ["a cat sat on a mat", "unrelated"])
    assert scores["rouge_pkg_rouge1"] == pytest.approx(80.0, abs=1e-4)
    assert rouge_pkg_example("dogs", "dog")["rouge_pkg_rouge1"] == 0.0
    assert rouge_pkg_example("", "dog") == {f"rouge_pkg_{t}": 0.0 for t in ("rouge1", "rouge2", "rougeL")}
    both = corpus_rouge(["the cat sat on the mat"], [["a cat sat on a mat"]], with_rouge_pkg=True)
    assert both["rouge_pkg_rouge1"] == pytest.approx(80.0, abs=1e-4)
    assert both["rouge1"] == pytest.approx(_f(4, 6, 6))
