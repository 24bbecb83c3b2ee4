"""The training step's loss on the fused path (`loss.fused_lm_head: true`): final hidden states and
output-head weights of both models instead of their logits.

Both models run through their DeepSpeed engines as usual (so ZeRO-3's gather/release hooks and
activation checkpointing work unchanged) with ``logits_to_keep=1``: the head is applied to one
position per row only, and a forward hook on the decoder captures its full last hidden state. The
partitioned head weights are then gathered; the loss computes all of its gradients during forward,
and the student's head stays gathered through backward so that autograd can accumulate the
full-shape weight gradient, which DeepSpeed's own hook then reduce-scatters as any other
parameter's. With tied embeddings the head weight *is* the embedding matrix, so both gradients
accumulate into the same parameter.
"""

from __future__ import annotations

import torch

from rlkd.data import Batch


class FusedHeadError(ValueError):
    """The model's logits are not ``hidden @ head.T``, so the fused path would compute another loss."""


def final_hidden_states(engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, L, H], logits of the last position [B, 1, V])`` from one forward of ``engine``."""
    model = getattr(engine, "module", engine)
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        out = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1], out.logits


def output_head_weight(engine) -> torch.nn.Parameter:
    model = getattr(engine, "module", engine)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise FusedHeadError(f"loss.fused_lm_head needs a bias-free linear output head; {type(model).__name__} "
                             f"has {head!r}")
    return head.weight


def check_plain_head(role: str, hidden: torch.Tensor, weight: torch.Tensor, last_logits: torch.Tensor) -> None:
    """The model's own last-position logits must equal ``hidden @ weight.T`` there (no soft-capping,
    logit scaling or other head transform the fused loss would silently skip)."""
    mine = hidden[:, -1:] @ weight.t()
    theirs = last_logits[..., : mine.shape[-1]]
    tol = 1e-4 if hidden.dtype == torch.float32 else 2e-2
    scale = float(theirs.detach().abs().max()) + 1.0
    gap = float((mine.detach().float() - theirs.detach().float()).abs().max())
    if gap > tol * scale:
        raise FusedHeadError(f"loss.fused_lm_head: the {role}'s logits are not hidden @ lm_head.weight.T (max gap "
                             f"{gap:.3g}); the model transforms its logits, set loss.fused_lm_head=false")


def fused_loss_and_backward(session, batch: Batch, scale, *, host: Batch | None = None, grad_scale=None):
    """Forward and backward of one micro-batch on the fused path, for ``rlkd.engine.train.train_step``;
    returns its ``LossOutput``. ``host``: the batch's CPU copy (its mask and ids spare syncs);
    ``grad_scale`` as in ``DistillLoss.__call__``.

    The student's head weight stays gathered through ``engine.backward``: autograd accumulates the
    full-shape weight gradient into the parameter, which must still have its full shape then
    (a partitioned ZeRO-3 parameter is an empty tensor), before DeepSpeed's hook reduce-scatters it.
    """
    import deepspeed

    from rlkd.objectives.fused import HeadInput, fused_distill_loss

    s_hidden, s_last = final_hidden_states(session.student, batch)
    s_weight = output_head_weight(session.student)
    heads = [("student", s_hidden, s_weight, s_last)]
    teacher = None
    if session.loss_fn.needs_teacher:
        if session.teacher_cache is not None:
            teacher = session.teacher_logits(batch, host)
        else:
            with torch.no_grad():
                t_hidden, t_last = final_hidden_states(session.teacher, batch)
            t_weight = output_head_weight(session.teacher)
            heads.append(("teacher", t_hidden, t_weight, t_last))
            teacher = HeadInput(t_hidden, t_weight)
    # Collectives under ZeRO-3: every rank gathers the same head weights.
    with deepspeed.zero.GatheredParameters([s_weight]):
        with deepspeed.zero.GatheredParameters([weight for role, _, weight, _ in heads if role == "teacher"]):
            if not session.heads_checked:  # a model's head does not change between steps: once (2 syncs)
                with torch.no_grad():
                    for role, hidden, weight, last in heads:
                        check_plain_head(role, hidden, weight, last)
                session.heads_checked = True
            out = fused_distill_loss(session.loss_fn, HeadInput(s_hidden, s_weight), teacher,
                                     batch.supervised if host is None else host.supervised, labels=batch.labels,
                                     vocab_size=session.vocab.shared_size, grad_scale=grad_scale)
        session.student.backward(out.loss_sum * scale)
    return out
