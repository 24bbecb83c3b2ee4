"""Make a tiny random LLaMA teacher and a smaller student (offline) for trying `rlkd train` on CPU.

    python examples/make_tiny_models.py --out runs/tiny_models [--tokenizer PATH]

Both share the LLaMA-2 tokenizer (default: <data dir>/tokenizers/llama2), which is saved next to
each model so the folders load like any Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rlkd.paths import default_data_dir

SHAPES = {"teacher": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4),
          "student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny_models")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: <data dir>/tokenizers/llama2)")
    args = parser.parse_args(argv)
    folder = args.tokenizer or (default_data_dir() / "tokenizers" / "llama2" if default_data_dir() else None)
    if folder is None or not Path(folder).is_dir():
        print("no tokenizer folder: pass --tokenizer or set RLKD_DATA_DIR", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for seed, (name, shape) in enumerate(SHAPES.items()):
        config = LlamaConfig(vocab_size=len(tokenizer), intermediate_size=2 * shape["hidden_size"],
                             num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=1024,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
        torch.manual_seed(seed)
        target = Path(args.out) / name
        LlamaForCausalLM(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
        print(f"{name}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
