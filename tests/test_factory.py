"""Model references: layer subsets of a checkpoint keep exactly the named layers' weights."""

from __future__ import annotations

import pytest
import torch

from rlkd.factory import ModelRefError, _layer_list, prune_layers, save_tiny_llama, shared_tokenizer


def test_a_layer_list_keeps_exactly_those_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = shared_tokenizer()
    if tokenizer is None:
        pytest.skip("needs the local Llama-2 tokenizer")
    source = save_tiny_llama(tmp_path / "src", tokenizer_dir=tokenizer, vocab_size=32000, hidden=32, layers=5,
                             heads=2, seed=3)
    prune_layers(source, tmp_path / "sub", [0, 2, 3])
    full = AutoModelForCausalLM.from_pretrained(source)
    sub = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    assert sub.config.num_hidden_layers == 3
    for new, old in enumerate([0, 2, 3]):
        for (name, p), (_, q) in zip(sub.model.layers[new].named_parameters(), full.model.layers[old].named_parameters()):
            assert torch.equal(p, q), (new, old, name)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():  # and it runs with a KV cache (layer indices renumbered)
        sub.generate(ids, max_new_tokens=3, do_sample=False)
    with pytest.raises(ModelRefError, match="cannot keep layers"):
        prune_layers(source, tmp_path / "bad", [0, 5])


def test_layer_refs_parse_increasing_indices_only():
    assert _layer_list("layers-0.1.2.20.29") == [0, 1, 2, 20, 29]
    assert _layer_list("layers-3.1") is None and _layer_list("layers-1.x") is None and _layer_list("layers-2.2") is None
