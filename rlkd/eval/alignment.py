"""Distribution-alignment metrics between a student and a teacher (the paper's CR, OR/MOR, PPL).

Definitions, per supervised position (logit t predicts token t+1), with both models' top-k lists
ordered by decreasing logit (``torch.topk``; ties are broken by PyTorch, irrelevant for real
logits):

* ``CR@k``: 1 if the student's ordered top-k index list equals the teacher's, else 0.
* ``OR@k``: |student top-k  intersect  teacher top-k| / k (order ignored).
* perplexity: exp of the mean cross-entropy of the model on the actual next tokens.

Aggregation follows the official ``verify_ood``: average over the positions of one slice, then
over slices ("MOR" is OR averaged that way; CR likewise). Perplexity is exp(mean NLL) per slice,
then averaged over slices; ``*_corpus`` values pool all positions instead (token-weighted mean,
and exp of the mean NLL over every token). ``top1_agreement`` is the pooled fraction of positions
where both argmaxes agree (CR@1 pooled over tokens rather than per slice). All values in
:class:`AlignmentResult` are percentages except perplexities.

Where the two vocabularies differ only by padding rows (e.g. 32000 vs 32001), the comparison
uses the shared leading ``min(V_student, V_teacher)`` ids.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlkd.device import collective_device, has_peers
from rlkd.objectives.agreement import CR_KS, OR_KS, position_agreement  # noqa: F401  (defined there: the engine uses it too)

def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Cross-entropy of each row of ``logits [N, V]`` on ``targets [N]``, computed in chunks."""
    pieces = [F.cross_entropy(logits[i:i + chunk_size].float(), targets[i:i + chunk_size],
                              reduction="none") for i in range(0, logits.shape[0], chunk_size)]
    return torch.cat(pieces).cpu() if pieces else torch.empty(0)


@dataclass
class AlignmentAccumulator:
    """Sums that add up slice by slice (and across ranks) into :class:`AlignmentResult`."""

    cr_ks: Sequence[int] = CR_KS
    or_ks: Sequence[int] = OR_KS
    chunk_size: int = 1024
    n_slices: int = 0
    n_tokens: int = 0
    slice_mean_sums: dict[str, float] = field(default_factory=dict)  # sum over slices of slice means
    token_sums: dict[str, float] = field(default_factory=dict)  # sum over all positions

    def add_slice(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor | None = None) -> None:
        """Add one slice: ``[L, V]`` logits of both models at its supervised positions, and
        optionally the ``[L]`` next-token ids for perplexities."""
        if student_logits.shape[0] == 0:
            return
        per_position = position_agreement(student_logits, teacher_logits, self.cr_ks, self.or_ks,
                                          self.chunk_size)
        if targets is not None:
            for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
                nll = token_nll(logits, targets, self.chunk_size)
                self._add("nll_" + name, nll)
                self._add_value("ppl_" + name, math.exp(nll.mean().item()))
        for name, values in per_position.items():
            self._add(name, values)
        self.n_slices += 1
        self.n_tokens += student_logits.shape[0]

    def _add(self, name: str, values: torch.Tensor) -> None:
        self.token_sums[name] = self.token_sums.get(name, 0.0) + values.double().sum().item()
        self._add_value(name, values.double().mean().item())

    def _add_value(self, name: str, slice_value: float) -> None:
        self.slice_mean_sums[name] = self.slice_mean_sums.get(name, 0.0) + slice_value

    def all_reduce(self) -> None:
        """Sum the accumulators of every rank (no-op unless torch.distributed is initialised)."""
        import torch.distributed as dist

        if not has_peers():  # (a one-process group left up by a cell's training included)
            return
        names = sorted(self.slice_mean_sums)
        packed = torch.tensor([self.n_slices, self.n_tokens]
                              + [self.slice_mean_sums[n] for n in names]
                              + [self.token_sums.get(n, 0.0) for n in names], dtype=torch.float64)
        # On the group's own device: after a GPU training in the same process the group is NCCL,
        # which has no CPU collectives, while these sums live on the CPU.
        packed = packed.to(collective_device())
        dist.all_reduce(packed)
        packed = packed.cpu()
        self.n_slices, self.n_tokens = int(packed[0]), int(packed[1])
        for i, name in enumerate(names):
            self.slice_mean_sums[name] = packed[2 + i].item()
            if name in self.token_sums:
                self.token_sums[name] = packed[2 + len(names) + i].item()

    def result(self) -> "AlignmentResult":
        if self.n_slices == 0:
            raise ValueError("no slice with at least one position was added")
        per_slice = {n: v / self.n_slices for n, v in self.slice_mean_sums.items()}
        pooled = {n: v / self.n_tokens for n, v in self.token_sums.items()}
        metrics: dict[str, float] = {}
        for k in self.cr_ks:
            metrics[f"cr@{k}"] = 100 * per_slice[f"cr@{k}"]
            metrics[f"cr@{k}_corpus"] = 100 * pooled[f"cr@{k}"]
        for k in self.or_ks:
            metrics[f"mor@{k}"] = 100 * per_slice[f"or@{k}"]
            metrics[f"or@{k}_corpus"] = 100 * pooled[f"or@{k}"]
        if 1 in self.cr_ks:
            metrics["top1_agreement"] = 100 * pooled["cr@1"]
        for who in ("student", "teacher"):
            if f"ppl_{who}" in per_slice:
                metrics[f"ppl_{who}"] = per_slice[f"ppl_{who}"]
                metrics[f"ppl_{who}_corpus"] = math.exp(pooled[f"nll_{who}"])
        return AlignmentResult(metrics=metrics, n_slices=self.n_slices, n_tokens=self.n_tokens)


@dataclass(frozen=True)
class AlignmentResult:
    metrics: dict[str, float]
    n_slices: int
    n_tokens: int

    def as_dict(self) -> dict:
        return {"n_slices": self.n_slices, "n_tokens": self.n_tokens, **self.metrics}


def alignment_from_logits(slices: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                          cr_ks: Sequence[int] = CR_KS, or_ks: Sequence[int] = OR_KS,
                          chunk_size: int = 1024) -> AlignmentResult:
    """Metrics over ``(student_logits [L, V], teacher_logits [L, V], targets [L] | None)`` slices."""
    acc = AlignmentAccumulator(cr_ks=cr_ks, or_ks=or_ks, chunk_size=chunk_size)
    for student_logits, teacher_logits, targets in slices:
        acc.add_slice(student_logits, teacher_logits, targets)
    return acc.result()


def make_token_slices(texts: Iterable[str], tokenizer, slice_len: int,
                      max_slices: int | None = None) -> list[list[int]]:
    """Cut a corpus into consecutive, non-overlapping slices of ``slice_len`` token ids.

    Each document is tokenised on its own (with the tokenizer's BOS if it adds one) and followed
    by EOS, the documents are concatenated, and the stream is cut; a short tail is dropped.
    """
    if slice_len < 2:
        raise ValueError("slice_len must be at least 2 (one input token and one target)")
    stream: list[int] = []
    slices: list[list[int]] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        while len(stream) >= slice_len:
            slices.append(stream[:slice_len])
            stream = stream[slice_len:]
            if max_slices is not None and len(slices) >= max_slices:
                return slices
    return slices


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


@torch.no_grad()
def compare_models(student, teacher, token_slices: Sequence[Sequence[int]], batch_size: int = 4,
                   cr_ks: Sequence[int] = CR_KS, or_ks: Sequence[int] = OR_KS,
                   chunk_size: int = 1024, device: str | torch.device | None = None,
                   show_progress: bool = False) -> AlignmentResult:
    """CR/MOR/top-1/PPL of ``student`` against ``teacher`` on token slices.

    Both models are called as ``model(input_ids=...)`` and must return ``.logits``; a DeepSpeed
    ZeRO-3 engine qualifies. Under torch.distributed each rank takes every world_size-th slice,
    every rank runs the same number of forward calls (a rank out of slices repeats its last one
    and drops the result, which ZeRO-3's collective parameter gathering needs), and the sums are
    all-reduced, so every rank returns the global result. Slices of unequal length are batched
    separately by length, so no padding is ever involved.
    """
    from .generate import shard_indices

    import torch.distributed as dist

    distributed = has_peers()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device is None:
        device = next(student.parameters()).device
    mine = [token_slices[i] for i in shard_indices(len(token_slices), world, rank)]
    by_length: dict[int, list[Sequence[int]]] = {}
    for s in mine:
        if len(s) < 2:
            raise ValueError("every token slice needs at least 2 tokens")
        by_length.setdefault(len(s), []).append(s)
    batches = [group[i:i + batch_size] for _, group in sorted(by_length.items())
               for i in range(0, len(group), batch_size)]
    n_calls = len(batches)
    if distributed:
        count = torch.tensor([n_calls], dtype=torch.long, device=collective_device())
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n_calls = int(count.item())
    acc = AlignmentAccumulator(cr_ks=cr_ks, or_ks=or_ks, chunk_size=chunk_size)
    progress = range(n_calls)
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(progress, desc="alignment", disable=rank != 0)
    for call in progress:
        keep = call < len(batches)
        if keep:
            batch = batches[call]
        else:  # only keeps this rank's collectives in step with the others; result dropped
            batch = batches[-1] if batches else [list(token_slices[0])]
        ids = torch.tensor([list(s) for s in batch], dtype=torch.long, device=device)
        student_logits = _logits(student, ids)
        teacher_logits = _logits(teacher, ids)
        if not keep:
            continue
        for row in range(ids.shape[0]):
            acc.add_slice(student_logits[row, :-1], teacher_logits[row, :-1], ids[row, 1:])
    acc.all_reduce()
    return acc.result()


def compare_many(reference, candidates, token_slices: Sequence[Sequence[int]],
                 **kwargs) -> dict[str, AlignmentResult]:
    """Table 3 of the paper: each candidate model (a ``{name: model}`` mapping) scored against one
    reference model (the paper's Llama-2-70B) with :func:`compare_models`. In each result the
    candidate is the "student" (so ``ppl_student`` is the candidate's perplexity)."""
    return {name: compare_models(model, reference, token_slices, **kwargs)
            for name, model in candidates.items()}
