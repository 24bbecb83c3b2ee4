import json
from types import SimpleNamespace

import pytest
import torch

from rlkd.eval._testing import llama2_tokenizer_dir, save_tiny_checkpoint, tiny_llama
from rlkd.eval.generate import (CheckpointNotFoundError, DecodingConfig, generate_texts, greedy,
                                load_checkpoint, merge_shards, minillm_sampling, resolve_checkpoint,
                                shard_indices)

TOKENIZER_DIR = llama2_tokenizer_dir()
needs_tokenizer = pytest.mark.skipif(TOKENIZER_DIR is None, reason="needs the llama2 tokenizer in ../shared/data")


@pytest.mark.parametrize("n", [0, 1, 5, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_item_once_and_merge_back_in_order(n, world):
    items = [f"item{i}" for i in range(n)]
    shards = [[items[i] for i in shard_indices(n, world, rank)] for rank in range(world)]
    assert sorted(i for rank in range(world) for i in shard_indices(n, world, rank)) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert merge_shards(shards, n) == items


def test_merge_rejects_a_short_shard_and_bad_rank():
    with pytest.raises(ValueError, match="rank 1 returned 1 results, expected 2"):
        merge_shards([["a", "c"], ["b"]], 4)
    with pytest.raises(ValueError, match="outside"):
        shard_indices(4, 2, 2)


def test_decoding_presets():
    paper = greedy()
    assert not paper.do_sample
    minillm = minillm_sampling(seed=10)
    assert (minillm.temperature, minillm.top_k, minillm.top_p, minillm.no_repeat_ngram_size) == (1.0, 0, 1.0, 6)
    assert (minillm.max_prompt_tokens, minillm.max_new_tokens, minillm.seed) == (256, 256, 10)
    with pytest.raises(ValueError, match="seed"):
        DecodingConfig(do_sample=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy(max_new_tokens=0)
    assert json.loads(json.dumps(minillm.as_dict()))["no_repeat_ngram_size"] == 6


def _manual_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding without cache, padding or generate(): argmax of the last logit, repeatedly."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            out.append(token)
    return out


@needs_tokenizer
def test_greedy_is_deterministic_and_left_padding_changes_nothing():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = tiny_llama(seed=3)
    prompts = ["Hello", "A much longer prompt that needs left padding in a batch", "Two words"]
    config = greedy(max_new_tokens=6, batch_size=3)
    first = generate_texts(model, tokenizer, prompts, config)
    again = generate_texts(model, tokenizer, prompts, config)
    one_by_one = generate_texts(model, tokenizer, prompts, config.with_(batch_size=1))
    assert [g.text for g in first] == [g.text for g in again] == [g.text for g in one_by_one]
    for prompt, gen in zip(prompts, first):
        ids = tokenizer(prompt)["input_ids"]
        expected = _manual_greedy(model, ids, 6, eos=2)
        assert gen.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert gen.n_prompt_tokens == len(ids) and gen.n_new_tokens == len(expected)


@needs_tokenizer
def test_sampling_is_reproducible_per_seed():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = tiny_llama(seed=4)
    prompts = ["Once upon a time", "The weather today"]
    a = generate_texts(model, tokenizer, prompts, minillm_sampling(10, max_new_tokens=8))
    b = generate_texts(model, tokenizer, prompts, minillm_sampling(10, max_new_tokens=8))
    c = generate_texts(model, tokenizer, prompts, minillm_sampling(20, max_new_tokens=8))
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]


class _ScriptedModel(torch.nn.Module):
    """Appends a fixed continuation to every row; records the inputs it was given."""

    def __init__(self, continuation, eos=2):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


class _DigitTokenizer:
    """Token id = digit + 10; 2 is EOS; decode joins digits."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text):
        return {"input_ids": [int(c) + 10 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i - 10) for i in ids if i >= 10)


def test_stops_at_eos_truncates_prompts_from_the_left_and_cuts_stop_strings():
    model = _ScriptedModel([15, 16, 2, 17, 18])
    out = generate_texts(model, _DigitTokenizer(), ["123456", "9"],
                         greedy(max_new_tokens=5, max_prompt_tokens=4, batch_size=2))
    assert [g.text for g in out] == ["56", "56"]
    assert [g.hit_eos for g in out] == [True, True]
    assert [g.n_new_tokens for g in out] == [2, 2]
    assert [g.prompt_truncated for g in out] == [True, False]
    input_ids, mask, gen_config = model.calls[0]
    assert input_ids.tolist() == [[13, 14, 15, 16], [0, 0, 0, 19]]  # kept the end, left-padded
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    assert gen_config.do_sample is False and gen_config.max_new_tokens == 5
    no_eos = generate_texts(_ScriptedModel([15, 17, 15]), _DigitTokenizer(), ["1"],
                            greedy(stop_strings=("7",)))
    assert no_eos[0].text == "5" and not no_eos[0].hit_eos


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve_checkpoint(tmp_path / "file.bin")
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        resolve_checkpoint(tmp_path)
    assert resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@needs_tokenizer
def test_load_checkpoint_round_trip(tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt", TOKENIZER_DIR, seed=5)
    model, tokenizer = load_checkpoint(tmp_path / "ckpt")
    reference = tiny_llama(seed=5)
    ids = torch.tensor([tokenizer("Hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits)
    assert not model.training


class _EchoModel(_ScriptedModel):
    """Continues each row with its last prompt token twice, then EOS."""

    def __init__(self):
        super().__init__([])

    def generate(self, input_ids, attention_mask, generation_config):
        last = input_ids[:, -1:]
        return torch.cat([input_ids, last, last, torch.full_like(last, 2)], dim=1)


def _distributed_worker(rank, world, init_file, prompts, out_dir):
    import torch.distributed as dist

    from rlkd.eval.generate import generate_distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        merged = generate_distributed(_EchoModel(), _DigitTokenizer(), prompts, greedy(batch_size=2))
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump([g.text for g in merged], handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_generate_distributed_merges_ranks_in_input_order(tmp_path):
    import torch.multiprocessing as mp

    prompts = ["31", "4", "159", "26", "5"]
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), prompts, str(tmp_path)), nprocs=2)
    expected = ["11", "44", "99", "66", "55"]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
