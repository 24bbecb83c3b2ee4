"""A sparse teacher: its top-K token ids and log-probabilities plus one tail bucket per position.

A top-K teacher cache (rlkd.teacher_topk_cache) keeps, per position, the K most likely ids at the
KD temperature T, their log-probabilities log p_i = z_i/T - logsumexp(z/T) and the log of the
remaining mass log p_tail = logsumexp_{j not cached}(z_j/T) - logsumexp(z/T), both computed from
the full fp32 logits at build time (T is part of the cache's key: log-softmax at one temperature
cannot be turned into another's without the logits it drops).

Mass-preserving bucketing. Both distributions are coarsened to the same K + 1 outcomes: the K
cached ids of that position and one bucket "every other id":

    P = (p_1, ..., p_K, p_tail)                      the teacher, as cached
    Q = (q_1, ..., q_K, q_tail), q_tail = 1 - sum_i q_i = sum_{j not cached} q_j

q_tail is computed as logsumexp over the student's uncached logits (not as 1 - sum, which loses
every digit when the tail is small), so its gradient reaches every uncached logit. Each divergence
D of a registered objective is then D(P, Q) on those K + 1 outcomes: the objectives' functions take
logits and apply log-softmax, which is the identity on log-probabilities, so the registered function
itself computes the sparse loss from the bucketed log-probabilities. Per objective (sums over the K
cached ids i plus the tail bucket):

    kl        sum p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)
    rkl       sum q_i log(q_i / p_i) + q_tail log(q_tail / p_tail)
    jsd(b)    b KL(P || M) + (1 - b) KL(Q || M) over the buckets, M = b P + (1 - b) Q
    tvd       1/2 (sum |p_i - q_i| + |p_tail - q_tail|)
    skew_kl   KL(P || a P + (1 - a) Q) over the buckets;  skew_rkl: KL(Q || a Q + (1 - a) P)
    akl       the head/tail-gap weighted KL + RKL of the buckets; the tail bucket is one outcome of
              mass p_tail, ordered by that mass like any id when the head is chosen

With K = V there is no tail bucket and each is the exact loss. With K < V the bucketed KL, RKL, JSD,
TVD and skew KLs are f-divergences (or KLs against a mixture that buckets the same way) of a
coarsening of P and Q, so by the data-processing inequality (log-sum inequality for KL) they are <=
the exact ones. AKL is not: coarsening lowers the tail gap and so moves weight from RKL to KL, and
the bucketed value can exceed the exact one; it is only a convex combination of the bucketed KL and
RKL.

Why a tail bucket: a top-K renormalised teacher (no bucket) compares P restricted to the cache with
Q restricted to it; the student can then put any mass outside the cache at no cost, and when its
cached part matches the renormalised teacher the loss is 0 with no gradient although the
distributions differ (benchmarks/sparse_bias.py counts how often).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Log of a mass that is exactly 0 in fp32/fp64 (exp underflows) while its log stays finite, so
# 0 * (log 0 - log q) is 0, not NaN, for a teacher tail that underflowed at build time.
LOG_ZERO_MASS = -1e4


@dataclass
class SparseTeacher:
    """The teacher's top-K at positions ``[..., K]``: ``ids`` (int64), ``log_probs`` (log-softmax at the
    KD ``temperature`` over the full vocabulary, at those ids) and ``tail_log_mass`` ``[...]`` (log of the
    probability of every other id; -inf when K = V). ``vocab_size``: the V of the logits they came from."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_mass: torch.Tensor
    temperature: float
    vocab_size: int

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def covers_vocabulary(self) -> bool:
        """K = V: every id is cached, no tail bucket (the exact distribution)."""
        return self.k >= self.vocab_size

    def flat(self) -> "SparseTeacher":
        """Rows ``[N, K]`` (positions flattened), as the loss indexes them."""
        return SparseTeacher(self.ids.reshape(-1, self.k), self.log_probs.reshape(-1, self.k),
                             self.tail_log_mass.reshape(-1), self.temperature, self.vocab_size)

    def rows(self, index: torch.Tensor) -> "SparseTeacher":
        return SparseTeacher(self.ids.index_select(0, index), self.log_probs.index_select(0, index),
                             self.tail_log_mass.index_select(0, index), self.temperature, self.vocab_size)

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.ids.to(device, non_blocking=True), self.log_probs.to(device, non_blocking=True),
                             self.tail_log_mass.to(device, non_blocking=True), self.temperature, self.vocab_size)


def teacher_buckets(teacher: SparseTeacher, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K(+1)]`` log-probabilities of the teacher's buckets, renormalised to sum to 1: values
    stored in bf16/fp16 do not sum to exactly 1, and every divergence assumes a distribution."""
    log_p = teacher.log_probs.to(dtype)
    if not teacher.covers_vocabulary:
        tail = teacher.tail_log_mass.to(dtype).clamp_min(LOG_ZERO_MASS)
        log_p = torch.cat([log_p, tail.unsqueeze(-1)], dim=-1)
    return log_p - log_p.logsumexp(-1, keepdim=True)


def student_buckets(student: torch.Tensor, teacher: SparseTeacher) -> torch.Tensor:
    """``[N, K(+1)]`` log-probabilities of the student's temperature-scaled logits ``student`` [N, V]
    on the teacher's cached ids, then the log of its mass on every other id (differentiable)."""
    log_norm = student.logsumexp(-1, keepdim=True)
    cached = student.gather(-1, teacher.ids) - log_norm
    if teacher.covers_vocabulary:
        return cached
    uncached = student.scatter(-1, teacher.ids, float("-inf")).logsumexp(-1, keepdim=True) - log_norm
    return torch.cat([cached, uncached], dim=-1)


def uncached_teacher_score(teacher: SparseTeacher) -> torch.Tensor:
    """``[N]``: the teacher log-probability given to an id outside the cache when the ranking term
    needs one: the mean probability of the uncached ids, log(p_tail / (V - K)), capped at the K-th
    cached log-probability. Every uncached id is at most as likely as the K-th cached one, and so is
    their mean, so the cap only acts on values that rounding pushed above it; the score therefore
    ranks after every cached id, tying with the K-th only when the whole tail is as likely as it
    (when the true order is a tie too). Uncached ids tie with each other."""
    spread = math.log(max(teacher.vocab_size - teacher.k, 1))
    mean_tail = teacher.tail_log_mass.to(teacher.log_probs.dtype) - spread
    return torch.minimum(mean_tail, teacher.log_probs.amin(-1))
