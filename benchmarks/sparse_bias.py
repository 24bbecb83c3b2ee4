"""How far the sparse (top-K + tail bucket) teacher loss is from the exact one, on real teacher logits.

For each objective, without and with the ranking term (k=5), and K in {8, 32, 128}:

* the loss difference, sparse - exact (mean per token, and relative to the exact mean);
* the cosine between the sparse and the exact gradient with respect to the student's logits (over
  all positions at once, and the 5th percentile of the per-position cosines);

and, for the base objective alone, what the tail bucket buys over two ways of dropping it:

* ``renormalised``: D on the teacher's and the student's top-K distributions each renormalised to 1
  (no tail bucket). ``lost``: the share of positions where it is numerically 0 (< 1e-6, so its
  gradient is ~0) although the exact loss is not (> 1e-3); and its gradient's cosine with the exact.
* ``tail dropped``: the per-id terms of the divergence summed over the K ids with the true
  probabilities (teacher as cached, student over the full vocabulary), the tail term left out.
  ``clamped``: the share of positions where that sum is negative, i.e. where the usual
  ``max(0, .)`` guard would zero the loss and its gradient. Written out per objective below (AKL,
  a weighted mix, has no per-id form: n/a).

Real run (about five minutes on one thread): teacher SmolLM2-135M-Instruct
(``bash ../shared/tools/prepare_smollm2.sh /tmp/smollm2``), three students: the same model pruned
(rlkd.factory.prune_layers, no healing) to 28, 24 and 15 of its 30 layers, from near the teacher
to far from it, since the bias depends on how much of the student's mass lies outside the
teacher's top-K; 4 Dolly dev rows of up to 96 tokens (``../shared/data/dolly/minillm_dev.jsonl``).
Everything is deterministic on CPU, so the result files may be committed.

    python benchmarks/sparse_bias.py                  # -> results/sparse_teacher/bias.{md,json}
    python benchmarks/sparse_bias.py --quick --out D  # tiny random models, seconds (the test)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlkd.objectives import DistillLoss, get_objective  # noqa: E402
from rlkd.objectives.sparse_teacher import SparseTeacher  # noqa: E402
from rlkd.teacher_topk_cache import select_top_k  # noqa: E402

OBJECTIVES = ["kl", "rkl", "jsd", "tvd", "akl", "skew_kl", "skew_rkl"]
TOP_KS = (8, 32, 128)
RANK_K = 5
ZERO, NONZERO = 1e-6, 1e-3  # "numerically zero" and "clearly not zero" per-token losses


def tail_dropped(name: str, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor | None:
    """Sum over the K cached ids of the divergence's per-id terms, true probabilities, no tail term."""
    p, q = log_p.exp(), log_q.exp()
    if name == "kl":
        return (p * (log_p - log_q)).sum(-1)
    if name == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        beta = 0.5
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return (beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)).sum(-1)
    if name in ("skew_kl", "skew_rkl"):
        alpha = 0.1
        a, b = (log_p, log_q) if name == "skew_kl" else (log_q, log_p)
        log_m = torch.logaddexp(a + math.log(alpha), b + math.log1p(-alpha))
        return (a.exp() * (a - log_m)).sum(-1)
    return None


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def _per_row_cosine_p5(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return float(cos.quantile(0.05))


def _loss_and_grad(loss_fn, student, teacher):
    leaf = student.detach().clone().requires_grad_(True)
    out = loss_fn(leaf, teacher)
    out.loss_sum.backward()
    return out.per_token.detach(), leaf.grad


def measure(student: torch.Tensor, teacher: torch.Tensor, top_ks=TOP_KS) -> dict:
    """Every figure of the report for ``[N, V]`` student and teacher logits at temperature 1."""
    vocab = teacher.shape[-1]
    sparse = {}
    for k in top_ks:
        ids, log_probs, tail = select_top_k(teacher, k, 1.0)
        sparse[k] = SparseTeacher(ids, log_probs, tail, 1.0, vocab)
    rows, truncation = [], []
    for name in OBJECTIVES:
        for ranked in (False, True):
            loss_fn = DistillLoss(objective=name, ranking={"enabled": ranked, "k": RANK_K})
            exact, exact_grad = _loss_and_grad(loss_fn, student, teacher)
            for k in top_ks:
                got, grad = _loss_and_grad(loss_fn, student, sparse[k])
                rows.append({"objective": name, "ranking": ranked, "k": k, "exact": float(exact.mean()),
                             "sparse": float(got.mean()), "diff": float((got - exact).mean()),
                             "relative_diff": float((got - exact).mean() / exact.mean()),
                             "grad_cosine": _cosine(grad, exact_grad),
                             "grad_cosine_p5": _per_row_cosine_p5(grad, exact_grad)})
            if ranked:
                continue
            fn = get_objective(name).fn
            for k in top_ks:
                t = sparse[k]
                leaf = student.detach().clone().requires_grad_(True)
                renormalised = fn(leaf.gather(-1, t.ids), t.log_probs)  # both log-softmaxed over the K ids
                renormalised.sum().backward()
                with torch.no_grad():
                    dropped = tail_dropped(name, t.log_probs.double(),
                                           torch.log_softmax(student.double(), -1).gather(-1, t.ids))
                truncation.append({
                    "objective": name, "k": k,
                    "lost": float(((renormalised.detach() < ZERO) & (exact > NONZERO)).float().mean()),
                    "renormalised_grad_cosine": _cosine(leaf.grad, exact_grad),
                    "clamped": None if dropped is None else float((dropped < 0).float().mean())})
    return {"positions": student.shape[0], "vocab": vocab, "rows": rows, "truncation": truncation}


def render(students: list[dict], source: str) -> str:
    lines = ["# Sparse teacher: bias of the top-K + tail-bucket loss against the exact one", "",
             f"{source}; temperature 1, ranking k={RANK_K}. Made by `python benchmarks/sparse_bias.py` (its "
             "docstring defines every column)."]
    for student in students:
        lines += ["", f"## Student: {student['student']}", "", *render_student(student)]
    return "\n".join(lines) + "\n"


def render_student(result: dict) -> list[str]:
    lines = [f"{result['positions']} positions, vocabulary {result['vocab']}.", "", "### Sparse vs exact", "",
             "| objective | K | exact | sparse − exact | relative | grad cosine | per-position cosine, 5th pct |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        label = r["objective"] + ("+R" if r["ranking"] else "")
        lines.append(f"| {label} | {r['k']} | {r['exact']:.4f} | {r['diff']:+.2e} | {r['relative_diff']:+.2%} | "
                     f"{r['grad_cosine']:.5f} | {r['grad_cosine_p5']:.4f} |")
    lines += ["", "### Without the tail bucket", "",
              f"`lost`: top-K renormalised loss < {ZERO:g} where the exact one is > {NONZERO:g} (share of positions); "
              "`clamped`: the tail-dropped sum is negative (share of positions).", "",
              "| objective | K | lost | renormalised grad cosine | clamped |", "|---|---:|---:|---:|---:|"]
    for r in result["truncation"]:
        clamped = "n/a" if r["clamped"] is None else f"{r['clamped']:.1%}"
        lines.append(f"| {r['objective']} | {r['k']} | {r['lost']:.1%} | {r['renormalised_grad_cosine']:.4f} | {clamped} |")
    return lines


def real_logits(teacher_dir: Path, data: Path, rows: int, length: int, keep_layers: list[int]):
    """``(teacher logits, {students' label: logits})``, all ``[N, V]`` over the same positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd.factory import prune_layers

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    texts = []
    for line in data.read_text(encoding="utf-8").splitlines()[:rows]:
        row = json.loads(line)
        texts.append(f"{row['instruction']}\n{row.get('input') or ''}\n{row['output']}")
    ids = [tokenizer(t)["input_ids"][:length] for t in texts]

    def logits_of(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([x])).logits[0] for x in ids])

    students = {}
    with tempfile.TemporaryDirectory() as tmp:
        for keep in keep_layers:
            label = f"SmolLM2-135M-Instruct pruned to {keep} of 30 layers"
            students[label] = logits_of(prune_layers(teacher_dir, Path(tmp) / f"student{keep}", keep))
    return logits_of(teacher_dir), students


def tiny_logits():
    from rlkd.factory import tiny_llama_model

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 24), generator=g)
    out = []
    for seed, layers in ((2, 1), (1, 2)):
        model = tiny_llama_model(vocab_size=512, hidden=32, layers=layers, heads=2, seed=seed, max_positions=64,
                                 pad_token_id=None).eval()
        with torch.no_grad():
            out.append(model(input_ids=tokens).logits.reshape(-1, 512) * 4.0)  # a random model's logits are flat
    return out[1], {"tiny random LLaMA, 1 layer": out[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models (seconds), for the test")
    parser.add_argument("--teacher", type=Path, default=Path("/tmp/smollm2"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dolly/minillm_dev.jsonl")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--keep-layers", type=int, nargs="+", default=[28, 24, 15],
                        help="students: the teacher pruned to these many layers")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sparse_teacher")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        teacher, students = tiny_logits()
        source = "Tiny random models (--quick: 1 vs 2 layers, vocabulary 512, logits x4), 2 random rows of 24 tokens"
    else:
        if not (args.teacher / "config.json").is_file():
            print(f"sparse_bias: no teacher at {args.teacher}; run bash ../shared/tools/prepare_smollm2.sh "
                  f"{args.teacher}", file=sys.stderr)
            return 2
        teacher, students = real_logits(args.teacher, args.data, args.rows, args.length, args.keep_layers)
        source = (f"Teacher SmolLM2-135M-Instruct (the 4-bit GGUF release dequantised by "
                  f"../shared/tools/prepare_smollm2.sh); {args.rows} rows of {args.data.name}, up to {args.length} "
                  f"tokens each")
    results = [{"student": label, **measure(logits, teacher)} for label, logits in students.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    from rlkd.provenance import benchmark_meta

    # The figures are deterministic on CPU; the meta (machine, code version) says where they came from.
    meta = benchmark_meta("benchmarks/sparse_bias.py", argv)
    (args.out / "bias.json").write_text(json.dumps({"source": source, "students": results, "meta": meta}, indent=1)
                                        + "\n")
    (args.out / "bias.md").write_text(render(results, source))
    print(render(results, source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
