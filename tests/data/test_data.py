"""Task data: prompts, response masks, packing, error messages, resumable batches."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from rlkd.data import (DataError, IGNORE_INDEX, PromptResponse, ResumableBatches, encode_prompt_response,
                       encode_token_row, load_rows, logit_mask, pack_documents)
from rlkd.data.encode import from_targets
from rlkd.data.tasks import TokenRow
from rlkd.data.templates import PROMPT_NO_INPUT, PROMPT_WITH_INPUT


def test_logit_mask_conventions():
    is_target = [False, False, True, True, True]  # 2 prompt tokens, then response ending in EOS
    assert logit_mask(is_target, "shifted") == [False, True, True, True, False]
    assert logit_mask(is_target, "official_off_by_one") == [False, False, True, True, True]
    with pytest.raises(ValueError):
        logit_mask(is_target, "other")


def test_labels_are_next_tokens_at_supervised_positions():
    enc = from_targets([1, 10, 11, 12, 2], [False, False, True, True, True], "shifted")
    assert enc.labels == [IGNORE_INDEX, 11, 12, 2, IGNORE_INDEX]
    off = from_targets([1, 10, 11, 12, 2], [False, False, True, True, True], "official_off_by_one")
    # the official mask supervises the position after EOS, which has no next token in the row
    assert off.labels == [IGNORE_INDEX, IGNORE_INDEX, 12, 2, IGNORE_INDEX]


@pytest.mark.data
def test_sft_encoding_matches_official_tokenisation(llama_tokenizer):
    item = PromptResponse(PROMPT_NO_INPUT.format(instruction="Add 2 and 3."), "2 + 3 = 5\n#### 5", "x:1")
    enc = encode_prompt_response(item, llama_tokenizer, 512, "shifted")
    # the official code tokenises source + response + "</s>" as one string, and the source alone
    official_ids = llama_tokenizer(item.prompt + item.response + llama_tokenizer.eos_token)["input_ids"]
    len_query = len(llama_tokenizer(item.prompt)["input_ids"])
    assert enc.input_ids == official_ids
    supervised = [t for t, m in enumerate(enc.supervised) if m]
    assert supervised == list(range(len_query - 1, len(official_ids) - 1))
    assert [enc.labels[t] for t in supervised] == official_ids[len_query:]
    assert enc.labels[supervised[-1]] == llama_tokenizer.eos_token_id

    official = encode_prompt_response(item, llama_tokenizer, 512, "official_off_by_one")
    assert [t for t, m in enumerate(official.supervised) if m] == list(range(len_query, len(official_ids)))


@pytest.mark.data
def test_truncation_keeps_examples_with_a_response_and_drops_others(llama_tokenizer):
    item = PromptResponse(PROMPT_NO_INPUT.format(instruction="Say hi."), "hi there friend", "x:1")
    n_prompt = len(llama_tokenizer(item.prompt)["input_ids"])
    assert encode_prompt_response(item, llama_tokenizer, n_prompt, "shifted") is None
    cut = encode_prompt_response(item, llama_tokenizer, n_prompt + 2, "shifted")
    assert len(cut.input_ids) == n_prompt + 2 and sum(cut.supervised) == 2


@pytest.mark.data
def test_gsm8k_first_row_prompt_and_target(data_dir):
    rows = load_rows("gsm8k", "train", data_dir=data_dir, limit=3)
    first = json.loads((data_dir / "gsm8k" / "train.jsonl").open().readline())
    assert rows[0].prompt == PROMPT_NO_INPUT.format(instruction=first["question"])
    assert rows[0].response == first["answer"] and rows[0].where.endswith("train.jsonl:1")


@pytest.mark.data
def test_dolly_training_excludes_rows_in_the_rlkd_test_split(data_dir):
    kept = load_rows("dolly", "train", data_dir=data_dir)
    everything = load_rows("dolly", "train", data_dir=data_dir, exclude_eval_overlap=False)
    flagged = sum(1 for line in (data_dir / "dolly" / "minillm_train.jsonl").open()
                  if json.loads(line)["in_rlkd_dolly_test"])
    assert len(everything) - len(kept) == flagged > 0
    test = load_rows("dolly", "test", data_dir=data_dir)
    first = json.loads((data_dir / "dolly" / "rlkd_dolly_test.jsonl").open().readline())
    expected = (PROMPT_WITH_INPUT.format(instruction=first["instruction"], input=first["context"]) if first["context"]
                else PROMPT_NO_INPUT.format(instruction=first["instruction"]))
    assert test[0].prompt == expected and test[0].response == first["response"]


@pytest.mark.data
@pytest.mark.parametrize("task, split, field", [("xsum", "test", "summary"), ("sni", "test", "output"),
                                                ("vicuna", "test", "output"), ("selfinst", "test", "output"),
                                                ("unni", "test", "output")])
def test_eval_style_sets_load(data_dir, task, split, field):
    rows = load_rows(task, split, data_dir=data_dir, limit=5)
    assert len(rows) == 5
    from rlkd.data.tasks import LOCAL_FILES

    first = json.loads((data_dir / LOCAL_FILES[(task, split)]).open().readline())
    reference = first[field][0] if isinstance(first[field], list) else first[field]
    assert rows[0].response == reference
    if task == "xsum":
        assert first["document"] in rows[0].prompt


@pytest.mark.data
def test_pretrain_packing_with_bos_and_eos(data_dir, llama_tokenizer):
    texts = load_rows("pretrain", "train", data_dir=data_dir, limit=4)
    blocks = pack_documents(texts, llama_tokenizer, 64, "shifted")
    stream = []
    for text in texts:
        stream += [llama_tokenizer.bos_token_id] + llama_tokenizer(text, add_special_tokens=False)["input_ids"] + [2]
    assert len(blocks) == len(stream) // 64
    assert sum((b.input_ids for b in blocks), []) == stream[: 64 * len(blocks)]
    assert all(b.supervised == [True] * 63 + [False] for b in blocks)


def test_skip_and_limit_select_a_window_of_documents_and_samples(data_dir, llama_tokenizer):
    from rlkd.config import DataConfig
    from rlkd.data import build_samples

    everything = load_rows("pretrain", "train", data_dir=data_dir, limit=9)
    assert load_rows("pretrain", "train", data_dir=data_dir, skip=4, limit=5) == everything[4:9]
    config = DataConfig(task="pretrain", data_dir=str(data_dir), skip=4, limit=5, max_length=64, max_samples=3)
    samples = build_samples(config, llama_tokenizer)
    assert [s.input_ids for s in samples] == [b.input_ids for b in pack_documents(everything[4:9], llama_tokenizer,
                                                                                  64, "shifted")[:3]]


def test_max_document_tokens_keeps_each_documents_head_framed_by_bos_and_eos(data_dir, llama_tokenizer):
    from rlkd.config import DataConfig
    from rlkd.data import build_samples

    texts = load_rows("pretrain", "train", data_dir=data_dir, limit=6)
    lengths = [len(llama_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    cap = sorted(lengths)[2]  # some documents are cut, some are shorter than the cap
    assert min(lengths) < cap < max(lengths)
    stream = []
    for text in texts:
        ids = llama_tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += [llama_tokenizer.bos_token_id] + ids[:cap] + [llama_tokenizer.eos_token_id]
    config = DataConfig(task="pretrain", data_dir=str(data_dir), limit=6, max_length=32, max_document_tokens=cap)
    samples = build_samples(config, llama_tokenizer)
    assert len(samples) == len(stream) // 32
    assert sum((s.input_ids for s in samples), []) == stream[: 32 * len(samples)]
    with pytest.raises(ValueError, match="max_document_tokens"):
        DataConfig(task="dolly", max_document_tokens=64)


def test_malformed_jsonl_and_missing_fields_name_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "a"}\n{"question": "q",\n')
    with pytest.raises(DataError, match=rf"{bad_json}:2: malformed JSON"):
        load_rows("gsm8k", "train", path=bad_json)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}])
    with pytest.raises(DataError, match=rf"{missing}:2: missing field 'answer'"):
        load_rows("gsm8k", "train", path=missing)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"instruction": "i", "context": "", "response": 3}])
    with pytest.raises(DataError, match=rf"{wrong}:1: field 'response' should be str"):
        load_rows("dolly", "train", path=wrong)
    ragged = write_jsonl(tmp_path / "ragged.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}])
    with pytest.raises(DataError, match=rf"{ragged}:1: input_ids has 3 entries but loss_mask has 2"):
        load_rows("tokenized", "train", path=ragged)
    with pytest.raises(DataError, match="data file not found"):
        load_rows("gsm8k", "train", path=tmp_path / "absent.jsonl")


def test_token_rows_without_a_target_are_dropped():
    assert encode_token_row(TokenRow([1, 5, 2], [True, False, False], "f:1"), 8, "shifted") is None
    kept = encode_token_row(TokenRow([1, 5, 6, 2], [0, 0, 1, 1], "f:1"), 8, "shifted")
    assert kept.supervised == [False, True, True, False]


def _samples(n):
    return [from_targets([1] + [3 + i] * (1 + i % 3), [False] + [True] * (1 + i % 3), "shifted") for i in range(n)]


def test_batches_resume_exactly_and_ranks_are_disjoint():
    samples = _samples(22)
    run = ResumableBatches(samples, 3, seed=5)
    for _ in range(4):
        next(run)
    saved = run.state()
    expected = [next(run) for _ in range(9)]  # crosses an epoch boundary (7 batches per epoch)
    again = ResumableBatches(samples, 3, seed=5)
    again.load_state(saved)
    for want, got in zip(expected, [next(again) for _ in range(9)]):
        assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.supervised, got.supervised)
    assert run.epoch == 1

    ranks = [ResumableBatches(samples, 2, rank=r, world_size=2, seed=5, pad_id=0) for r in range(2)]
    seen = [[int(b.input_ids[i, 1]) for _ in range(r.batches_per_epoch) for b in [next(r)] for i in range(2)]
            for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 10


def _mixed_lengths(n, seed=0):
    """Samples whose first token is their index (to identify them) and lengths 2-61 at random."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 62, (n,), generator=g).tolist()
    return [from_targets([i] + [7] * (length - 1), [False] + [True] * (length - 1), "shifted")
            for i, length in enumerate(lengths)]


def _epoch(run):
    return [next(run) for _ in range(run.batches_per_epoch)]


def _padded_positions(batches):
    return sum(int((b.attention_mask == 0).sum()) for b in batches)


def test_length_grouped_batches_pad_as_little_as_sorted_chunks_and_cover_the_same_samples():
    samples = _mixed_lengths(96)
    lengths = [len(s.input_ids) for s in samples]
    plain, grouped = ResumableBatches(samples, 8, seed=3), ResumableBatches(samples, 8, seed=3, group_by_length=True)
    plain_epoch, grouped_epoch = _epoch(plain), _epoch(grouped)
    ids = lambda batches: sorted(int(i) for b in batches for i in b.input_ids[:, 0])  # noqa: E731
    assert ids(grouped_epoch) == ids(plain_epoch) == list(range(96))
    # 96 samples fit one megabatch: the best possible grouping, consecutive chunks of the sorted lengths
    ordered = sorted(lengths, reverse=True)
    optimum = sum(8 * max(ordered[i:i + 8]) - sum(ordered[i:i + 8]) for i in range(0, 96, 8))
    assert _padded_positions(grouped_epoch) == optimum
    assert _padded_positions(plain_epoch) > 3 * optimum
    # the batches are shuffled: no length curriculum, and another seed gives another batch order
    maxima = [int(b.attention_mask.sum(-1).max()) for b in grouped_epoch]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)
    other = _epoch(ResumableBatches(samples, 8, seed=4, group_by_length=True))
    assert [int(b.attention_mask.sum(-1).max()) for b in other] != maxima


def test_length_grouped_batches_resume_exactly_and_ranks_share_each_global_batch():
    samples = _mixed_lengths(150, seed=1)
    run = ResumableBatches(samples, 4, seed=5, group_by_length=True)
    for _ in range(30):
        next(run)
    saved = run.state()
    expected = [next(run) for _ in range(12)]  # crosses an epoch boundary (37 batches per epoch)
    again = ResumableBatches(samples, 4, seed=5, group_by_length=True)
    again.load_state(saved)
    for want, got in zip(expected, [next(again) for _ in range(12)]):
        assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.labels, got.labels)
    assert run.epoch == 1

    ranks = [ResumableBatches(samples, 4, rank=r, world_size=2, seed=5, group_by_length=True) for r in range(2)]
    epochs = [_epoch(r) for r in ranks]
    seen = [[int(i) for b in e for i in b.input_ids[:, 0]] for e in epochs]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 18 * 4
    # each step's two micro-batches together are one chunk of 8 of the epoch's lengths, sorted
    # (the 144 samples fit one megabatch)
    ordered = sorted((len(samples[i].input_ids) for i in seen[0] + seen[1]), reverse=True)
    chunks = sorted(tuple(ordered[i:i + 8]) for i in range(0, 144, 8))
    steps = sorted(tuple(sorted((int(x) for b in pair for x in b.attention_mask.sum(-1)), reverse=True))
                   for pair in zip(*epochs))
    assert steps == chunks
    assert _padded_positions([b for e in epochs for b in e]) < _padded_positions(
        [b for r in range(2) for b in _epoch(ResumableBatches(samples, 4, rank=r, world_size=2, seed=5))]) / 3


def test_collate_pads_right_and_masks_padding():
    batch = next(ResumableBatches(_samples(2), 2, shuffle=False, pad_id=0))
    assert batch.input_ids.tolist() == [[1, 3, 0], [1, 4, 4]]
    assert batch.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.supervised.tolist() == [[True, False, False], [True, True, False]]
    assert batch.labels.tolist() == [[3, IGNORE_INDEX, IGNORE_INDEX], [4, 4, IGNORE_INDEX]]


@pytest.mark.data
def test_overlap_rule_reproduces_the_shipped_flag_and_filters_unflagged_rows(data_dir, tmp_path):
    """Rows without `in_rlkd_dolly_test` (e.g. the Hub copy) are matched against the test split by
    the data README's rule; on the local training file it must agree with the shipped flag."""
    from rlkd.data.dolly_overlap import DollyTestOverlap

    matcher = DollyTestOverlap.from_file(data_dir / "dolly" / "rlkd_dolly_test.jsonl")
    rows = [json.loads(line) for line in (data_dir / "dolly" / "minillm_train.jsonl").open()]
    predicted = [matcher.contains(r["instruction"], r["input"], r["output"]) for r in rows]
    assert predicted == [r["in_rlkd_dolly_test"] for r in rows]

    unflagged = write_jsonl(tmp_path / "dolly_hub_like.jsonl",
                            [{"instruction": r["instruction"], "context": r["input"], "response": r["output"]}
                             for r in rows[:300]])
    kept = load_rows("dolly", "train", path=unflagged, data_dir=data_dir)
    assert len(kept) == 300 - sum(r["in_rlkd_dolly_test"] for r in rows[:300])
    assert len(load_rows("dolly", "train", path=unflagged, exclude_eval_overlap=False)) == 300
