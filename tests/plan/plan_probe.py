"""Measures what `rlkd plan` predicts, in a fresh process: the growth of the resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs) over the inputs. Prints one JSON line.

    python tests/plan/plan_probe.py loss --tokens 1024 --vocab 8000 --hidden 256 [--fused] [--rank]
    python tests/plan/plan_probe.py activations --hidden 256 --layers 4 --batch 4 --seq 256 [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure(step) -> int:
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - base) * 1024


def loss(args) -> int:
    from rlkd.objectives import DistillLoss, RankingConfig
    from rlkd.objectives.fused import HeadInput, fused_distill_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_(True)
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).requires_grad_(True)
    th = torch.randn(args.tokens, args.teacher_hidden, generator=g)
    tw = torch.randn(args.vocab, args.teacher_hidden, generator=g) / args.teacher_hidden**0.5
    loss_fn = DistillLoss(objective="kl", ranking=RankingConfig(k=5, enabled=args.rank))
    w.grad = torch.zeros_like(w)  # the head's gradient buffer exists in training before the step (ZeRO-3: partitioned)
    w.grad = None

    def step():
        if args.fused:
            out = fused_distill_loss(loss_fn, HeadInput(h, w), HeadInput(th, tw))
        else:
            with torch.no_grad():
                t_logits = th @ tw.t()
            out = loss_fn(h @ w.t(), t_logits)
        out.loss_sum.backward()

    return _measure(step)


def activations(args) -> int:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = LlamaModel(config)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    for p in model.parameters():  # parameter gradients are model states, not activations: allocate them first
        p.grad = torch.zeros_like(p)

    def step():
        out = model(input_ids=ids, use_cache=False).last_hidden_state
        out.sum().backward()

    return _measure(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["loss", "activations"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--rank", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    peak = loss(args) if args.what == "loss" else activations(args)
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    main()
