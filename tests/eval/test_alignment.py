import math
import random

import pytest
import torch

from rlkd.eval._testing import tiny_llama
from rlkd.eval.alignment import (AlignmentAccumulator, alignment_from_logits, compare_many, compare_models,
                                 make_token_slices, position_agreement)


def _ranked(row: list[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def _brute_force(slices, cr_ks=(1, 2, 3, 4, 5), or_ks=(3, 5, 10, 20)):
    """The paper's definitions in plain Python: per-position values, mean per slice, mean of slices."""
    per_slice = {f"cr@{k}": [] for k in cr_ks} | {f"or@{k}": [] for k in or_ks}
    pooled = {name: [] for name in per_slice}
    ppl_slices, nll_all = [], []
    for student, teacher, targets in slices:
        values = {name: [] for name in per_slice}
        nlls = []
        for pos, (s_row, t_row) in enumerate(zip(student.tolist(), teacher.tolist())):
            s_rank, t_rank = _ranked(s_row), _ranked(t_row)
            for k in cr_ks:
                values[f"cr@{k}"].append(1.0 if s_rank[:k] == t_rank[:k] else 0.0)
            for k in or_ks:
                values[f"or@{k}"].append(len(set(s_rank[:k]) & set(t_rank[:k])) / k)
            log_z = math.log(sum(math.exp(v) for v in s_row))
            nlls.append(log_z - s_row[targets[pos]])
        for name, vals in values.items():
            per_slice[name].append(sum(vals) / len(vals))
            pooled[name].extend(vals)
        ppl_slices.append(math.exp(sum(nlls) / len(nlls)))
        nll_all.extend(nlls)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {}
    for k in cr_ks:
        out[f"cr@{k}"] = 100 * mean(per_slice[f"cr@{k}"])
        out[f"cr@{k}_corpus"] = 100 * mean(pooled[f"cr@{k}"])
    for k in or_ks:
        out[f"mor@{k}"] = 100 * mean(per_slice[f"or@{k}"])
        out[f"or@{k}_corpus"] = 100 * mean(pooled[f"or@{k}"])
    out["top1_agreement"] = out["cr@1_corpus"]
    out["ppl_student"] = mean(ppl_slices)
    out["ppl_student_corpus"] = math.exp(mean(nll_all))
    return out


def _correlated_slices(seed, lengths, vocab=40, noise=0.6):
    gen = torch.Generator().manual_seed(seed)
    slices = []
    for length in lengths:
        teacher = torch.randn(length, vocab, generator=gen) * 3
        student = teacher + noise * torch.randn(length, vocab, generator=gen)
        targets = torch.randint(0, vocab, (length,), generator=gen)
        slices.append((student, teacher, targets))
    return slices


def test_matches_brute_force_reference_across_uneven_slices_and_chunks():
    slices = _correlated_slices(0, lengths=[7, 1, 12, 5])
    result = alignment_from_logits(slices, chunk_size=3)
    expected = _brute_force(slices)
    assert result.n_slices == 4 and result.n_tokens == 25
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    # the noise level gives partial agreement, so these numbers are not trivially 0 or 100
    assert 0 < result.metrics["cr@2"] < 100 and 0 < result.metrics["mor@5"] < 100
    # per-slice averaging differs from token pooling when slices have different lengths
    assert result.metrics["mor@3"] != pytest.approx(result.metrics["or@3_corpus"])


def test_constructed_cases():
    teacher = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    same = position_agreement(teacher.clone(), teacher, cr_ks=(1, 5), or_ks=(3,))
    assert same["cr@1"].item() == 1 and same["cr@5"].item() == 1 and same["or@3"].item() == 1
    swapped = teacher.clone()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]  # ranks 2 and 3 exchanged
    got = position_agreement(swapped, teacher, cr_ks=(1, 2, 3), or_ks=(2, 3))
    assert [got[f"cr@{k}"].item() for k in (1, 2, 3)] == [1, 0, 0]
    assert got["or@2"].item() == pytest.approx(0.5)  # {0,2} vs {0,1}
    assert got["or@3"].item() == pytest.approx(1.0)  # same set, different order


def test_padded_teacher_vocabulary_is_ignored():
    student, teacher, targets = _correlated_slices(1, [6])[0]
    padded = torch.cat([teacher, torch.full((6, 1), 1e4)], dim=1)  # a huge padding-row logit
    a = position_agreement(student, teacher)
    b = position_agreement(student, padded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        position_agreement(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="positions"):
        position_agreement(torch.zeros(2, 30), torch.zeros(3, 30))
    with pytest.raises(ValueError, match="exceeds"):
        position_agreement(torch.zeros(2, 10), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="no slice"):
        AlignmentAccumulator().result()


def test_compare_models_equals_logit_level_metrics():
    student, teacher = tiny_llama(seed=1, vocab_size=64), tiny_llama(seed=2, vocab_size=64)
    rng = random.Random(0)
    token_slices = [[rng.randrange(64) for _ in range(n)] for n in (9, 9, 9, 6, 6)]
    got = compare_models(student, teacher, token_slices, batch_size=2, chunk_size=4)
    with torch.no_grad():
        manual = []
        for s in token_slices:
            ids = torch.tensor([s])
            manual.append((student(ids).logits[0, :-1], teacher(ids).logits[0, :-1], ids[0, 1:]))
    expected = alignment_from_logits(manual)
    assert got.n_slices == 5 and got.n_tokens == 3 * 8 + 2 * 5
    for name, value in expected.metrics.items():
        assert got.metrics[name] == pytest.approx(value, rel=1e-5), name
    assert _brute_force(manual)["ppl_student"] == pytest.approx(got.metrics["ppl_student"], rel=1e-5)
    identical = compare_models(student, student, token_slices)
    assert identical.metrics["cr@5"] == 100 and identical.metrics["mor@20"] == 100
    assert identical.metrics["ppl_student"] == pytest.approx(identical.metrics["ppl_teacher"])
    table = compare_many(teacher, {"self": teacher, "student": student}, token_slices, batch_size=2)
    assert table["self"].metrics["cr@5"] == 100
    assert table["student"].metrics == pytest.approx(got.metrics)


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_make_token_slices_cuts_the_concatenated_stream():
    slices = make_token_slices(["abc", "de", "fghij"], _CharTokenizer(), slice_len=4)
    stream = [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]
    assert slices == [stream[0:4], stream[4:8], stream[8:12]]
    assert make_token_slices(["abc", "de", "fghij"], _CharTokenizer(), 4, max_slices=2) == slices[:2]
    with pytest.raises(ValueError, match="at least 2"):
        make_token_slices(["abc"], _CharTokenizer(), 1)


def test_alignment_text_set_reads_only_its_window_of_documents(tmp_path):
    import json

    from rlkd.eval.dispatch import _slices

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["aa", "bbb", "cc", "dddd", "e"]))
    window = {"text_path": str(docs), "skip_rows": 1, "max_rows": 2, "slice_len": 3}
    b, c, eos = ord("b"), ord("c"), 0
    assert _slices(window, _CharTokenizer(), None) == [[b, b, b], [eos, c, c]]  # docs 1-2; the tail is cut
    to_the_end = _slices({**window, "max_rows": None}, _CharTokenizer(), None)
    assert len(to_the_end) == (4 + 3 + 5 + 2) // 3


def _alignment_worker(rank, world, init_file, token_slices, out_dir):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = tiny_llama(seed=1, vocab_size=64), tiny_llama(seed=2, vocab_size=64)
        result = compare_models(student, teacher, token_slices, batch_size=1)
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(result.as_dict(), handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compare_models_under_torch_distributed_with_uneven_shards(tmp_path):
    import json

    import torch.multiprocessing as mp

    rng = random.Random(1)
    token_slices = [[rng.randrange(64) for _ in range(8)] for _ in range(3)]  # ranks get 2 and 1
    mp.spawn(_alignment_worker, args=(2, str(tmp_path / "init"), token_slices, str(tmp_path)), nprocs=2)
    single = compare_models(tiny_llama(seed=1, vocab_size=64), tiny_llama(seed=2, vocab_size=64),
                            token_slices).as_dict()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(single)
