"""The GPU check's bench cell, with nothing downloaded: `scripts/gpu_check.sh` runs

    python scripts/gpu_check_cell.py prepare DIR [--dtype bfloat16]   # tokenizer, models, data, spec
    RLKD_DATA_DIR=DIR/data rlkd bench DIR/spec.yaml --results-dir DIR/results --jobs 1
    python scripts/gpu_check_cell.py verify DIR OUT.json               # both cells finished, with metrics

`prepare` writes a word-level tokenizer built from the fixture's own words, a tiny random Llama
teacher and student (a few MB), 32 GSM8K-format training rows and 8 test rows of "what is a plus b"
questions, and a spec of two cells sharing one training setting (KL+R, ZeRO-3): one scored by the
GSM8K task (greedy generation, exact answer), one by alignment against the teacher (CR/MOR/PPL on
the trained-on sequences). Together they run training, export, task and alignment evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def make_tokenizer(texts: list[str], folder: Path):
    """A word-level tokenizer over the fixture's words (anything else is <unk>), with BOS added."""
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pattern = r"\w+|[^\w\s]"
    words = sorted({w for text in texts for w in re.findall(pattern, text)})
    vocab = {token: index for index, token in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def prepare(root: Path, dtype: str) -> None:
    from rlkd.data.templates import alpaca_prompt
    from rlkd.factory import tiny_llama_model

    train, test = _rows(32, 0), _rows(8, 1)
    data = root / "data" / "gsm8k"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [alpaca_prompt(r["question"]) + r["answer"] for r in train + test]
    tokenizer = make_tokenizer(texts, root / "tokenizer")
    models = {}
    for seed, (name, shape) in enumerate({"teacher": dict(hidden=64, layers=2, heads=4),
                                          "student": dict(hidden=32, layers=2, heads=2)}.items()):
        model = tiny_llama_model(vocab_size=len(tokenizer), seed=seed, max_positions=512,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **shape)
        models[name] = root / "models" / name
        model.save_pretrained(models[name])
        tokenizer.save_pretrained(models[name])
    spec = {
        "name": "gpu_check", "layout": "generic",
        "description": "scripts/gpu_check.sh: one training setting scored by a task and by alignment",
        "defaults": {
            "models": {"teacher": str(models["teacher"]), "student": str(models["student"]), "dtype": dtype},
            "data": {"task": "gsm8k", "split": "train", "limit": 32, "max_length": 128},
            "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 4, "lr": 1.0e-3},
            "loss": {"ranking": {"k": 5}},
        },
        "tasks": [
            {"name": "gsm8k", "eval": {"kind": "task", "limit": 4, "max_new_tokens": 8, "batch_size": 2}},
            {"name": "alignment", "eval": {"kind": "alignment", "source": "train", "batch_size": 4}},
        ],
        "objectives": ["kl"], "variants": ["R"], "seeds": [1],
    }
    import yaml

    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"gpu_check_cell: prepared {root} (vocab {len(tokenizer)})")


def verify(root: Path, out: Path) -> int:
    """Both cells finished with their metrics (GSM8K score; CR@1 and perplexity against the teacher)."""
    found: dict[str, dict] = {}
    for metrics_path in sorted((root / "results").glob("*/metrics.json")):
        found[metrics_path.parent.name] = json.loads(metrics_path.read_text())
    task = next((m for name, m in found.items() if name.startswith("gsm8k")), None)
    alignment = next((m for name, m in found.items() if name.startswith("alignment")), None)
    problems = []
    if task is None or "score" not in json.dumps(task):
        problems.append("no finished gsm8k cell with a score")
    if alignment is None or "cr@1" not in json.dumps(alignment):
        problems.append("no finished alignment cell with cr@1")
    report = {"cells": found, "ok": not problems, "problems": problems}
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ok": not problems, "problems": problems, "cells": sorted(found)}))
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["prepare", "verify"])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        prepare(args.root, args.dtype)
        return 0
    return verify(args.root, args.out or args.root / "verify.json")


if __name__ == "__main__":
    sys.exit(main())
