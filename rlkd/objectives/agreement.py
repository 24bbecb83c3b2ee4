"""Top-k agreement of two models' next-token distributions, position by position (the paper's CR@k, OR@k).

* ``CR@k``: 1 if the student's ordered top-k index list equals the teacher's, else 0.
* ``OR@k``: |student top-k  intersect  teacher top-k| / k (order ignored).

The measure the ranking objectives train for, on logits alone: the training loop reports it live
(:mod:`rlkd.engine.agreement`) and the evaluator aggregates it over slices (:mod:`rlkd.eval.alignment`),
so it lives below both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CR_KS = (1, 2, 3, 4, 5)
OR_KS = (3, 5, 10, 20)


def position_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       cr_ks: Sequence[int] = CR_KS, or_ks: Sequence[int] = OR_KS,
                       chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Per-position CR@k indicators and OR@k fractions for logits of shape ``[N, V]``.

    Works on ``chunk_size`` rows at a time so only a chunk of the vocabulary-wide top-k lives in
    memory. Returns float tensors of shape ``[N]`` keyed ``cr@k`` and ``or@k``.
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(f"expected [N, V] logits, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} positions, teacher "
                         f"{teacher_logits.shape[0]}")
    vocab = min(student_logits.shape[1], teacher_logits.shape[1])
    k_max = max([*cr_ks, *or_ks])
    if k_max > vocab:
        raise ValueError(f"k={k_max} exceeds the shared vocabulary size {vocab}")
    n = student_logits.shape[0]
    out = {f"cr@{k}": torch.empty(n) for k in cr_ks} | {f"or@{k}": torch.empty(n) for k in or_ks}
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        s_top = student_logits[start:stop, :vocab].float().topk(k_max, dim=-1).indices
        t_top = teacher_logits[start:stop, :vocab].float().topk(k_max, dim=-1).indices
        for k in cr_ks:
            out[f"cr@{k}"][start:stop] = (s_top[:, :k] == t_top[:, :k]).all(dim=-1).float().cpu()
        for k in or_ks:
            # [n, k, 1] == [n, 1, k]: student entry i appears anywhere in the teacher's top-k
            hits = (s_top[:, :k, None] == t_top[:, None, :k]).any(dim=-1).sum(dim=-1)
            out[f"or@{k}"][start:stop] = (hits.float() / k).cpu()
    return out
