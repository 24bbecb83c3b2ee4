"""rlkd's losses, ranking term included, inside ``transformers.Trainer`` (and TRL's trainers).

Two entry points:

* :class:`DistillationLoss`, a plain callable ``(student, teacher, inputs, num_items_in_batch)``
  that runs both models on a Hugging Face batch (``input_ids``, ``attention_mask``, ``labels`` with
  -100 where nothing is supervised) and returns the normalised loss, the student's outputs and the
  loss terms; usable from any PyTorch loop.
* :class:`DistillationTrainerMixin`, placed before ``Trainer`` (or TRL's ``GKDTrainer``) in the bases,
  which replaces ``compute_loss`` with it and adds the loss terms to the Trainer's logs.

Label convention: Hugging Face causal-LM labels are the input ids themselves, shifted inside the
model, so logit t is supervised where ``labels[t + 1] != -100`` and its target is ``labels[t + 1]``
-- exactly rlkd's "logit t predicts token t+1" mask. The count of those positions is the
Trainer's ``num_items_in_batch`` (it counts ``labels[..., 1:]``), so dividing the summed loss by it
gives the same per-token normalisation over the whole accumulated batch as ``rlkd train``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from rlkd.data.encode import IGNORE_INDEX
from rlkd.objectives import DistillLoss, LossConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# DistillLoss's metrics are sums over positions (logged per token), except these: "loss" is the
# Trainer's own, and rank_fallback counts micro-batches (logged as a count).
_NOT_LOGGED = frozenset({"loss"})
_COUNTS = frozenset({"rank_fallback"})


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets) per logit position from Hugging Face causal-LM ``labels`` [B, L]."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


@dataclass
class DistillationStep:
    loss: torch.Tensor                       # the normalised loss, ready for backward
    outputs: Any                             # the student's model outputs
    n_tokens: int                            # supervised positions in this batch
    metrics: dict[str, float] = field(default_factory=dict)  # DistillLoss's sums over positions


class DistillationLoss:
    """``DistillLoss`` on a Hugging Face batch: runs the teacher (no grad) and the student.

    ``loss`` is a :class:`~rlkd.objectives.DistillLoss`, a :class:`~rlkd.objectives.LossConfig`
    or its dict form (the ``loss:`` block of an rlkd run config). ``shared_vocab=True`` compares
    logits on the leading ``min(V_student, V_teacher)`` ids, for vocabularies that differ only by
    padding rows; otherwise different widths are an error.
    """

    def __init__(self, loss: DistillLoss | LossConfig | dict | None = None, *, shared_vocab: bool = False):
        self.loss_fn = loss if isinstance(loss, DistillLoss) else DistillLoss(loss)
        self.shared_vocab = shared_vocab

    def __call__(self, student, teacher, inputs: dict[str, torch.Tensor],
                 num_items_in_batch: int | torch.Tensor | None = None) -> DistillationStep:
        if "labels" not in inputs:
            raise ValueError("DistillationLoss needs `labels` in the batch (-100 where nothing is supervised)")
        labels = inputs["labels"]
        # Only what a causal LM's forward takes: TRL's batches also carry prompts for generation.
        model_inputs = {key: inputs[key] for key in MODEL_INPUTS if key in inputs}
        mask, targets = next_token_targets(labels)
        teacher_logits = None
        if self.loss_fn.needs_teacher:
            if teacher is None:
                raise ValueError(f"loss {self.loss_fn.config.label()!r} needs a teacher model, got None")
            with torch.no_grad():
                teacher_logits = teacher(**model_inputs, use_cache=False).logits
        outputs = student(**model_inputs, use_cache=False)
        student_logits = outputs.logits
        if self.shared_vocab and teacher_logits is not None:
            width = min(student_logits.shape[-1], teacher_logits.shape[-1])
            student_logits, teacher_logits = student_logits[..., :width], teacher_logits[..., :width]
        out = self.loss_fn(student_logits, teacher_logits, mask, labels=targets)
        denominator = num_items_in_batch if num_items_in_batch is not None else max(out.n_tokens, 1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(out.loss_sum.device, out.loss_sum.dtype)
        return DistillationStep(out.loss_sum / denominator, outputs, out.n_tokens, out.metrics)


class DistillationTrainerMixin:
    """Train a ``transformers.Trainer`` (or TRL trainer) with rlkd's losses::

        class DistillTrainer(DistillationTrainerMixin, Trainer):
            pass

        trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                 data_collator=collator,
                                 rlkd_loss={"objective": "kl", "ranking": {"enabled": True, "k": 5}})

    With TRL's ``GKDTrainer`` (``trl.experimental.gkd``) as the second base, GKD's on-policy
    sampling (``lmbda``) still decides which sequences a batch holds; the mixin only replaces the
    loss, and the teacher GKD prepared is used. Otherwise the teacher is a plain module, put in
    eval mode on the Trainer's device (under ZeRO-3 prepare it yourself, as TRL does, and assign
    ``trainer.teacher_model``).
    """

    def __init__(self, *args, teacher_model=None, rlkd_loss: DistillLoss | LossConfig | dict | None = None,
                 rlkd_shared_vocab: bool = False, **kwargs):
        self._rlkd = DistillationLoss(rlkd_loss, shared_vocab=rlkd_shared_vocab)
        # TRL's GKDTrainer takes (and prepares) the teacher itself; transformers.Trainer does not.
        parent_takes_teacher = "teacher_model" in inspect.signature(super().__init__).parameters
        if parent_takes_teacher:
            kwargs["teacher_model"] = teacher_model
        super().__init__(*args, **kwargs)
        if not parent_takes_teacher:
            if teacher_model is not None:
                teacher_model.requires_grad_(False)
                teacher_model = teacher_model.to(self.args.device).eval()
            self.teacher_model = teacher_model
        self._rlkd_sums: dict[str, float] = {}
        self._rlkd_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self._rlkd(model, self.teacher_model, inputs, num_items_in_batch)
        # Normalised by the accumulated batch's token count the loss needs no further division by
        # the accumulation steps; normalised by this batch's own count it does.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        loss = step.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch then counts every process's tokens, while gradients are averaged
            # over processes: multiply back, as Trainer.compute_loss does for its own losses.
            loss = loss * self.accelerator.num_processes
        if model.training:
            for name, value in step.metrics.items():
                if name not in _NOT_LOGGED:
                    self._rlkd_sums[name] = self._rlkd_sums.get(name, 0.0) + value
            self._rlkd_tokens += step.n_tokens
        return (loss, step.outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds each loss term's per-token mean since the last log (this process's tokens)."""
        if self._rlkd_tokens and "loss" in logs:
            for name, total in self._rlkd_sums.items():
                logs[f"rlkd/{name}"] = total if name in _COUNTS else total / self._rlkd_tokens
            self._rlkd_sums, self._rlkd_tokens = {}, 0
        super().log(logs, *args, **kwargs)
