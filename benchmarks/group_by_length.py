"""Padding and training time with and without ``data.group_by_length``, on a spec's training rows.

    python benchmarks/group_by_length.py          # mini Table 2's Dolly rows -> results/perf/group_by_length.{json,md}

Every padded position of a micro-batch costs a full forward and backward. This counts, for each
seed of the spec, the positions one epoch computes (micro-batch size x its longest row, summed)
with plain shuffled batches and with length-grouped ones, over the same samples; then it times
one epoch of both orders for seed 1 with the spec's student: forward + backward of the
cross-entropy on the supervised positions (no optimizer step, no teacher: the spec caches the
teacher's logits), the two orders alternating batch by batch in one process so that the
machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _epoch(samples, micro_batch_size: int, seed: int, grouped: bool):
    from rlkd.data import ResumableBatches

    run = ResumableBatches(samples, micro_batch_size, seed=seed, shuffle=True, group_by_length=grouped)
    return [next(run) for _ in range(run.batches_per_epoch)]


def _positions(batches) -> int:
    return sum(b.input_ids.numel() for b in batches)


def _real_tokens(batches) -> int:
    return sum(int(b.attention_mask.sum()) for b in batches)


def _step(model, batch) -> float:
    start = time.perf_counter()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = torch.nn.functional.cross_entropy(logits[batch.supervised], batch.labels[batch.supervised])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "benchmarks" / "mini" / "table2_dolly.yaml"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-time", action="store_true", help="count positions only")
    parser.add_argument("--out", default=str(ROOT / "results" / "perf" / "group_by_length"))
    args = parser.parse_args(argv)

    from rlkd.config import DataConfig
    from rlkd.data import build_samples
    from rlkd.factory import resolve_model
    from rlkd.models import load_causal_lm, load_tokenizer
    from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

    torch.set_num_threads(args.threads)
    spec = yaml.safe_load(Path(args.spec).read_text())
    defaults = spec["defaults"]
    micro_batch_size = int(defaults["train"]["micro_batch_size"])
    student = resolve_model(defaults["models"]["student"], ROOT / ".cache" / "models")
    samples = build_samples(DataConfig(**{**defaults["data"], "group_by_length": False}), load_tokenizer(student))
    real = sum(len(s.input_ids) for s in samples)

    seeds = [int(s) for s in args.seeds.split(",")]
    counts, epochs = [], {}
    for seed in seeds:
        plain, grouped = epochs[seed] = tuple(_epoch(samples, micro_batch_size, seed, g) for g in (False, True))
        # padding over the samples an epoch uses (whole micro-batches only), the same set in both orders
        counts.append({"seed": seed, "plain_positions": _positions(plain), "grouped_positions": _positions(grouped),
                       "ratio": _positions(grouped) / _positions(plain), "epoch_tokens": _real_tokens(plain),
                       "padding_plain": 1 - _real_tokens(plain) / _positions(plain),
                       "padding_grouped": 1 - _real_tokens(grouped) / _positions(grouped)})

    timing = None
    if not args.no_time:
        model = load_causal_lm(student, torch.float32)
        model.train()
        plain, grouped = epochs[seeds[0]]
        _step(model, plain[0])  # warm-up
        seconds = {"plain": 0.0, "grouped": 0.0}
        for a, b in zip(plain, grouped):
            seconds["plain"] += _step(model, a)
            seconds["grouped"] += _step(model, b)
        timing = {"seed": seeds[0], "batches": len(plain), **{f"{k}_s": v for k, v in seconds.items()},
                  "ratio": seconds["grouped"] / seconds["plain"]}

    meta = {**benchmark_meta("benchmarks/group_by_length.py", argv),
            "threads": args.threads, "load_average_end": load_average(),
            "spec": str(Path(args.spec).resolve().relative_to(ROOT)), "student": defaults["models"]["student"],
            "micro_batch_size": micro_batch_size, "samples": len(samples), "real_tokens": real}
    report = {"meta": meta, "positions": counts, "timing": timing}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), report)
    lines = ["# Length-grouped micro-batches (`data.group_by_length`): positions computed and training time", "",
             f"Spec `{meta['spec']}`: {len(samples)} training rows, {real} real tokens, micro-batches of "
             f"{micro_batch_size}, one epoch. Machine: {meta['machine']}; torch {meta['torch']}; "
             f"{args.threads} thread(s); fp32. Code: {meta['git']['sha']} (uncommitted changes: {meta['git']['dirty']}).",
             f"Command: `{meta['command']}`", "",
             "| seed | positions, plain | positions, grouped | grouped / plain | padding, plain | padding, grouped |",
             "|---|---|---|---|---|---|"]
    for c in counts:
        lines.append(f"| {c['seed']} | {c['plain_positions']} | {c['grouped_positions']} | {c['ratio']:.3f} | "
                     f"{c['padding_plain']:.1%} | {c['padding_grouped']:.1%} |")
    if timing:
        lines += ["", f"Student `{meta['student']}`, forward + backward of one epoch (seed {timing['seed']}, "
                  f"{timing['batches']} micro-batches, the two orders alternating batch by batch): plain "
                  f"{timing['plain_s']:.1f} s, grouped {timing['grouped_s']:.1f} s, **grouped / plain "
                  f"{timing['ratio']:.3f}**. Load average at the end: {meta['load_average_end']}."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
