"""Peak memory and time of the distillation loss *including the head matmuls*, fused vs logits path.

    python benchmarks/fused_perf.py                                  # the issue's grid -> results/perf/fused.{json,md}
    python benchmarks/fused_perf.py --configs 4096x32000 4096x128256 --objectives kl
    python benchmarks/fused_perf.py --quick                          # a small smoke run
    python benchmarks/fused_perf.py --device cuda --dtype bfloat16 --repeats 3 --name fused_gpu   # on a GPU

Per (N, V): one fresh process holds the student's hidden states [N, H] and head [V, H] and the
teacher's, and runs forward + backward of KL and KL+R on both paths, alternating them, so load on
the machine hits both alike. Logits path: ``loss(h @ W.T, h_t @ W_t.T)`` and autograd through the
matmul; fused path: ``fused_distill_loss`` (rlkd.objectives.fused). Peak memory = growth of the
process' resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the inputs
(the gradients of h and W included; on CUDA the allocator's high-water mark over what is allocated
before the step); time = minimum over the repeats. A configuration whose logits
path would not fit in ``--max-gib`` is recorded as not measured, with its analytic size.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from perf_common import WORKER_ENV, alternating_rounds
from rlkd.objectives.fused import HEAD_BLOCK_ELEMENTS, fused_block_rows

ROOT = Path(__file__).resolve().parents[1]
GRID = [(n, v) for n in (4096, 8192) for v in (32000, 128256, 151936)]
GIB = 1024**3


def logits_path_bytes(n: int, v: int, h: int) -> int:
    """Student logits, their gradient, teacher logits (fp32) and the head gradient."""
    return 3 * n * v * 4 + v * h * 4


def worker(args) -> dict:
    from rlkd.objectives import DistillLoss, RankingConfig
    from rlkd.objectives.fused import HeadInput, fused_distill_loss

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as rlkd train does on CPU
    if args.head_block_elements:
        import rlkd.objectives.fused as fused

        fused.HEAD_BLOCK_ELEMENTS = args.head_block_elements
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    made = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    h = made(args.tokens, args.hidden).requires_grad_(True)
    w = made(args.vocab, args.hidden, scale=2.0 / args.hidden**0.5).requires_grad_(True)
    th, tw = made(args.tokens, args.hidden), made(args.vocab, args.hidden, scale=2.0 / args.hidden**0.5)
    cuda = device.type == "cuda"
    losses = {name: DistillLoss(objective="kl", ranking=RankingConfig(k=args.k, enabled=name == "kl+r"),
                                fused_block_mib=args.fused_block_mib)
              for name in args.objectives}

    def logits_step(loss_fn):
        with torch.no_grad():
            t_logits = th @ tw.t()
        loss_fn(h @ w.t(), t_logits).loss_sum.backward()

    def fused_step(loss_fn):
        fused_distill_loss(loss_fn, HeadInput(h, w), HeadInput(th, tw)).loss_sum.backward()

    steps = {"logits": logits_step, "fused": fused_step}
    ordered = {f"{objective}/{path}": functools.partial(step, loss_fn)
               for objective, loss_fn in losses.items() for path, step in steps.items()}

    def drop_grads():
        h.grad = w.grad = None

    results = alternating_rounds(ordered, args.repeats, cuda=cuda, after_step=drop_grads, rotate=False,
                                 progress=lambda key, s: print(json.dumps({"progress": key, "s": round(s, 2)}),
                                                               file=sys.stderr, flush=True))
    for entry in results.values():
        del entry["values"], entry["peak_bytes"]
        entry["peak_gib"] = max(entry["peaks_bytes"]) / GIB
    return results


def measure(n, v, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tokens", str(n), "--vocab", str(v), "--hidden", str(args.hidden),
           "--head-block-elements", str(args.head_block_elements or 0), "--device", args.device, "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--k", str(args.k),
           *(["--fused-block-mib", str(args.fused_block_mib)] if args.fused_block_mib else []),
           "--objectives", *(args.large_vocab_objectives if v >= 128256 else args.objectives)]
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": f"worker exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["# Fused vs logits path: the KD loss including the head matmuls, forward + backward", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; device {meta.get('device', 'cpu')}, "
             f"{meta['threads']} CPU thread(s); inputs {meta.get('dtype', 'float32')}; H={meta['hidden']}; "
             f"k={meta['k']}; fused blocks of {meta.get('head_block_elements', '?')} logits; "
             f"time = min of {meta['repeats']} repeat(s), logits and fused alternating in one process; "
             f"peak = growth of the {'CUDA allocator high-water mark' if meta.get('device', 'cpu').startswith('cuda') else 'peak RSS'} "
             "over the inputs (h, W, h_t, W_t), gradients of h and W included. "
             f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}.", "",
             f"Command: `{meta.get('command', '')}`; code: {(meta.get('git') or {}).get('sha')} "
             f"(uncommitted changes: {(meta.get('git') or {}).get('dirty')}).", "",
             "Targets (issue 13): peak ≤ 0.2× the logits path at V ≥ 128256; time ≤ 1.1×.", "",
             "| N | V | loss | logits peak GiB | fused peak GiB | peak ratio | logits s | fused s | time ratio | targets |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        n, v = row["tokens"], row["vocab"]
        if "skipped" in row:
            lines.append(f"| {n} | {v} | — | not measured: {row['skipped']} | | | | | | |")
            continue
        if "error" in row["result"]:
            lines.append(f"| {n} | {v} | — | failed: {row['result']['error']} | | | | | | |")
            continue
        for objective in [o for o in ("kl", "kl+r") if f"{o}/logits" in row["result"]]:
            lo, fu = row["result"][f"{objective}/logits"], row["result"][f"{objective}/fused"]
            peak_ratio, time_ratio = fu["peak_gib"] / lo["peak_gib"], fu["time_s"] / lo["time_s"]
            verdict = []
            if v >= 128256:
                verdict.append("peak met" if peak_ratio <= 0.2 else "peak MISSED")
            verdict.append("time met" if time_ratio <= 1.1 else "time MISSED")
            lines.append(f"| {n} | {v} | {objective.upper()} | {lo['peak_gib']:.2f} | {fu['peak_gib']:.2f} | "
                         f"{peak_ratio:.2f} | {lo['time_s']:.1f} | {fu['time_s']:.1f} | {time_ratio:.2f} | "
                         f"{', '.join(verdict)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--configs", nargs="*", default=None, help="NxV entries; default the issue's grid")
    parser.add_argument("--objectives", nargs="*", default=["kl", "kl+r"], choices=["kl", "kl+r"])
    parser.add_argument("--large-vocab-objectives", nargs="*", default=["kl", "kl+r"], choices=["kl", "kl+r"],
                        help="objectives at V >= 128256 (fewer when CPU time is short)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-gib", type=float, default=None,
                        help="skip a configuration whose logits path needs more (default: 60%% of available RAM)")
    parser.add_argument("--skip", nargs="*", default=[], help="NxV entries of the grid recorded as not measured "
                        "(e.g. for lack of time on a shared CPU), with their analytic size")
    parser.add_argument("--head-block-elements", type=int, default=0,
                        help="logits per block of the fused path (default: rlkd.objectives.fused.HEAD_BLOCK_ELEMENTS)")
    parser.add_argument("--fused-block-mib", type=float, default=None,
                        help="loss.fused_block_mib: memory for one block of logits (default: the device's)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak from the CUDA allocator)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="hidden states and head weights (the loss maths runs in fp32 either way)")
    parser.add_argument("--name", default=None, help="report file name (default: fused, or fused_quick)")
    parser.add_argument("--quick", action="store_true", help="N=512, V in {4000, 16000}, H=256")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        configs, args.hidden = [(512, 4000), (512, 16000)], 256
    elif args.configs:
        configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs]
    else:
        configs = GRID
    if args.max_gib is None and args.device.startswith("cuda"):
        args.max_gib = 0.8 * torch.cuda.get_device_properties(0).total_memory / GIB
    if args.max_gib is None:
        available = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                             if line.startswith("MemAvailable")).split()[1]) * 1024
        args.max_gib = 0.6 * available / GIB
    from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

    meta = {**benchmark_meta("benchmarks/fused_perf.py", argv),
            "device": args.device if not args.device.startswith("cuda") else f"{args.device} ({torch.cuda.get_device_name(0)})",
            "dtype": args.dtype, "threads": args.threads, "hidden": args.hidden, "k": args.k, "repeats": args.repeats,
            "head_block_elements": args.head_block_elements or HEAD_BLOCK_ELEMENTS,
            "objectives": args.objectives, "large_vocab_objectives": args.large_vocab_objectives, "load_start": load_average(), "max_gib": args.max_gib}
    rows = []
    for n, v in configs:
        need = logits_path_bytes(n, v, args.hidden) + 4 * v * args.hidden * 2  # + the two heads (inputs)
        block_rows = fused_block_rows(v, torch.tensor([], dtype=getattr(torch, args.dtype)).element_size(),
                                      torch.device(args.device).type, setting_mib=args.fused_block_mib)[0]
        row = {"tokens": n, "vocab": v, "logits_path_analytic_gib": need / GIB, "fused_block_rows": block_rows}
        if f"{n}x{v}" in args.skip:
            row["skipped"] = (f"skipped for time (--skip); inputs + logits path ≈{need / GIB:.1f} GiB, minutes per "
                              "step at 1 CPU thread")
        elif need / GIB > args.max_gib:
            row["skipped"] = f"inputs + logits path need ≈{need / GIB:.1f} GiB > {args.max_gib:.1f} GiB allowed on this shared machine"
        else:
            row["result"] = measure(n, v, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta["load_end"] = load_average()
    report = {"meta": meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("fused_quick" if args.quick else "fused")
    atomic_write_json(args.out / f"{name}.json", report)
    atomic_write_text(args.out / f"{name}.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
