"""Why the fused path is slower on CPU at large vocabularies: the head matmul of a block of rows.

    python benchmarks/block_matmul.py            # -> results/perf/block_matmul.{json,md}

The fused loss (rlkd.objectives.fused) computes the head's logits and gradients one block of
rows at a time. This times, in one process, each of the three head matmuls over N rows done at
once and done in blocks of B rows: the logits ``h @ W.T`` (forward, student and teacher), the
hidden-state gradient ``G @ W`` and the weight-gradient update ``gW += G.T @ h``; the ratio
blocked / whole is what the BLAS loses on small blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _best(call, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--blocks", default="128,256,512", help="block rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "perf" / "block_matmul"))
    args = parser.parse_args(argv)
    from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

    torch.set_num_threads(args.threads)
    n, hid, v = args.tokens, args.hidden, args.vocab
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, hid, generator=g), torch.randn(v, hid, generator=g) / hid**0.5
    grad_logits = torch.randn(n, v, generator=g) / v
    grad_w = torch.zeros(v, hid)
    ops = {
        "logits h @ W.T": lambda rows: h[rows] @ w.t(),
        "hidden grad G @ W": lambda rows: grad_logits[rows] @ w,
        "weight grad gW += G.T @ h": lambda rows: grad_w.addmm_(grad_logits[rows].t(), h[rows]),
    }
    rows = []
    for name, op in ops.items():
        whole = _best(lambda: op(slice(0, n)), args.repeats)
        row = {"op": name, "whole_s": whole, "blocked_s": {}, "ratio": {}}
        for block in (int(b) for b in args.blocks.split(",")):
            blocked = _best(lambda: [op(slice(i, i + block)) for i in range(0, n, block)], args.repeats)
            row["blocked_s"][block], row["ratio"][block] = blocked, blocked / whole
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {**benchmark_meta("benchmarks/block_matmul.py", argv),
            "mkl": torch.backends.mkl.is_available(), "threads": args.threads,
            "tokens": n, "hidden": hid, "vocab": v, "repeats": args.repeats, "load_average_end": load_average()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    blocks = list(rows[0]["blocked_s"])
    lines = ["# Head matmuls of the fused path: whole vs in blocks of rows", "",
             f"N = {n}, H = {hid}, V = {v}, fp32; {meta['machine']}; torch {meta['torch']}; {args.threads} thread(s); "
             f"best of {args.repeats}. Code: {meta['git']['sha']} (uncommitted changes: {meta['git']['dirty']}). "
             f"Load average at the end: {meta['load_average_end']}.", f"Command: `{meta['command']}`", "",
             "| matmul | whole s | " + " | ".join(f"blocks of {b}: s (× whole)" for b in blocks) + " |",
             "|---|---|" + "---|" * len(blocks)]
    for r in rows:
        lines.append(f"| `{r['op']}` | {r['whole_s']:.2f} | " +
                     " | ".join(f"{r['blocked_s'][b]:.2f} ({r['ratio'][b]:.2f}×)" for b in blocks) + " |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
