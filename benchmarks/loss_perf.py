"""Forward+backward time and peak memory of every objective +/- the ranking loss.

Compares rlkd's fused, chunked DistillLoss with a naive reference that materialises full
softmaxes and lets autograd keep them, the way the RLKD release (and most KD code) does.
Each case runs in a fresh subprocess; peak memory is the growth of the process' resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) over the inputs, so it counts
everything the loss allocates, the gradient of the logits included. Time is the minimum over
repeats (robust to other load on the machine).

    python benchmarks/loss_perf.py                    # N=4096, V=32000 and V=128256 -> results/perf/loss.{json,md}
    python benchmarks/loss_perf.py --quick            # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from perf_common import WORKER_ENV, rss_kib
from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["kl", "rkl", "jsd", "tvd", "akl", "skew_kl", "skew_rkl"]
EPS = 1e-10  # the release's smoothing inside log()


# ---- naive references: full softmaxes, plain autograd ---------------------------------------------
def _kl(p, q):
    return (p * (torch.log(p + EPS) - torch.log(q + EPS))).sum(-1)


def naive_base(name, s, t):
    p, q = torch.softmax(t.float(), -1), torch.softmax(s.float(), -1)
    if name == "kl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "jsd":
        m = 0.5 * (p + q)
        return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return _kl(p, 0.1 * p + 0.9 * q)
    if name == "skew_rkl":
        return _kl(q, 0.1 * q + 0.9 * p)
    if name == "akl":
        sorted_p, order = p.sort(-1, descending=True)
        gap = (sorted_p - q.detach().gather(-1, order)).abs()
        tail = sorted_p.cumsum(-1) > 0.5
        tail[:, 0] = False
        g_tail = (gap * tail).sum(-1)
        g_head = gap.sum(-1) - g_tail
        return (g_head * _kl(p, q) + g_tail * _kl(q, p)) / (g_head + g_tail)
    raise ValueError(name)


def naive_rank(s, t, k):
    """The release's topk_spearman_loss: batch-level unique union, soft ranks, mean correlation."""
    from rlkd.objectives.softrank import soft_rank

    ids = torch.unique(torch.cat([t.topk(k).indices, s.topk(k).indices], -1), dim=-1).sort(-1).values
    rp, rq = soft_rank(t.float().gather(-1, ids)), soft_rank(s.float().gather(-1, ids))
    rp, rq = rp - rp.mean(-1, keepdim=True), rq - rq.mean(-1, keepdim=True)
    return 1 - ((rp / rp.norm(dim=-1, keepdim=True)) * (rq / rq.norm(dim=-1, keepdim=True))).sum(-1)


def naive_loss(name, rank_k, s, t):
    base = naive_base(name, s, t).sum()
    if not rank_k:
        return base
    return 2 * naive_rank(s, t, rank_k).sum() + base


# ---- one measurement (runs in its own process) ------------------------------------------------------
def worker(args) -> dict:
    from rlkd.objectives import DistillLoss, RankingConfig

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(args.tokens, args.vocab, generator=g) * 2).requires_grad_(True)
    t = torch.randn(args.tokens, args.vocab, generator=g) * 2
    if args.impl == "rlkd":
        ranking = RankingConfig(k=args.k or 1, enabled=bool(args.k), backend="auto")
        loss_fn = DistillLoss(objective=args.objective, ranking=ranking)

        def step():
            loss_fn(s, t).loss_sum.backward()
    else:
        def step():
            naive_loss(args.objective, args.k, s, t).backward()

    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    base_kib = rss_kib("VmRSS")
    step()
    peak_mib = (rss_kib("VmHWM") - base_kib) / 1024
    s.grad = None
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        s.grad = None
    return {"time_s": min(times), "times_s": times, "peak_mib": peak_mib}


def paired_worker(args) -> dict:
    """Time X and X+R alternately in one process: their ratio is robust to drifting machine load."""
    from rlkd.objectives import DistillLoss, RankingConfig

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(args.tokens, args.vocab, generator=g) * 2).requires_grad_(True)
    t = torch.randn(args.tokens, args.vocab, generator=g) * 2
    losses = {"base": DistillLoss(objective=args.objective),
              "plus_r": DistillLoss(objective=args.objective, ranking=RankingConfig(k=args.k))}
    times = {name: [] for name in losses}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, loss_fn in losses.items():
            start = time.perf_counter()
            loss_fn(s, t).loss_sum.backward()
            times[name].append(time.perf_counter() - start)
            s.grad = None
    best = {name: min(values[1:]) for name, values in times.items()}
    return {"base_s": best["base"], "plus_r_s": best["plus_r"], "ratio": best["plus_r"] / best["base"],
            "times_s": {name: values[1:] for name, values in times.items()}}


def measure(objective, k, impl, tokens, vocab, repeats, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--objective", objective, "--k", str(k), "--impl", impl,
           "--tokens", str(tokens), "--vocab", str(vocab), "--repeats", str(repeats), "--threads", str(threads)]
    # Large frees go back to the OS at once, so the high-water mark of one case is not hidden by
    # memory the allocator kept from an earlier allocation.
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- driver ---------------------------------------------------------------------------------------------
def run(settings, k, repeats, threads):
    rows = []
    for tokens, vocab, with_naive, objectives in settings:
        for objective in objectives:
            for rank_k in (0, k):
                row = {"objective": objective, "ranking": bool(rank_k), "k": rank_k, "tokens": tokens, "vocab": vocab}
                row["rlkd"] = measure(objective, rank_k, "rlkd", tokens, vocab, repeats, threads)
                if with_naive:
                    row["naive"] = measure(objective, rank_k, "naive", tokens, vocab, repeats, threads)
                if rank_k:
                    row["paired"] = measure(objective, k, "paired", tokens, vocab, repeats, threads)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def summarise(rows):
    """Ratios the targets are stated in: (X+R)/X time, rlkd / naive peak memory."""
    out = []
    by_key = {(r["objective"], r["ranking"], r["tokens"], r["vocab"]): r for r in rows}
    for r in rows:
        if r["ranking"]:
            continue
        plus = by_key.get((r["objective"], True, r["tokens"], r["vocab"]))
        entry = {"objective": r["objective"], "tokens": r["tokens"], "vocab": r["vocab"]}
        if plus and "ratio" in plus.get("paired", {}):
            entry["rank_time_ratio"] = plus["paired"]["ratio"]
        for tag, row in (("", r), ("_plus_r", plus)):
            if row and "naive" in row and "peak_mib" in row["naive"] and "peak_mib" in row["rlkd"]:
                entry[f"memory_ratio{tag}"] = row["rlkd"]["peak_mib"] / row["naive"]["peak_mib"]
                entry[f"speedup_vs_naive{tag}"] = row["naive"]["time_s"] / row["rlkd"]["time_s"]
        out.append(entry)
    return out


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def write_markdown(path, meta, rows, summary):
    # Reports saved before the code version was recorded are re-rendered by --rewrite-md too.
    git = meta.get("git") or {"sha": "not recorded", "dirty": "not recorded"}
    lines = [
        "# Loss performance: forward + backward of the distillation loss",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} thread(s); fp32 logits; "
        f"k={meta['k']}; soft-rank backend {meta['backend']}; time = min of {meta['repeats']} repeats; "
        "peak = growth of the process' peak RSS over the inputs (gradient of the logits included); "
        "(X+R)/X is timed with X and X+R alternating in one process.",
        f"Command: `{meta['command']}`; code: {git['sha']} (uncommitted changes: {git['dirty']}); "
        f"load average (1, 5, 15 min) at the end: {meta.get('load_average_end', 'not recorded')}.",
        "",
        "Targets: (KL+R)/KL time ≤ 1.10; rlkd peak loss memory ≤ 0.3× the naive reference.",
        "",
        "| objective | N | V | rlkd s | rlkd +R s | (X+R)/X time | rlkd MiB | naive MiB | mem ratio | +R: rlkd MiB | +R: naive MiB | +R mem ratio | speed-up vs naive | +R speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["objective"], r["ranking"], r["tokens"], r["vocab"]): r for r in rows}
    for s in summary:
        base = by_key[(s["objective"], False, s["tokens"], s["vocab"])]
        plus = by_key.get((s["objective"], True, s["tokens"], s["vocab"]), {})
        get = lambda row, impl, key: row.get(impl, {}).get(key)  # noqa: E731
        lines.append(
            f"| {s['objective']} | {s['tokens']} | {s['vocab']} | {_fmt(get(base, 'rlkd', 'time_s'))} | "
            f"{_fmt(get(plus, 'rlkd', 'time_s'))} | {_fmt(s.get('rank_time_ratio'), '.3f')} | "
            f"{_fmt(get(base, 'rlkd', 'peak_mib'), '.0f')} | {_fmt(get(base, 'naive', 'peak_mib'), '.0f')} | "
            f"{_fmt(s.get('memory_ratio'), '.2f')} | {_fmt(get(plus, 'rlkd', 'peak_mib'), '.0f')} | "
            f"{_fmt(get(plus, 'naive', 'peak_mib'), '.0f')} | {_fmt(s.get('memory_ratio_plus_r'), '.2f')} | "
            f"{_fmt(s.get('speedup_vs_naive'))} | {_fmt(s.get('speedup_vs_naive_plus_r'))} |"
        )
    lines += ["", "Notes:", "",
              "- Logits are random (N(0, 4)); AKL's head search then never ends within the teacher's top 64 "
              "tokens and falls back to a full sort over the vocabulary, its worst case.",
              "- The naive reference is plain autograd over full fp32 softmaxes (the release's +1e-10 inside "
              "log); at V=128256 it is measured at the smaller N given in the table (N=4096 needs > 20 GiB).",
              *[f"- {note}" for note in meta.get("notes", [])]]
    errors = [(r["objective"], r["ranking"], r["vocab"], impl, r[impl]["error"])
              for r in rows for impl in ("rlkd", "naive") if impl in r and "error" in r[impl]]
    if errors:
        lines += ["", "Failed cases (e.g. out of memory):", ""]
        lines += [f"- {o}{'+R' if rk else ''} V={v} {impl}: {err}" for o, rk, v, impl, err in errors]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--objective", default="kl")
    parser.add_argument("--impl", choices=["rlkd", "naive", "paired"], default="rlkd")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--large-vocab-naive-tokens", type=int, default=1024,
                        help="N for the V=128256 naive comparison (N=4096 naive needs > 20 GiB)")
    parser.add_argument("--quick", action="store_true", help="N=256, V=4096, kl only: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "results" / "perf" / "loss"))
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    parser.add_argument("--rewrite-md", action="store_true", help="only re-render <out>.md from <out>.json")
    args = parser.parse_args(argv)
    if args.rewrite_md:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        saved["meta"]["notes"] = saved["meta"].get("notes", []) + args.note
        atomic_write_json(Path(args.out).with_suffix(".json"), saved)
        write_markdown(Path(args.out).with_suffix(".md"), saved["meta"], saved["rows"], saved["summary"])
        return 0
    if args.worker:
        print(json.dumps(paired_worker(args) if args.impl == "paired" else worker(args)))
        return 0

    from rlkd.objectives.softrank import torchsort_available

    objectives = args.objectives.split(",")
    if args.quick:
        settings = [(256, 4096, True, ["kl"])]
    else:
        settings = [(4096, 32000, True, objectives), (args.large_vocab_naive_tokens, 128256, True, objectives),
                    (4096, 128256, False, ["kl"])]
    rows = run(settings, args.k, args.repeats, args.threads)
    summary = summarise(rows)
    meta = {
        **benchmark_meta("benchmarks/loss_perf.py", argv),
        "threads": args.threads, "k": args.k, "repeats": args.repeats,
        "backend": "torchsort" if torchsort_available() else "torch",
        "load_average_end": load_average(), "notes": args.note,
    }
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows, "summary": summary})
    write_markdown(out.with_suffix(".md"), meta, rows, summary)
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
