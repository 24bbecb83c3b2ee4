"""What a top-K teacher cache costs beside the exact one: storage per position and build time.

For the training sequences of a benchmark spec's cells (default: mini/sparse_teacher, the sequences
its 36 cells train on), each cache format is built from scratch with rlkd's own builder
(:func:`rlkd.teacher_cache.open_or_build`, the call a training run makes), one after the other in this
process, with the teacher already loaded (its load is not part of a build; every format needs it):

* ``bytes/position``: the format's declared size, checked against the entry's files on disk;
* ``on disk``: the entry's files (the arrays plus the sequence index every format shares);
* ``build s``: wall time of ``open_or_build`` (teacher forwards in micro-batches of the spec's size,
  the format's selection, writing); the median of ``--rounds`` builds, the formats interleaved.

Real run (a few minutes on 2 cores; run it on a quiet machine: it is a timing):

    bash ../shared/tools/prepare_smollm2.sh /tmp/smollm2
    python benchmarks/sparse_cache_cost.py            # -> results/sparse_teacher/cache_cost.{md,json}
    python benchmarks/sparse_cache_cost.py --quick --out D   # a tiny random teacher, seconds (the test)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average  # noqa: E402
from rlkd.teacher_cache import ExactLogits, open_or_build  # noqa: E402
from rlkd.teacher_topk_cache import TopKLogProbs  # noqa: E402


def spec_sequences(spec_name: str, tokenizer, work: Path) -> tuple[list[list[int]], int]:
    """The training sequences of the spec's first distillation cell (every cell of mini/sparse_teacher
    trains on the same ones) as the benchmark's cells tokenise them, and its micro-batch size."""
    from rlkd.bench.cli import resolve_spec_path
    from rlkd.bench.executor import train_sequences
    from rlkd.bench.spec import expand, load_spec, run_config

    cell = next(c for c in expand(load_spec(resolve_spec_path(spec_name))) if c.kind == "distill")
    return train_sequences(cell, work)(tokenizer), run_config(cell.run).train.micro_batch_size


def entry_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def measure(teacher, teacher_id: str, sequences, vocab_size: int, top_ks: list[int], *, batch_size: int,
            rounds: int, work: Path) -> list[dict]:
    formats = [("exact", None, ExactLogits())] + [(f"top-{k}", k, TopKLogProbs(k)) for k in top_ks]
    positions = sum(len(s) for s in sequences)
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in formats}
    sizes: dict[str, tuple[int, int]] = {}
    for _ in range(rounds):
        for name, _, fmt in formats:
            root = work / "cache"
            started = time.perf_counter()
            cache = open_or_build(root, teacher_id, sequences, vocab_size, lambda: teacher, batch_size=batch_size,
                                  teacher_id=teacher_id, fmt=fmt)
            seconds[name].append(time.perf_counter() - started)
            declared = int(cache.meta["bytes_per_position"])
            arrays = sum(f.stat().st_size for f in cache.directory.glob("*.rank*.npy"))
            # .npy headers aside, the arrays are exactly the declared bytes per position
            assert abs(arrays - declared * positions) <= 1024 * len(list(cache.directory.glob("*.rank*.npy"))), \
                (name, arrays, declared * positions)
            sizes[name] = (declared, entry_bytes(cache.directory))
            del cache
            shutil.rmtree(root)
    exact = sizes["exact"][0]
    return [{"format": name, "top_k": k, "bytes_per_position": sizes[name][0],
             "fraction_of_exact": sizes[name][0] / exact, "entry_bytes": sizes[name][1], "positions": positions,
             "build_seconds": statistics.median(seconds[name]), "build_seconds_all": seconds[name]}
            for name, k, _ in formats]


def render(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Teacher cache cost: exact against top-K", "",
             f"{result['setup']} {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); load "
             f"average {meta['load_average_start']} at the start, {meta['load_average_end']} at the end. Code: "
             f"{meta['git']['sha']} (uncommitted changes: {meta['git']['dirty']}). Command: `{meta['command']}` "
             "(its docstring defines every column).", "",
             "| format | bytes/position | × exact | on disk (MB) | build s (median) | builds (s) |",
             "|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        builds = ", ".join(f"{s:.1f}" for s in row["build_seconds_all"])
        lines.append(f"| {row['format']} | {row['bytes_per_position']:,} | {row['fraction_of_exact']:.4f} | "
                     f"{row['entry_bytes'] / 1e6:,.1f} | {row['build_seconds']:.1f} | {builds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random teacher and synthetic sequences (the test)")
    parser.add_argument("--teacher", type=Path, default=Path("/tmp/smollm2"), help="the prepared SmolLM2 teacher")
    parser.add_argument("--spec", default="mini/sparse_teacher", help="benchmark whose training sequences are cached")
    parser.add_argument("--top-k", type=int, nargs="+", default=[32, 128], help="top-K formats beside the exact one")
    parser.add_argument("--rounds", type=int, default=3, help="builds of each format (interleaved); the median is shown")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sparse_teacher")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.out.parent if not args.quick else None) as tmp:
        work = Path(tmp)
        if args.quick:
            from rlkd.factory import tiny_llama_model

            vocab = 512
            teacher = tiny_llama_model(vocab_size=vocab, hidden=32, layers=2, heads=2, seed=1, max_positions=64,
                                       pad_token_id=None).eval()
            g = torch.Generator().manual_seed(0)
            sequences = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in (24, 17, 31, 9)]
            batch_size, teacher_id = 2, "tiny-random-llama"
            setup = f"Tiny random LLaMA teacher (vocabulary {vocab}), {len(sequences)} synthetic sequences."
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not (args.teacher / "config.json").is_file():
                print(f"sparse_cache_cost: no teacher at {args.teacher}; run bash ../shared/tools/prepare_smollm2.sh "
                      f"{args.teacher}", file=sys.stderr)
                return 2
            tokenizer = AutoTokenizer.from_pretrained(args.teacher)
            sequences, batch_size = spec_sequences(args.spec, tokenizer, work)
            teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
            vocab, teacher_id = teacher.config.vocab_size, "SmolLM2-135M-Instruct"
            setup = (f"Teacher SmolLM2-135M-Instruct (vocabulary {vocab}, float32) on the {len(sequences)} training "
                     f"sequences of `benchmarks/{args.spec}.yaml` ({sum(map(len, sequences)):,} positions), "
                     f"micro-batches of {batch_size}; {args.rounds} builds of each format, interleaved.")
        started_load = load_average()
        rows = measure(teacher, teacher_id, sequences, vocab, args.top_k, batch_size=batch_size,
                       rounds=1 if args.quick else args.rounds, work=work)
    meta = {**benchmark_meta("benchmarks/sparse_cache_cost.py", argv), "threads": torch.get_num_threads(),
            "load_average_start": started_load, "load_average_end": load_average()}
    result = {"setup": setup, "meta": meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "cache_cost.json", result)
    atomic_write_text(args.out / "cache_cost.md", render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
