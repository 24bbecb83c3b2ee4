"""rlkd's distillation loss against its peers: TRL, torchtune and Liger, with F.cross_entropy as the floor.

    pip install 'rlkd[peers]'                    # the pinned peers (pyproject.toml); a missing one is skipped
    python benchmarks/peer_perf.py               # the full run -> results/perf/peers.{md,json}
    python benchmarks/peer_perf.py --quick       # small shapes, a smoke test (-> results/perf/peers_quick.*)

Run time of the full default on a quiet 2-core CPU (2 threads), estimated from the committed fused.md
step times and Liger at ~0.7x rlkd's: parity 0.5 min, logits path 1.5 min (1 untimed + 3 rounds),
fused H=576 ~7 min (first calls + 1 round of 9 implementations), fused H=2048 ~13 min (first calls +
1 round of 8: its steps take ~3x H=576's), step target 1 min: about 23 min. ``--fused-rounds 2 1``
(a second round at H=576) adds about 4 min.

What runs (forward + backward, fp32, on the CPU unless --device cuda):

* **Parity**, at a small shape: each peer's value and gradient against rlkd's after aligning the
  conventions, each alignment stated in the report (TRL's unlabelled ``batchmean`` divides by the
  number of sequences; torchtune's forward KL is the cross-entropy form -sum p_T log p_S, i.e. KL plus
  the teacher's entropy, averaged over tokens; Liger's chunked JSD averages over tokens and adds
  ``weight_hard_loss`` (0.5 by default) x cross-entropy, set here to 0 with ``weight_soft_loss`` 1;
  beta = 0 is forward KL in TRL, Liger and rlkd's jsd alike).
* **Logits path** (N x V logits given): rlkd KL, KL+R, JSD; TRL's ``GKDTrainer.generalized_jsd_loss``
  (KL and JSD); torchtune's ``ForwardKLLoss`` and ``ForwardKLWithChunkedOutputLoss``;
  ``F.cross_entropy``. Liger's logits-path losses are Triton kernels (GPU only) and are not run here.
* **Fused path** (hidden states and head weights given, the head matmuls included): rlkd's
  ``fused_distill_loss`` at its default block budget and at Liger's chunk (``loss.fused_block_mib``
  set to Liger's ``chunk_size`` rows of logits: equal memory for the logits), with ``loss.compile``
  as given (default auto, rlkd's own default: eager on the CPU, compiled on CUDA) and, beside it at
  Liger's chunk, the other setting (does compiling pay on this device? Liger compiles its chunks);
  Liger's
  ``LigerFusedLinearJSDLoss`` (beta 0: KL; 0.5: JSD) at its default chunk; ``F.cross_entropy`` on
  ``h @ W.T``.

Every path runs in a fresh process; its implementations alternate in rounds (each round starting one
later), time = minimum over the rounds, peak = growth of the peak RSS during the step (gradients
included; benchmarks/perf_common.py). On the fused path each implementation is first called once on
``--warm-tokens`` rows (compiling at the measured chunk shapes); that call's time and the compile
time it implies (first call minus the steady time for as many rows) are reported separately. The
step target, (KL+R)/KL for a whole training step, comes from benchmarks/step_perf.py, run here.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from perf_common import alternating_rounds, timed_step

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 1024**3, 1024**2
PEERS = {"trl": "trl", "torchtune": "torchtune", "liger": "liger-kernel"}  # name -> distribution
LIGER_CHUNK = 1024  # LigerFusedLinearJSDLoss's default chunk_size (rows)
PARITY_RTOL = 1e-4  # fp32, sums over a few hundred logits and tokens in different orders

TARGETS = {
    "fused_equal_memory_time": 1.0,     # rlkd at Liger's chunk: time <= 1.0x Liger
    "fused_default_peak": 0.25,         # rlkd at its default budget: peak <= 0.25x Liger's
    "fused_default_time": 1.15,         # ... and time <= 1.15x Liger's
    "logits_klr_over_kl": 1.10,         # (KL+R)/KL on the logits path
    "step_klr_over_kl": 1.03,           # (KL+R)/KL for a whole training step (benchmarks/step_perf.py)
}

ALIGNMENTS = {
    "TRL": "GKDTrainer.generalized_jsd_loss(student, teacher, beta) on [sequences, T, V], no labels: "
           "'batchmean' divides by the number of sequences, so value x sequences = rlkd's sum; beta 0 = KL(T||S)",
    "torchtune": "ForwardKLLoss is -sum_v p_T log p_S averaged over the labelled tokens (the cross-entropy form): "
                 "value x N - sum of the teacher's entropies = rlkd's KL sum; gradient x N",
    "Liger": "LigerFusedLinearJSDLoss(beta, weight_hard_loss=0, weight_soft_loss=1) averages over the labelled "
             "tokens (its default weight_hard_loss=0.5 would add cross-entropy): value and gradients x N; beta 0 = KL(T||S)",
    "F.cross_entropy": "reduction='sum' = rlkd's objective ce (summed)",
}


# ---- the peers ---------------------------------------------------------------------------------------------
def load_peers(wanted=tuple(PEERS)) -> tuple[dict, dict]:
    """``(available, skipped)``: the peers' loss entry points, and for each missing peer why."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    found, skipped = {}, {}
    for name in wanted:
        try:
            if name == "trl":
                from trl.experimental.gkd import GKDTrainer

                found[name] = GKDTrainer.generalized_jsd_loss
            elif name == "torchtune":
                from torchtune.modules.loss import ForwardKLLoss, ForwardKLWithChunkedOutputLoss

                found[name] = (ForwardKLLoss, ForwardKLWithChunkedOutputLoss)
            elif name == "liger":
                from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

                found[name] = LigerFusedLinearJSDLoss
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            skipped[name] = f"{type(exc).__name__}: {first} (pip install 'rlkd[peers]')"
    return found, skipped


def peer_versions() -> dict[str, str | None]:
    versions = {}
    for dist in ("torch", *PEERS.values(), "torchao"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def teacher_entropy_sum(t: torch.Tensor) -> float:
    log_p = torch.log_softmax(t.double(), -1)
    return float(-(log_p.exp() * log_p).sum())


# ---- logits-path implementations ----------------------------------------------------------------------------
def logits_impls(s, t, labels, sequences, peers, rlkd_compile="auto", k=5, chunks=8) -> dict:
    """name -> (loss closure returning a scalar, aligned(scalar) -> rlkd's summed convention)."""
    from rlkd.objectives import DistillLoss, RankingConfig

    n, v = s.shape
    kl = DistillLoss(objective="kl", compile=rlkd_compile)
    klr = DistillLoss(objective="kl", ranking=RankingConfig(k=k), compile=rlkd_compile)
    jsd = DistillLoss(objective="jsd", compile=rlkd_compile)
    same = lambda x: x  # noqa: E731
    impls = {"rlkd KL": (lambda: kl(s, t).loss_sum, same),
             "rlkd KL+R": (lambda: klr(s, t).loss_sum, same),
             "rlkd JSD": (lambda: jsd(s, t).loss_sum, same)}
    if "trl" in peers:
        gjsd, shaped = peers["trl"], lambda x: x.view(sequences, n // sequences, v)  # noqa: E731
        impls["TRL KL"] = (lambda: gjsd(shaped(s), shaped(t), beta=0.0), lambda x: x * sequences)
        impls["TRL JSD"] = (lambda: gjsd(shaped(s), shaped(t), beta=0.5), lambda x: x * sequences)
    if "torchtune" in peers:
        fkl, chunked = peers["torchtune"][0](), peers["torchtune"][1](num_output_chunks=chunks)
        entropy = teacher_entropy_sum(t)
        by_seq = lambda x: x.view(sequences, n // sequences, *x.shape[1:])  # noqa: E731
        impls["torchtune ForwardKL"] = (lambda: fkl(s, t, labels), lambda x: x * n - entropy)
        impls["torchtune ForwardKL chunked"] = (
            lambda: chunked(list(by_seq(s).chunk(chunks, dim=1)), list(by_seq(t).chunk(chunks, dim=1)), by_seq(labels)),
            lambda x: x * n - entropy)
    impls["F.cross_entropy (floor)"] = (lambda: F.cross_entropy(s, labels, reduction="sum"), same)
    return impls


# ---- fused-path implementations -----------------------------------------------------------------------------
def fused_impls(h, w, th, tw, labels, peers, *, rlkd_compile="true", liger_chunk=LIGER_CHUNK,
                liger_compiled=True, objectives=("kl", "jsd"), floor=True, contrast=False) -> tuple[dict, dict]:
    """(name -> (loss closure, aligned), name -> rlkd's block and chunk rows)."""
    from rlkd.objectives import DistillLoss
    from rlkd.objectives.compiled import compile_wanted
    from rlkd.objectives.fused import HeadInput, fused_block_rows, fused_distill_loss

    v = w.shape[0]
    equal_mib = liger_chunk * v * w.element_size() / MIB  # Liger's chunk of logits, as loss.fused_block_mib
    impls, blocks = {}, {}
    for objective in objectives:
        label, beta = {"kl": ("KL", 0.0), "jsd": ("JSD", 0.5)}[objective]
        budgets = [("default budget", None, rlkd_compile), ("Liger's chunk", equal_mib, rlkd_compile)]
        if contrast:  # does compiling pay here? the same block with the other setting
            other = "false" if compile_wanted(rlkd_compile, w.device.type) else "true"
            budgets.append((f"Liger's chunk, {'eager' if other == 'false' else 'compiled'}", equal_mib, other))
        for where, mib, setting in budgets:
            loss_fn = DistillLoss(objective=objective, compile=setting, fused_block_mib=mib)
            name = f"rlkd {label} ({where})"
            impls[name] = (functools.partial(lambda fn, n: fused_distill_loss(fn, HeadInput(h[:n], w),
                                                                              HeadInput(th[:n], tw)).loss_sum,
                                             loss_fn), lambda x: x)
            blocks[name] = fused_block_rows(v, w.element_size(), w.device.type, setting_mib=mib)
        if "liger" in peers:
            liger = peers["liger"](beta=beta, weight_hard_loss=0.0, weight_soft_loss=1.0, chunk_size=liger_chunk,
                                   compiled=liger_compiled)
            impls[f"Liger {label}"] = (functools.partial(lambda fn, n: fn(h[:n], w, th[:n], tw, labels[:n]), liger),
                                       None)  # aligned below: x N of the call
    if floor:
        impls["F.cross_entropy (floor)"] = (lambda n: F.cross_entropy(h[:n] @ w.t(), labels[:n], reduction="sum"),
                                            lambda x: x)
    return impls, blocks


# ---- workers (one fresh process each) -----------------------------------------------------------------------
def _inputs_logits(n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 2).requires_grad_(True)
    t = torch.randn(n, v, generator=g) * 2
    return s, t, torch.randint(0, v, (n,), generator=g)


def _inputs_fused(n, v, h_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, h_size, generator=g).requires_grad_(True)
    w = (torch.randn(v, h_size, generator=g) * 2.0 / h_size**0.5).requires_grad_(True)
    th, tw = torch.randn(n, h_size, generator=g), torch.randn(v, h_size, generator=g) * 2.0 / h_size**0.5
    return h, w, th, tw, torch.randint(0, v, (n,), generator=g)


def _progress(name, seconds):
    print(json.dumps({"progress": name, "s": round(seconds, 2)}), file=sys.stderr, flush=True)


def _summary(results, aligned) -> dict:
    out = {}
    for name, entry in results.items():
        out[name] = {"time_s": entry["time_s"], "times_s": entry["times_s"], "peak_mib": entry["peak_bytes"] / MIB,
                     "value": aligned[name](entry["values"][-1])}
    return out


def worker_logits(args) -> dict:
    peers, skipped = load_peers()
    s, t, labels = _inputs_logits(args.tokens, args.vocab)
    impls = logits_impls(s, t, labels, args.sequences, peers, args.rlkd_compile, args.k)

    def step(fn):
        loss = fn()
        loss.backward()
        return float(loss.detach())

    def drop():
        s.grad = None

    for fn, _ in impls.values():  # one untimed call each: first-call costs (allocator, caches) out of the rounds
        step(fn)
        drop()
    results = alternating_rounds({name: functools.partial(step, fn) for name, (fn, _) in impls.items()}, args.rounds,
                                 after_step=drop, trim=True, progress=_progress)
    return {"skipped": skipped, "impls": _summary(results, {name: a for name, (_, a) in impls.items()})}


def worker_fused(args) -> dict:
    peers, skipped = load_peers()
    n = args.tokens
    h, w, th, tw, labels = _inputs_fused(n, args.vocab, args.hidden)
    impls, blocks = fused_impls(h, w, th, tw, labels, peers, rlkd_compile=args.rlkd_compile,
                                liger_chunk=args.liger_chunk, objectives=args.objectives,
                                floor=args.hidden in args.floor_hidden, contrast=args.hidden in args.contrast_hidden)

    def step(fn, rows):
        loss = fn(rows)
        loss.backward()
        return float(loss.detach())

    def drop():
        h.grad = w.grad = None

    # First calls, compiling at the measured shapes: rlkd's chunks have one shape whatever the rows
    # (the last one is padded), so --warm-tokens rows suffice; Liger's compiled chunk function also
    # sees the whole target vector, and compiles again for another N, so it is first called on all N.
    first, first_rows = {}, {}
    for name, (fn, _) in impls.items():
        first_rows[name] = n if name.startswith("Liger") else min(args.warm_tokens, n)
        first[name] = timed_step(functools.partial(step, fn, first_rows[name]), trim=True)[0]
        drop()
        _progress(f"first call: {name}", first[name])
    results = alternating_rounds({name: functools.partial(step, fn, n) for name, (fn, _) in impls.items()},
                                 args.rounds, after_step=drop, trim=True, progress=_progress)
    aligned = {name: a if a is not None else (lambda x: x * n) for name, (_, a) in impls.items()}
    out = _summary(results, aligned)
    for name, entry in out.items():
        entry["first_call_s"], entry["first_call_rows"] = first[name], first_rows[name]
        entry["compile_s"] = max(0.0, first[name] - entry["time_s"] * first_rows[name] / n)
        if name in blocks:
            entry["block_rows"], entry["chunk_rows"] = blocks[name]
        elif name.startswith("Liger"):
            entry["block_rows"] = entry["chunk_rows"] = min(args.liger_chunk, n)
    return {"skipped": skipped, "impls": out, "weight_grad_bytes": w.numel() * 4}


def worker_parity(args) -> dict:
    """Values and gradients of each peer against rlkd at a small shape, after aligning conventions."""
    from rlkd.objectives import DistillLoss
    from rlkd.objectives.fused import HeadInput, fused_distill_loss

    peers, skipped = load_peers()
    rows = []

    def compare(pair, alignment, ours, theirs):
        """``ours``/``theirs``: (value, gradients) already in rlkd's summed convention."""
        (v0, g0), (v1, g1) = ours, theirs
        value_rel = abs(v1 - v0) / max(abs(v0), 1e-30)
        grad_rel = max(float((b - a).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(g0, g1))
        rows.append({"pair": pair, "alignment": alignment, "value_rel": value_rel, "grad_rel": grad_rel,
                     "ok": value_rel <= PARITY_RTOL and grad_rel <= PARITY_RTOL})

    n, v, sequences = 64, 503, 4
    s, t, labels = _inputs_logits(n, v, seed=1)

    def run_logits(fn, scale=1.0, offset=0.0):
        leaf = s.detach().clone().requires_grad_(True)
        value = fn(leaf)
        (grad,) = torch.autograd.grad(value, leaf)
        return float(value.detach()) * scale - offset, [grad * scale]

    rlkd = {name: run_logits(lambda x, o=name: DistillLoss(objective=o)(x, t, None, labels).loss_sum)
            for name in ("kl", "jsd", "ce")}
    shaped = lambda x: x.view(sequences, n // sequences, v)  # noqa: E731
    if "trl" in peers:
        for beta, name in ((0.0, "kl"), (0.5, "jsd")):
            compare(f"TRL generalized_jsd_loss(beta={beta}) vs rlkd {name}", ALIGNMENTS["TRL"], rlkd[name],
                    run_logits(lambda x, b=beta: peers["trl"](shaped(x), shaped(t), beta=b), scale=sequences))
    if "torchtune" in peers:
        entropy = teacher_entropy_sum(t)
        fkl, chunked = peers["torchtune"][0](), peers["torchtune"][1](num_output_chunks=4)
        compare("torchtune ForwardKLLoss vs rlkd kl", ALIGNMENTS["torchtune"], rlkd["kl"],
                run_logits(lambda x: fkl(x, t, labels), scale=n, offset=entropy))
        compare("torchtune ForwardKLWithChunkedOutputLoss vs rlkd kl", ALIGNMENTS["torchtune"], rlkd["kl"],
                run_logits(lambda x: chunked(list(shaped(x).chunk(4, dim=1)), list(shaped(t).chunk(4, dim=1)),
                                             labels.view(sequences, -1)), scale=n, offset=entropy))
    compare("F.cross_entropy(reduction='sum') vs rlkd ce", ALIGNMENTS["F.cross_entropy"], rlkd["ce"],
            run_logits(lambda x: F.cross_entropy(x, labels, reduction="sum")))

    h, w, th, tw, labels = _inputs_fused(n, v, 24, seed=2)

    def run_fused(fn, scale=1.0):
        h1, w1 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        value = fn(h1, w1)
        grads = torch.autograd.grad(value, (h1, w1))
        return float(value.detach()) * scale, [g * scale for g in grads]

    if "liger" in peers:
        for beta, name in ((0.0, "kl"), (0.5, "jsd")):
            loss_fn = DistillLoss(objective=name, fused_block_mib=16 * v * 4 / MIB)
            ours = run_fused(lambda a, b: fused_distill_loss(loss_fn, HeadInput(a, b), HeadInput(th, tw)).loss_sum)
            liger = peers["liger"](beta=beta, weight_hard_loss=0.0, weight_soft_loss=1.0, chunk_size=16, compiled=False)
            compare(f"LigerFusedLinearJSDLoss(beta={beta}, eager) vs rlkd fused {name}", ALIGNMENTS["Liger"], ours,
                    run_fused(lambda a, b: liger(a, b, th, tw, labels), scale=n))
    return {"skipped": skipped, "shape": {"tokens": n, "vocab": v, "hidden": 24}, "rows": rows}


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as rlkd train does on the CPU
    return {"logits": worker_logits, "fused": worker_fused, "parity": worker_parity}[args.worker](args)


def spawn(args, kind: str, **shape) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--rounds", str(shape.pop("rounds")),
           "--k", str(args.k), "--liger-chunk", str(args.liger_chunk), "--sequences", str(args.sequences),
           "--warm-tokens", str(args.warm_tokens), "--objectives", *args.objectives,
           "--floor-hidden", *map(str, args.floor_hidden), "--contrast-hidden", *map(str, args.contrast_hidden)]
    cmd += ["--rlkd-compile", args.fused_compile if kind == "fused" else args.logits_compile]
    for key, value in shape.items():
        cmd += [f"--{key}", str(value)]
    # glibc's default malloc (what a user's process gets), its heap trimmed before each step (perf_common):
    # not WORKER_ENV, whose fresh mapping of every buffer over 1 MiB would charge the chunked losses, with
    # their many small per-chunk temporaries, a page fault per 4 KiB of each, every chunk.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "OMP_NUM_THREADS": str(args.threads),
           "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # A fresh inductor cache per worker: compile times are a cold start's, not a reuse of an earlier run's.
    with tempfile.TemporaryDirectory(prefix="peer_perf_inductor_") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": f"worker exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_step_perf(args) -> dict:
    """(KL+R)/KL of a whole training step: benchmarks/step_perf.py, its report kept in a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "step_perf.py"), "--threads", str(args.threads), "--out", tmp,
               *(["--steps", "2", "--warmup", "1", "--vocab", "4096", "--seq-len", "64"] if args.quick else [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        report = Path(tmp) / "step.json"
        if proc.returncode != 0 or not report.exists():
            return {"error": f"benchmarks/step_perf.py exited with {proc.returncode}"}
        data = json.loads(report.read_text())
    return {"command": shlex_join(cmd[1:], tmp), "klr_over_kl": data["ratios"]["klr_over_kl"],
            "median_seconds": data["median_seconds"], "timed_steps": data["timed_steps"], "vocab": data["vocab"]}


def shlex_join(cmd, tmp) -> str:
    import shlex

    return shlex.join(["python", *[os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd]]).replace(
        tmp, "<scratch>")


# ---- targets and the report ----------------------------------------------------------------------------------
def targets(report: dict) -> list[dict]:
    """Each target with its figure and met/missed (a target whose measurement is missing is 'not measured')."""
    out = []

    def add(name, figure, limit, detail=""):
        verdict = "not measured" if figure is None else ("met" if figure <= limit else "MISSED")
        out.append({"target": name, "figure": figure, "limit": limit, "verdict": verdict, "detail": detail})

    for key, fused in report.get("fused", {}).items():
        impls = fused.get("impls", {})
        for label in ("KL", "JSD"):
            liger = impls.get(f"Liger {label}")
            equal, default = impls.get(f"rlkd {label} (Liger's chunk)"), impls.get(f"rlkd {label} (default budget)")
            ratio = lambda a, b, f: (a[f] / b[f]) if a and b else None  # noqa: E731
            other = next(((n.split(", ")[-1].rstrip(")"), e) for n, e in impls.items()
                          if n.startswith(f"rlkd {label} (Liger's chunk, ")), (None, None))
            add(f"fused {label}, {key}, rlkd at Liger's chunk: time / Liger's", ratio(equal, liger, "time_s"),
                TARGETS["fused_equal_memory_time"],
                f"{other[0]} at the same block: {ratio(other[1], liger, 'time_s'):.3f}" if other[1] and liger else "")
            floor = weight_grad_floor(fused)
            add(f"fused {label}, {key}, rlkd default budget: peak / Liger's", ratio(default, liger, "peak_mib"),
                TARGETS["fused_default_peak"],
                f"floor: W's fp32 gradient alone is {floor[1]:.2f}x Liger KL's peak" if floor else "")
            add(f"fused {label}, {key}, rlkd default budget: time / Liger's", ratio(default, liger, "time_s"),
                TARGETS["fused_default_time"],
                (f"the same code at Liger's chunk: {ratio(equal, liger, 'time_s'):.3f}; the difference is the "
                 f"block of {default['block_rows']} rows (this CPU's matmul of a small block: block_matmul.md)")
                if default and equal and liger and default.get("block_rows", 0) < equal.get("block_rows", 0) else "")
    impls = report.get("logits", {}).get("impls", {})
    if "rlkd KL" in impls:
        peers = {n: e for n, e in impls.items() if not n.startswith("rlkd") and "floor" not in n}
        ours = impls["rlkd KL"]
        slower = [n for n, e in peers.items() if e["time_s"] < ours["time_s"]]
        fatter = [n for n, e in peers.items() if e["peak_mib"] < ours["peak_mib"]]
        fastest = min((e["time_s"] for e in peers.values()), default=None)
        leanest = min((e["peak_mib"] for e in peers.values()), default=None)
        add("logits path: rlkd KL time / the fastest peer KD loss", ours["time_s"] / fastest if fastest else None, 1.0,
            "faster: " + ", ".join(slower) if slower else "")
        add("logits path: rlkd KL peak / the leanest peer KD loss", ours["peak_mib"] / leanest if leanest else None, 1.0,
            "leaner: " + ", ".join(fatter) if fatter else "")
        klr = impls.get("rlkd KL+R")
        add("logits path: (KL+R)/KL time", klr["time_s"] / ours["time_s"] if klr else None, TARGETS["logits_klr_over_kl"],
            "the top-k reads both N x V tensors once more than KL does, and every implementation here runs on "
            "glibc's default malloc; rlkd's trainer keeps host memory, as rank_cost.md measures it")
    step = report.get("step", {})
    add("training step (benchmarks/step_perf.py): (KL+R)/KL time", step.get("klr_over_kl"), TARGETS["step_klr_over_kl"],
        step.get("command", step.get("error", "")))
    return out


def weight_grad_floor(fused: dict) -> tuple[int, float] | None:
    """(bytes of the head weight's fp32 gradient, that / Liger KL's peak), when both are known."""
    liger = fused.get("impls", {}).get("Liger KL")
    if not liger or "weight_grad_bytes" not in fused:
        return None
    return fused["weight_grad_bytes"], fused["weight_grad_bytes"] / (liger["peak_mib"] * MIB)


def _f(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["# rlkd against its peers: TRL, torchtune, Liger (forward + backward)", "",
             f"Machine: {meta['machine']}; {meta['threads']} thread(s); device {meta['device']}; fp32. Peers: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             f"Command: `{meta['command']}`; code: {meta['git'].get('sha')} (uncommitted changes: "
             f"{meta['git'].get('dirty')}).",
             f"Load average (1, 5, 15 min) before: {meta['load_before']}; after: {meta['load_after']}.", ""]
    for name, why in meta.get("skipped", {}).items():
        lines.append(f"- peer {name} skipped: {why}")
    lines += ["", "## Targets", ""]
    if meta.get("quick"):
        lines += ["Quick run: small shapes that exercise the code; the targets are stated for the full run's "
                  "shapes and these verdicts say nothing about them.", ""]
    lines += ["| target | figure | limit | verdict | note |", "|---|---|---|---|---|"]
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {_f(row['figure'], '.3f')} | ≤ {row['limit']:g} | {row['verdict']} | "
                     f"{row['detail']} |")
    parity = report.get("parity", {})
    lines += ["", f"## Parity (N={parity.get('shape', {}).get('tokens')}, V={parity.get('shape', {}).get('vocab')}, "
              f"fp32; relative to rlkd; tolerance {PARITY_RTOL:g})", "",
              "| pair | value rel. diff | gradient rel. diff (max abs / max abs) | agree |", "|---|---|---|---|"]
    for row in parity.get("rows", []):
        lines.append(f"| {row['pair']} | {row['value_rel']:.1e} | {row['grad_rel']:.1e} | {'yes' if row['ok'] else 'NO'} |")
    if "error" in parity:
        lines.append(f"| parity worker failed: {parity['error']} | | | |")
    lines += ["", "Alignments:", ""] + [f"- {k}: {v}" for k, v in ALIGNMENTS.items()]
    logits = report.get("logits", {})
    lines += ["", f"## Logits path: N={meta['logits']['tokens']}, V={meta['logits']['vocab']} "
              f"(time = min of {meta['logits']['rounds']} alternating rounds; rlkd loss.compile="
              f"{meta['logits_compile']})", "",
              "| implementation | time s | peak MiB | time / rlkd KL | value (rlkd's convention: summed KL/JSD/CE) |",
              "|---|---|---|---|---|"]
    impls = logits.get("impls", {})
    base = impls.get("rlkd KL", {}).get("time_s")
    for name, e in impls.items():
        lines.append(f"| {name} | {e['time_s']:.2f} | {e['peak_mib']:.0f} | {_f(e['time_s'] / base if base else None)} | "
                     f"{e['value']:.6g} |")
    if "error" in logits:
        lines.append(f"| failed: {logits['error']} | | | | |")
    lines.append("")
    lines.append("Liger's logits-path losses (LigerKLDIVLoss, LigerJSD) are Triton kernels: GPU only, not run on the CPU.")
    for key, fused in report.get("fused", {}).items():
        impls = fused.get("impls", {})
        cfg = meta["fused"][key]
        lines += ["", f"## Fused path: {key} (head matmuls included; time = min of {cfg['rounds']} alternating "
                  f"round(s); rlkd loss.compile={meta['fused_compile']})",
                  "", "| implementation | block / chunk rows | time s | peak GiB | time / Liger | peak / Liger | "
                  "first call s | ≈ compile s | value |", "|---|---|---|---|---|---|---|---|---|"]
        for name, e in impls.items():
            label = "KL" if " KL" in name else ("JSD" if "JSD" in name else None)
            liger = impls.get(f"Liger {label}") if label else None
            lines.append(f"| {name} | {e.get('block_rows', '—')} / {e.get('chunk_rows', '—')} | {e['time_s']:.2f} | "
                         f"{e['peak_mib'] / 1024:.2f} | {_f(e['time_s'] / liger['time_s'] if liger else None)} | "
                         f"{_f(e['peak_mib'] / liger['peak_mib'] if liger else None)} | {e['first_call_s']:.1f} | "
                         f"{e['compile_s']:.1f} | {e['value']:.6g} |")
        if "error" in fused:
            lines.append(f"| failed: {fused['error']} | | | | | | | | |")
        floor = weight_grad_floor(fused)
        if floor:
            lines += ["", f"The fp32 gradient of the student's head weight, which every implementation holds, is "
                      f"{floor[0] / GIB:.2f} GiB: {floor[1]:.2f}× Liger's KL peak here, a floor under the peak ratio."]
    lines += ["", "Notes:", "",
              "- rlkd at Liger's chunk: `loss.fused_block_mib` = Liger's chunk_size rows of fp32 logits, so a block "
              "of logits takes the memory of one Liger chunk; the default budget is rlkd's (CPU: 2^24 logits).",
              "- First call: rlkd's on --warm-tokens rows (its chunks have one shape whatever the rows: the last "
              "one is padded), Liger's on all N (its compiled chunk function also sees the whole target vector and "
              "compiles again for another N). ≈ compile s = first call − steady time for as many rows, from an "
              "empty inductor cache (one per worker); rlkd compiles once per objective and shape, shared by both "
              "budgets, so its second row shows ~0.",
              "- Memory: glibc's default malloc, its heap trimmed (malloc_trim) before each step so that the peak "
              "RSS growth counts everything the step allocates (benchmarks/perf_common.py); buffers over 32 MiB "
              "are mapped afresh each step, smaller ones reused within it, for every implementation alike. "
              "(rlkd's trainer keeps freed host memory on the CPU, rlkd/engine/host_memory.py; not applied here.)",
              "- Value: the implementation's loss in rlkd's convention (see the alignments), from the last timed "
              "round; rlkd's and a peer's agree to fp32 rounding when they compute the same quantity."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["logits", "fused", "parity"], help=argparse.SUPPRESS)
    parser.add_argument("--rlkd-compile", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test, ~2-4 min on 2 cores)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=8, help="logits path: the N tokens as this many sequences")
    parser.add_argument("--objectives", nargs="*", default=["kl", "jsd"], choices=["kl", "jsd"])
    parser.add_argument("--logits-rounds", type=int, default=3)
    parser.add_argument("--fused-vocab", type=int, default=128256)
    parser.add_argument("--fused-hidden", type=int, nargs="*", default=[576, 2048])
    parser.add_argument("--fused-rounds", type=int, nargs="*", default=[1, 1],
                        help="rounds per --fused-hidden entry (H=2048 steps take ~4x H=576's)")
    parser.add_argument("--floor-hidden", type=int, nargs="*", default=[576],
                        help="hidden sizes whose fused table includes the F.cross_entropy floor (it costs a step)")
    parser.add_argument("--contrast-hidden", type=int, nargs="*", default=[576, 2048],
                        help="hidden sizes whose fused table adds rlkd at Liger's chunk with the other loss.compile "
                        "setting (does compiling pay on this device?)")
    parser.add_argument("--warm-tokens", type=int, default=128,
                        help="rows of rlkd's first (compiling) fused call: one default block, the chunk shape of "
                        "every budget (Liger's first call takes all N rows, see the notes)")
    parser.add_argument("--liger-chunk", type=int, default=LIGER_CHUNK)
    parser.add_argument("--logits-compile", default="auto", choices=["auto", "true", "false"],
                        help="rlkd's loss.compile on the logits path (auto: eager on the CPU)")
    parser.add_argument("--fused-compile", default="auto", choices=["auto", "true", "false"],
                        help="rlkd's loss.compile on the fused path (auto, rlkd's default: eager on the CPU, compiled on "
                        "CUDA; the other setting is timed beside it, --contrast-hidden)")
    parser.add_argument("--skip-step", action="store_true", help="do not run benchmarks/step_perf.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    parser.add_argument("--name", default=None, help="report name (default peers, or peers_quick)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        logits_shape = {"tokens": 256, "vocab": 4096, "rounds": 2}
        args.liger_chunk, args.warm_tokens = 64, 32
        args.floor_hidden = args.contrast_hidden = [64]
        fused_shapes = {"H=64": {"tokens": 256, "vocab": 8192, "hidden": 64, "rounds": 1}}
    else:
        logits_shape = {"tokens": args.tokens, "vocab": args.vocab, "rounds": args.logits_rounds}
        rounds = (args.fused_rounds + args.fused_rounds[-1:] * len(args.fused_hidden))[: len(args.fused_hidden)]
        fused_shapes = {f"N={args.tokens}, V={args.fused_vocab}, H={h}":
                        {"tokens": args.tokens, "vocab": args.fused_vocab, "hidden": h, "rounds": r}
                        for h, r in zip(args.fused_hidden, rounds)}
    from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

    _, skipped = load_peers()
    for name, why in skipped.items():
        print(f"peer {name} skipped: {why}", flush=True)
    meta = {**benchmark_meta("benchmarks/peer_perf.py", argv), "load_before": load_average(), "threads": args.threads,
            "device": args.device, "versions": peer_versions(), "skipped": skipped, "logits": logits_shape,
            "fused": fused_shapes, "logits_compile": args.logits_compile, "fused_compile": args.fused_compile,
            "liger_chunk": args.liger_chunk, "targets": TARGETS, "quick": args.quick}
    report = {"meta": meta, "parity": spawn(args, "parity", rounds=1)}
    print(json.dumps({"parity": report["parity"]}), flush=True)
    report["logits"] = spawn(args, "logits", **logits_shape)
    print(json.dumps({"logits": report["logits"]}), flush=True)
    report["fused"] = {}
    for key, shape in fused_shapes.items():
        report["fused"][key] = spawn(args, "fused", **shape)
        print(json.dumps({key: report["fused"][key]}), flush=True)
    report["step"] = {"error": "not run (--skip-step)"} if args.skip_step else run_step_perf(args)
    meta["load_after"] = load_average()
    report["targets"] = targets(report)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("peers_quick" if args.quick else "peers")
    atomic_write_json(args.out / f"{name}.json", report)
    atomic_write_text(args.out / f"{name}.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
