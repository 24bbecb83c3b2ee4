"""What the ranking term adds to the loss's time: (KL+R)/KL, forward + backward, on both paths.

Three losses alternate in one process, round after round, and the report gives each one's ratio
to KL for the fastest and for the median round, so slow drifts of the machine's load cancel out of
the ratio. Run it on a quiet machine (the load average before and after is recorded):

    python benchmarks/rank_cost.py            # -> results/perf/rank_cost.{json,md}

The three: KL; KL+R; and KL plus one bare read of both logits (a max per row, result unused),
the least that any term which reads every logit once more, outside the objective's own passes,
can cost: the floor under the ranking term's top-k on the logits path.

Logits path: random N x V logits (N(0, 4)), at the default chunk size and at smaller chunks.
Fused path (``fused_distill_loss``): hidden states N x H and head weights V x H for both models;
its time includes the head matmuls, so the term's share is smaller there.

Host memory: each setting of glibc's malloc runs in its own process (the setting is process-wide):
``kept`` is what the engine uses on CPU (``rlkd.engine.host_memory``: freed memory stays in the
process), ``default`` is glibc's own rule (large buffers mmap'd and unmapped, so every call faults
its fresh pages in again). The report gives the page faults of each call beside its time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _alternate(calls: dict[str, callable], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    times = {name: [] for name in calls}
    faults = {name: [] for name in calls}
    for _ in range(rounds + 1):  # the first round warms up
        for name, call in calls.items():
            before, start = _faults(), time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            faults[name].append(_faults() - before)
    return {name: values[1:] for name, values in times.items()}, {name: v[1:] for name, v in faults.items()}


def _read_floor_objective():
    """KL plus one bare read of both logits (a max per row, result unused): what any ranking term
    that must look at every logit once more costs at least, outside the objective's own passes."""
    from rlkd.objectives.common import kl_from_log_probs, log_probs
    from rlkd.objectives.registry import register_objective

    name = "kl_plus_bare_read"

    @register_objective(name)
    def kl_plus_bare_read(student_logits, teacher_logits, labels=None):
        student_logits.detach().amax(-1), teacher_logits.amax(-1)
        return kl_from_log_probs(log_probs(teacher_logits), log_probs(student_logits))

    return name


VARIANTS = ("kl", "kl+r", "kl + bare read")


def _losses(k: int, chunk: int | None, floor: str) -> dict:
    from rlkd.objectives import DistillLoss, RankingConfig

    return {"kl": DistillLoss(objective="kl", chunk_size=chunk),
            "kl+r": DistillLoss(objective="kl", ranking=RankingConfig(k=k), chunk_size=chunk),
            "kl + bare read": DistillLoss(objective=floor, chunk_size=chunk)}


def _timed_calls(losses: dict, step) -> dict:
    return {name: (lambda loss=loss: step(loss)) for name, loss in losses.items()}


def logits_case(tokens: int, vocab: int, k: int, chunk: int | None, rounds: int, floor: str) -> dict:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(tokens, vocab, generator=g) * 2).requires_grad_(True)
    t = torch.randn(tokens, vocab, generator=g) * 2

    def step(loss):
        loss(s, t).loss_sum.backward()
        s.grad = None

    return _summary(_alternate(_timed_calls(_losses(k, chunk, floor), step), rounds))


def fused_case(tokens: int, vocab: int, hidden: int, k: int, rounds: int, floor: str) -> dict:
    from rlkd.objectives.fused import HeadInput, fused_distill_loss

    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    w_s = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    h_t, w_t = torch.randn(tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g) / hidden**0.5

    def step(loss):
        fused_distill_loss(loss, HeadInput(h_s, w_s), HeadInput(h_t, w_t)).loss_sum.backward()
        h_s.grad = w_s.grad = None

    return _summary(_alternate(_timed_calls(_losses(k, None, floor), step), rounds))


def _summary(measured: tuple[dict[str, list[float]], dict[str, list[int]]]) -> dict:
    times, faults = measured
    best = {name: min(values) for name, values in times.items()}
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    return {"best_s": best, "ratio": {name: best[name] / best["kl"] for name in times},
            "median_ratio": {name: median[name] / median["kl"] for name in times},
            "faults_per_call": {name: sorted(v)[len(v) // 2] for name, v in faults.items()},
            "times_s": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunks", default="default,32", help="logits-path chunk sizes (rows); 'default' = the loss's own")
    parser.add_argument("--fused-tokens", type=int, default=1024)
    parser.add_argument("--fused-hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--host-malloc", default="kept,default",
                        help="glibc malloc settings to measure, each in its own process: kept (the engine's), default")
    parser.add_argument("--out", default=str(ROOT / "results" / "perf" / "rank_cost"))
    parser.add_argument("--one-setting", choices=("kept", "default"), help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args(argv)
    if args.one_setting:
        return _worker(args)
    from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

    load_before = load_average()
    rows = []
    for setting in args.host_malloc.split(","):
        worker = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--one-setting", setting]
        env = {**os.environ, "RLKD_HOST_MALLOC": setting, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, __file__, *worker], env=env, check=True, text=True,
                             stdout=subprocess.PIPE).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    meta = {**benchmark_meta("benchmarks/rank_cost.py", argv),
            "threads": args.threads, "k": args.k, "rounds": args.rounds,
            "load_average_before": load_before, "load_average_after": load_average()}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    lines = ["# The ranking term's cost: (KL+R)/KL, forward + backward", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} thread(s); fp32; k={args.k}; "
             f"the losses alternate in one process for {args.rounds} rounds after a warm-up; ratios to KL of the "
             f"fastest round (best) and of the median round. Load average (1, 5, 15 min) before: {load_before}; "
             f"after: {meta['load_average_after']}.",
             f"Command: `{meta['command']}`", "", "Target (issue 13): (KL+R)/KL ≤ 1.05 on both paths.", "",
             "Columns: `KL + bare read` is KL plus one max over every row of both logits, result unused: what "
             "any ranking term that must look at every logit once more, outside the objective's own passes, "
             "costs at least (the floor under the top-k of the logits path).", "",
             "host malloc: `kept` = the engine's setting on CPU (freed memory stays in the process), `default` = "
             "glibc's own; page faults = median minor faults of one call.", "",
             "| host malloc | path | N | V | H | chunk (rows) | KL s | (KL+R)/KL best / median | "
             "(KL + bare read)/KL best / median | KL faults | KL+R faults |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best, med = r["ratio"], r["median_ratio"]
        cell = lambda name: f"{best[name]:.3f} / {med[name]:.3f}"  # noqa: E731
        lines.append(f"| {r['host_malloc']} | {r['path']} | {r['tokens']} | {r['vocab']} | {r.get('hidden', '—')} | "
                     f"{r['chunk']} | {r['best_s']['kl']:.3f} | {cell('kl+r')} | {cell('kl + bare read')} | "
                     f"{r['faults_per_call']['kl']} | {r['faults_per_call']['kl+r']} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


def _worker(args) -> int:
    """One host-malloc setting: print one JSON line per case."""
    from rlkd.engine.host_memory import keep_freed_host_memory

    torch.set_num_threads(args.threads)
    floor = _read_floor_objective()
    took = keep_freed_host_memory()  # RLKD_HOST_MALLOC=default (set by main) leaves glibc alone
    if took != (args.one_setting == "kept"):
        raise SystemExit(f"host malloc setting {args.one_setting!r} did not take effect")
    for chunk in args.chunks.split(","):
        size = None if chunk == "default" else int(chunk)
        row = {"host_malloc": args.one_setting, "path": "logits", "tokens": args.tokens, "vocab": args.vocab,
               "chunk": chunk, **logits_case(args.tokens, args.vocab, args.k, size, args.rounds, floor)}
        print(json.dumps(row), flush=True)
    if args.fused_tokens:
        row = {"host_malloc": args.one_setting, "path": "fused", "tokens": args.fused_tokens, "vocab": args.vocab,
               "hidden": args.fused_hidden, "chunk": "default",
               **fused_case(args.fused_tokens, args.vocab, args.fused_hidden, args.k, args.rounds, floor)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
