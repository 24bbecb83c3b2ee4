"""Per-step time split of a ZeRO-3 distillation step, KL vs KL+R (RLKD ranking term).

    python benchmarks/step_perf.py                 # CPU tiny config -> results/perf/step.{json,md}
    python benchmarks/step_perf.py --gpu           # TinyLlama-1.1B-shaped student, Llama-2-7B-shaped
                                                   # teacher, random init, bf16, seq 2048 (needs a GPU)

One process, one engine pair. KL and KL+R steps are interleaved on the same engines, alternating
which goes first, so drift from other load on the machine hits both alike; medians over the timed
steps are reported.
Phases of a KD step: teacher forward, student forward, loss forward, loss backward (to the
logits), student backward, optimizer step. "Parts" are measured separately with no KD loss: teacher forward, student
forward+backward of a zero-cost scalar, optimizer step; the target is KD step <= 1.05 x their sum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu" if "--gpu" not in sys.argv else os.environ.get("DS_ACCELERATOR", "cuda"))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "cpu": {"teacher": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=688),
            "student": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=344)},
    # Llama-2-7B and TinyLlama-1.1B shapes
    "gpu": {"teacher": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                            intermediate_size=11008),
            "student": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                            intermediate_size=5632)},
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def start(self) -> None:
        _sync()
        self.marks = [("start", time.perf_counter())]

    def mark(self, name: str) -> None:
        _sync()
        self.marks.append((name, time.perf_counter()))

    def phases(self) -> dict[str, float]:
        out = {name: t - self.marks[i][1] for i, (name, t) in enumerate(self.marks[1:])}
        out["total"] = self.marks[-1][1] - self.marks[0][1]
        return out


def make_configs(root: Path, kind: str, vocab: int) -> dict[str, Path]:
    """Model folders holding a config.json only: the session builds the random models from them
    (``build_on_device``), so no weights are written or read."""
    from transformers import LlamaConfig

    paths = {}
    for name, shape in SHAPES[kind].items():
        paths[name] = root / name
        LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                    tie_word_embeddings=False, **shape).save_pretrained(paths[name])
    return paths


def build_on_device() -> None:
    """rlkd's sessions load models with ``load_causal_lm(path, dtype)``; here they are built from
    the folder's config instead, with random weights. Under the session's ZeRO-3 config transformers
    builds them inside ``deepspeed.zero.Init``: partitioned, on the accelerator, no host copy
    (a 7B model takes seconds instead of minutes on the CPU and a 13 GB save)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import rlkd.engine.session as session_module

    def random_model(path, dtype, *, gradient_checkpointing=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    session_module.load_causal_lm = random_model


def make_models(root: Path, kind: str, vocab: int, dtype: torch.dtype) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {}
    for seed, (name, shape) in enumerate(SHAPES[kind].items()):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False, **shape)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: a 7B fp32 copy would need 28 GB
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        del model
    return paths


def make_data(path: Path, rows: int, length: int, vocab: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    with path.open("w") as handle:
        for _ in range(rows):
            ids = [1] + torch.randint(3, vocab, (length - 2,), generator=generator).tolist() + [2]
            handle.write(json.dumps({"input_ids": ids, "loss_mask": [int(i >= length // 4) for i in range(length)]}) + "\n")
    return path


def kd_step(session, batch, scale: float, clock: Clock) -> dict[str, float]:
    engine = session.student
    clock.start()
    teacher_logits = session.teacher_logits(batch)
    clock.mark("teacher_fwd")
    student_logits = session.student_logits(batch)
    clock.mark("student_fwd")
    # The loss runs on a detached copy so its backward can be timed apart from the student's;
    # backpropagating sum(logits * dL/dlogits) then gives the student the same gradients.
    detached = student_logits.detach().requires_grad_(True)
    out = session.loss_fn(detached, teacher_logits, batch.supervised, labels=batch.labels)
    clock.mark("loss_fwd")
    (grad_logits,) = torch.autograd.grad(out.loss_sum * scale, detached)
    clock.mark("loss_bwd")
    engine.backward((student_logits * grad_logits).sum())
    clock.mark("student_bwd")
    engine.step()
    clock.mark("optimizer")
    return clock.phases()


def parts_step(session, batch, clock: Clock) -> dict[str, float]:
    """The same work minus the KD loss: teacher forward, student forward + backward, optimizer."""
    engine = session.student
    clock.start()
    session.teacher_logits(batch)
    clock.mark("teacher_fwd")
    logits = session.student_logits(batch)
    engine.backward(logits.sum() * 0.0)
    clock.mark("student_fwd_bwd")
    engine.step()
    clock.mark("optimizer")
    return clock.phases()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", help="CPU: reuse/keep the random models here (with --gpu the models are "
                        "built on the GPU from their configs and nothing is saved)")
    parser.add_argument("--out", default=str(REPO / "results" / "perf"))
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs CUDA", file=sys.stderr)
        return 2
    kind = "gpu" if args.gpu else "cpu"
    seq_len = args.seq_len or (2048 if args.gpu else 256)
    micro = args.micro_batch or (1 if args.gpu else 2)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.set_num_threads(args.threads)

    from rlkd.config import load_config
    from rlkd.engine.session import build_session
    from rlkd.objectives import DistillLoss, LossConfig, RankingConfig
    from rlkd.provenance import atomic_write_json, atomic_write_text, benchmark_meta, load_average

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.model_dir) if args.model_dir and not args.gpu else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.gpu:
            models = make_configs(root, kind, args.vocab)
            build_on_device()
        elif all((root / n / "model.safetensors").exists() for n in ("teacher", "student")):
            models = {n: root / n for n in ("teacher", "student")}
        else:
            models = make_models(root, kind, args.vocab, dtype)
        data = make_data(Path(tmp) / "tokens.jsonl", 64, seq_len, args.vocab)
        cfg = load_config(base={
            "output_dir": str(Path(tmp) / "run"), "seed": 0,
            "models": {"teacher": str(models["teacher"]), "student": str(models["student"]),
                       "dtype": "bfloat16" if args.gpu else "float32"},
            "data": {"task": "tokenized", "path": str(data), "max_length": seq_len},
            "train": {"micro_batch_size": micro, "max_steps": 10_000, "lr": 1e-5}, "progress_bar": False})
        session = build_session(cfg)
        losses = {"KL": DistillLoss(LossConfig(objective="kl")),
                  "KL+R": DistillLoss(LossConfig(objective="kl", ranking=RankingConfig(enabled=True, k=args.k)))}
        clock = Clock()
        batch = next(session.batches).to(session.device)
        scale = 1.0 / float(batch.supervised.sum())
        samples: dict[str, list[dict[str, float]]] = {"KL": [], "KL+R": [], "parts": []}
        try:
            for i in range(args.warmup + args.steps):
                # alternate which variant goes first: a step's cost depends on what ran before it
                for name in (("KL", "KL+R") if i % 2 == 0 else ("KL+R", "KL")):
                    session.loss_fn = losses[name]
                    phases = kd_step(session, batch, scale, clock)
                    if i >= args.warmup:
                        samples[name].append(phases)
                phases = parts_step(session, batch, clock)
                if i >= args.warmup:
                    samples["parts"].append(phases)
        finally:
            session.close()

    medians = {name: {key: statistics.median(s[key] for s in rows) for key in rows[0]} for name, rows in samples.items()}
    parts_sum = medians["parts"]["teacher_fwd"] + medians["parts"]["student_fwd_bwd"] + medians["parts"]["optimizer"]
    loss_share = (medians["KL"]["loss_fwd"] + medians["KL"]["loss_bwd"]) / medians["KL"]["total"]
    report = {
        "device": torch.cuda.get_device_name(0) if args.gpu else f"CPU ({platform.processor() or platform.machine()}), "
                                                                   f"{args.threads} threads",
        "kind": kind, "dtype": str(dtype).replace("torch.", ""), "seq_len": seq_len, "micro_batch": micro,
        "vocab": args.vocab, "k": args.k, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "shapes": SHAPES[kind], "median_seconds": medians,
        "ratios": {"klr_over_kl": medians["KL+R"]["total"] / medians["KL"]["total"],
                   "kl_step_over_parts": medians["KL"]["total"] / parts_sum,
                   "klr_step_over_parts": medians["KL+R"]["total"] / parts_sum},
        "targets": {"klr_over_kl": 1.03, "step_over_parts": 1.05},
        **benchmark_meta("benchmarks/step_perf.py", argv),
        "note": f"load average (1, 5, 15 min) when it finished: {load_average()} on {os.cpu_count()} cores "
                f"(this run's own threads included); at a {args.vocab}-token vocabulary the loss (forward + "
                f"backward) takes {loss_share:.0%} of a KL step, time that the sum of parts (teacher forward, "
                "student forward + backward, optimizer) leaves out" if not args.gpu else "",
    }
    out_dir = Path(args.out)
    suffix = "" if kind == "cpu" else "_gpu"
    atomic_write_json(out_dir / f"step{suffix}.json", report)
    atomic_write_text(out_dir / f"step{suffix}.md", markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    m, r = report["median_seconds"], report["ratios"]
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    lines = [f"# Distillation step time split ({report['kind'].upper()})", "",
             f"Device: {report['device']}; {report['dtype']}; micro-batch {report['micro_batch']} x "
             f"seq {report['seq_len']}; vocab {report['vocab']}; ranking k={report['k']}; medians of "
             f"{report['timed_steps']} interleaved steps after {report['warmup_steps']} warm-up. "
             f"Command: `{report['command']}`; code: {report['git']['sha']} "
             f"(uncommitted changes: {report['git']['dirty']}).", "",
             "| step | teacher fwd | student fwd | loss fwd | loss bwd | student bwd | optimizer | total |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("KL", "KL+R"):
        p = m[name]
        lines.append(f"| {name} | {ms(p['teacher_fwd'])} | {ms(p['student_fwd'])} | {ms(p['loss_fwd'])} | "
                     f"{ms(p['loss_bwd'])} | {ms(p['student_bwd'])} | {ms(p['optimizer'])} | {ms(p['total'])} |")
    lines += ["", "(milliseconds, medians)"]
    p = m["parts"]
    lines += ["", "Parts measured without a KD loss: teacher fwd "
              f"{ms(p['teacher_fwd'])} ms, student fwd+bwd {ms(p['student_fwd_bwd'])} ms, optimizer "
              f"{ms(p['optimizer'])} ms.", "",
              "| ratio | measured | target |", "|---|---|---|",
              f"| KL+R step / KL step | {r['klr_over_kl']:.3f} | <= {report['targets']['klr_over_kl']} |",
              f"| KL step / sum of parts | {r['kl_step_over_parts']:.3f} | <= {report['targets']['step_over_parts']} |",
              f"| KL+R step / sum of parts | {r['klr_step_over_parts']:.3f} | <= {report['targets']['step_over_parts']} |",
              ""]
    if report.get("note"):
        lines += [f"Note: {report['note']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
