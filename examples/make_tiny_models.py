"""Make a tiny random LLaMA teacher and a smaller student (offline) for trying `rlkd train` on CPU.

    python examples/make_tiny_models.py --out runs/tiny_models [--tokenizer PATH]

Both share the LLaMA-2 tokenizer (default: <data dir>/tokenizers/llama2), which is saved next to
each model so the folders load like any Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

from rlkd.factory import tiny_llama_model
from rlkd.paths import default_data_dir

SHAPES = {"teacher": dict(hidden=128, layers=4, heads=4), "student": dict(hidden=64, layers=2, heads=2)}


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
        model = tiny_llama_model(vocab_size=len(tokenizer), seed=seed, max_positions=1024,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
        target = Path(args.out) / name
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        print(f"{name}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
