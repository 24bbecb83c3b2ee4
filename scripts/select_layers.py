"""Greedy layer removal for a layer-subset student of SmolLM2-135M (or any Llama-style model).

Each round removes the layers whose single removal raises perplexity least on a selection text
(two a round down to 12 layers, then one), and reports the perplexity of what is left on the
selection text and on held-out text. The mini specs' 16-layer student came from this procedure
(results/healed_student/layer_selection.json).

    python scripts/select_layers.py MODEL_DIR [--down-to 8] [--out results/healed_student/layer_selection.json]

Selection text: SlimPajama demo documents 100-139, inside the healing range (documents 8-399), 3 x 256
tokens. Held-out: documents 400 and later, 16 x 256 tokens, reported only, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd.paths import default_data_dir
from rlkd.provenance import atomic_write_json


def _slices(tokenizer, docs, n):
    ids = []
    for text in docs:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids[:n * 256]).view(n, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--down-to", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    path = default_data_dir() / "pretrain" / "slimpajama_rlkd_demo.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    selection, heldout = _slices(tokenizer, docs[100:140], 3), _slices(tokenizer, docs[400:], 16)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = list(model.model.layers)

    def ppl(keep, x):
        model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
        model.config.num_hidden_layers = len(keep)
        with torch.no_grad():
            return math.exp(model(input_ids=x, labels=x, use_cache=False).loss.item())

    keep = list(range(len(layers)))
    rounds = [{"layers": keep, "selection_ppl": ppl(keep, selection), "heldout_ppl": ppl(keep, heldout)}]
    while len(keep) > args.down_to:
        scores = {i: ppl([j for j in keep if j != i], selection) for i in keep}
        drop = sorted(keep, key=scores.get)[:2 if len(keep) > 12 else 1]
        keep = [j for j in keep if j not in drop]
        rounds.append({"layers": keep, "selection_ppl": ppl(keep, selection), "heldout_ppl": ppl(keep, heldout)})
        print(len(keep), keep, f"selection {rounds[-1]['selection_ppl']:.1f}", f"held-out {rounds[-1]['heldout_ppl']:.1f}",
              flush=True)
    if args.out:
        atomic_write_json(args.out, {"procedure": __doc__.split("\n\n")[1].replace("\n", " "), "rounds": rounds})


if __name__ == "__main__":
    main()
