"""The distillation loss from final hidden states and output-head weights, one block of positions at a time.

``fused_distill_loss(loss, student, teacher, mask, labels)`` gives the same ``LossOutput`` as
``loss(student_hidden @ W_s.T, teacher_hidden @ W_t.T, mask, labels)`` without any N x V tensor:
for each block of supervised positions (a memory budget's worth of logits) it computes both models'
logits, runs the loss's public per-chunk seam (``DistillLoss.chunk_loss_and_grad``: every objective,
the ranking term in every mode, temperature; the logits path runs the same) on the logits path's
chunks inside the block (and the ranking term of logit scores once for the whole block,
``DistillLoss.finish_rank_rows``), overwrites the
block's student logits with their gradient, and folds that into the gradients of the student's
hidden states (block x H rows) and head weight (V x H, accumulated in fp32). Working memory is
O(block x V) plus those two gradients.

The teacher is either a ``HeadInput`` (its hidden states and head weight) or its logits as a tensor
(the teacher cache stores logits; rows are read block by block). Logits are cut to ``vocab_size``
columns (padded vocabularies); head rows beyond it get zero gradient, as in the logits path.

Like Liger's fused linear losses, the gradients are computed during forward (the only time the
chunk's logits exist) and backward scales them by the incoming scalar gradient; the result is
therefore the *summed* loss as a scalar, and ``per_token`` comes back detached. Under ZeRO-3 the
caller gathers the head weights around the call (``deepspeed.zero.GatheredParameters``); the weight
gradient is handed to autograd as usual and reduced by DeepSpeed's own gradient hooks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rlkd.objectives.common import compute_dtype
from rlkd.objectives.loss import DistillLoss, LossOutput, add_terms, chunk_spans, contiguous_starts

# Logits are computed (and their gradients folded into the hidden-state and weight gradients) for
# blocks of positions; the loss maths then runs on chunks of FUSED_CHUNK_ELEMENTS inside a block.
# A block's size comes from a memory budget (``loss.fused_block_mib``, see ``fused_block_rows``).
# On the CPU the default, 2^24 elements (64 MiB in fp32, 128 rows at V = 128k), is chosen for
# memory: at V >= 128k the fp32 weight gradient is most of the fused path's peak and block + chunk
# temporaries are kept to a small fraction of it (results/perf/fused.md: peak <= 0.2x the logits
# path). A GPU needs far more rows per block to keep its matmuls compute-bound (each one reads a
# V x H head weight, 1 GiB at V = 128k, H = 2048, and the weight-gradient update writes one), and
# has the memory: its default is a share of the device's memory, never below GPU_BLOCK_ROW_FLOOR rows.
HEAD_BLOCK_ELEMENTS = 2**24
GPU_BLOCK_SHARE = 1 / 256         # of the device's memory: 320 MiB on an 80 GB GPU (1248 rows at V = 128k, bf16)
GPU_BLOCK_MAX_BYTES = 2**30
GPU_BLOCK_ROW_FLOOR = 1024        # about 8 tiles of 128 rows per matmul
FUSED_CHUNK_ELEMENTS = 2**20
GPU_CHUNK_ELEMENTS = 2**22        # 4x the CPU chunk on a GPU (the logits path's chunk): fewer, fuller kernels


def fused_block_budget(device_type: str, element_bytes: int = 4, device_bytes: int | None = None,
                       setting_mib: float | None = None) -> int:
    """Bytes of logits one block may hold: ``loss.fused_block_mib`` when set, else the device's
    default (CPU: HEAD_BLOCK_ELEMENTS logits, today's measured setting; GPU: a share of its memory)."""
    if setting_mib is not None:
        return int(setting_mib * 2**20)
    if device_type != "cuda":
        return HEAD_BLOCK_ELEMENTS * element_bytes
    if device_bytes is None:
        device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return int(min(GPU_BLOCK_MAX_BYTES, device_bytes * GPU_BLOCK_SHARE))


def fused_block_rows(vocab: int, element_bytes: int, device_type: str, *, device_bytes: int | None = None,
                     setting_mib: float | None = None, chunk: int | None = None) -> tuple[int, int]:
    """``(rows per block, rows per chunk)`` for a vocabulary of ``vocab`` logits of ``element_bytes``
    each. A block is a whole number of chunks; on a GPU it has at least GPU_BLOCK_ROW_FLOOR rows
    unless a budget is set explicitly. A set budget smaller than one chunk shrinks the chunk to it
    (else a block of one chunk would exceed the memory asked for)."""
    if chunk is None:
        chunk = max(1, (GPU_CHUNK_ELEMENTS if device_type == "cuda" else FUSED_CHUNK_ELEMENTS) // vocab)
    rows = fused_block_budget(device_type, element_bytes, device_bytes, setting_mib) // (vocab * element_bytes)
    if setting_mib is not None:
        chunk = min(chunk, max(1, rows))
    if device_type == "cuda" and setting_mib is None:
        rows = max(rows, GPU_BLOCK_ROW_FLOOR)
    return max(chunk, rows // chunk * chunk), chunk


@dataclass
class HeadInput:
    """A model's final hidden states ``[..., H]`` (after the final norm) and its head weight ``[V, H]``
    (the input embedding matrix when the embeddings are tied)."""

    hidden: torch.Tensor
    weight: torch.Tensor


class _LogitRows:
    """Rows of ``hidden @ weight[:vocab].T`` computed on demand.

    Read through :func:`_rows` like a flattened logits tensor (``narrow``, ``index_select``), so the
    official fidelity's batch-level union and NaN fallback (``DistillLoss.batch_level``) and the
    non-finite check read rows of logits that never exist in full.
    """

    def __init__(self, hidden_flat: torch.Tensor, weight: torch.Tensor, vocab: int):
        self.hidden, self.weight = hidden_flat.detach(), weight.detach().narrow(0, 0, vocab)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.hidden.narrow(dim, start, length) @ self.weight.t()

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return self.hidden.index_select(dim, idx) @ self.weight.t()


class _CachedRows:
    """Rows of a stored ``[N, V']`` logits tensor, cut to ``vocab`` columns."""

    def __init__(self, logits_flat: torch.Tensor, vocab: int):
        self.logits = logits_flat.detach().narrow(-1, 0, vocab)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.logits.narrow(dim, start, length)

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return self.logits.index_select(dim, idx)


def _rows(source, idx: torch.Tensor, first: int | None):
    if source is None:
        return None
    if first is not None:
        return source.narrow(0, first, idx.numel())
    return source.index_select(0, idx)


def fused_distill_loss(loss: DistillLoss, student: HeadInput, teacher: HeadInput | torch.Tensor | None,
                       mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                       vocab_size: int | None = None, grad_scale=None) -> LossOutput:
    """``loss`` evaluated on logits computed chunk by chunk from hidden states; see the module
    docstring. ``mask`` and ``grad_scale`` as in ``DistillLoss.__call__``."""
    hidden, weight = student.hidden, student.weight
    lead = hidden.shape[:-1]
    vocab = _check_inputs(loss, student, teacher, lead, vocab_size)
    positions, labels_sel, host_positions = loss.select_positions(lead, hidden.device, mask, labels, "hidden states'")

    hidden_flat = hidden.reshape(-1, hidden.shape[-1])
    teacher_rows = None
    if loss.needs_teacher:
        if isinstance(teacher, HeadInput):
            teacher_rows = _LogitRows(teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight, vocab)
        else:
            teacher_rows = _CachedRows(teacher.reshape(-1, teacher.shape[-1]), vocab)
    n = positions.numel()
    if n == 0:
        # Connected to both inputs so that every rank runs the same backward (ZeRO-3 reductions).
        return LossOutput(hidden_flat.sum() * 0.0 + weight.sum() * 0.0, 0, {"loss": 0.0})
    block, chunk = fused_block_rows(vocab, hidden.element_size(), hidden.device.type,
                                    setting_mib=loss.config.fused_block_mib, chunk=loss.config.chunk_size)
    student_rows = _LogitRows(hidden_flat, weight, vocab)
    spans = functools.cache(lambda: chunk_spans(positions, host_positions, chunk))  # read by the official fidelity only
    union_ids, weights = loss.batch_level(lambda i: _rows(student_rows, *spans()[i]),
                                          lambda i: _rows(teacher_rows, *spans()[i]), -(-n // chunk))
    plan = _Plan(loss, teacher_rows, positions, labels_sel, union_ids, weights, chunk, vocab, block, host_positions,
                 1.0 if grad_scale is None else grad_scale)
    loss_sum = _FusedHeadLoss.apply(hidden_flat, weight, plan)
    metrics = dict(plan.metrics)
    metrics["loss"] = plan.per_token.sum()
    metrics["rank_fallback"] = float(weights.rank_fallback)
    out = LossOutput(loss_sum, n, metrics, plan.per_token, torch.isfinite(plan.per_token).all())
    if not loss.defer_finite_check:
        loss.check_finite(out, positions, lambda at: (_rows(student_rows, at, None), _rows(teacher_rows, at, None)))
    return out


def _check_inputs(loss: DistillLoss, student: HeadInput, teacher, lead, vocab_size: int | None) -> int:
    widths = {"student head": student.weight.shape[0]}
    if student.weight.shape[-1] != student.hidden.shape[-1]:
        raise ValueError(f"student head weight {tuple(student.weight.shape)} does not match hidden size "
                         f"{student.hidden.shape[-1]}")
    if loss.needs_teacher:
        if teacher is None:
            raise ValueError("this loss needs the teacher (hidden states and head, or logits), got None")
        if isinstance(teacher, HeadInput):
            t_lead, widths["teacher head"] = teacher.hidden.shape[:-1], teacher.weight.shape[0]
            if teacher.weight.shape[-1] != teacher.hidden.shape[-1]:
                raise ValueError(f"teacher head weight {tuple(teacher.weight.shape)} does not match hidden size "
                                 f"{teacher.hidden.shape[-1]}")
        else:
            t_lead, widths["teacher logits"] = teacher.shape[:-1], teacher.shape[-1]
        if t_lead != lead:
            raise ValueError(f"teacher leading shape {tuple(t_lead)} does not match the student's {tuple(lead)}")
    vocab = vocab_size if vocab_size is not None else min(widths.values())
    if vocab_size is None and len(set(widths.values())) > 1:
        raise ValueError(f"vocabulary mismatch: {widths}; pass vocab_size (models.vocab_truncation: shared) "
                         "to compare on the shared prefix")
    short = {name: width for name, width in widths.items() if width < vocab}
    if short:
        raise ValueError(f"vocab_size={vocab} exceeds {short}")
    if loss.ranking is not None and loss.ranking.k > vocab:
        raise ValueError(f"ranking.k={loss.ranking.k} exceeds the vocabulary size {vocab}")
    return vocab


@dataclass
class _Plan:
    loss: DistillLoss
    teacher_rows: object
    positions: torch.Tensor
    labels_sel: torch.Tensor | None
    union_ids: torch.Tensor | None
    weights: object
    chunk: int
    vocab: int
    block: int
    host_positions: torch.Tensor
    grad_scale: object = 1.0
    per_token: torch.Tensor | None = None
    metrics: dict | None = None


@functools.lru_cache(maxsize=None)
def _low_precision_addmm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds ``a @ b`` of ``dtype``
    inputs into an fp32 ``acc`` here (CUDA, torch >= 2.8): a tensor-core matmul whose fp32
    accumulator is added unrounded, in place. Checked against an fp32 matmul on a small case."""
    try:
        g = torch.Generator(device=device_type).manual_seed(0)
        a = torch.randn(64, 32, device=device_type, generator=g).to(dtype)
        b = torch.randn(32, 48, device=device_type, generator=g).to(dtype)
        acc = torch.ones(64, 48, device=device_type)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        expected = 1 + a.float() @ b.float()
        return acc.dtype == torch.float32 and bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _add_weight_grad(grad_w: torch.Tensor, logits_grad: torch.Tensor, h_block: torch.Tensor) -> None:
    """``grad_w += logits_grad.T @ h_block`` into the fp32 accumulator. On a GPU with bf16/fp16 inputs
    the matmul runs in that dtype on the tensor cores with fp32 accumulation (an fp32 matmul would
    use none) and no fp32 copy of the block; on the CPU, and for fp32 inputs, it is an fp32 matmul
    as before."""
    low = logits_grad.dtype in (torch.bfloat16, torch.float16) and logits_grad.dtype == h_block.dtype
    if low and logits_grad.device.type == "cuda" and _low_precision_addmm("cuda", logits_grad.dtype):
        torch.addmm(grad_w, logits_grad.t(), h_block, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.addmm_(logits_grad.t().to(grad_w.dtype), h_block.to(grad_w.dtype))


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_flat, weight, plan: _Plan):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, positions, vocab = plan.loss, plan.positions, plan.vocab
        head = weight.detach().narrow(0, 0, vocab)
        h_all = hidden_flat.detach()
        n = positions.numel()
        per_token = torch.empty(n, dtype=compute_dtype(h_all), device=h_all.device)
        grad_h = torch.zeros_like(h_all) if want_h else None
        # fp32 accumulation over chunks: a bf16 running sum would round away small chunks' terms.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
        sums: dict[str, torch.Tensor] = {}
        chunk, block = plan.chunk, plan.block
        for block_start, first in zip(range(0, n, block), contiguous_starts(plan.host_positions, block)):
            block_idx = positions[block_start : block_start + block]
            h_block = _rows(h_all, block_idx, first)
            logits = h_block @ head.t()  # overwritten by its own gradient, chunk by chunk
            t_block = _rows(plan.teacher_rows, block_idx, first)
            rank_parts = []
            for offset in range(0, block_idx.numel(), chunk):
                start = block_start + offset
                rows = slice(offset, offset + chunk)
                t_rows = t_block[rows] if t_block is not None else None
                lab = plan.labels_sel[start : start + chunk] if plan.labels_sel is not None else None
                ids = plan.union_ids[start : start + chunk] if plan.union_ids is not None else None
                part = loss.chunk_loss_and_grad(logits[rows], t_rows, lab, ids, plan.weights,
                                                want_grad=want_h or want_w, grad_scale=plan.grad_scale,
                                                pad_rows=chunk)
                if part.grad is not None:
                    logits[rows] = part.grad
                per_token[start : start + chunk] = part.total
                if part.rank_rows is not None:
                    rank_parts.append(part.rank_rows)
                add_terms(sums, part.terms)
            if rank_parts:  # the ranking term of the whole block at once (logit scores)
                ids, g = loss.finish_rank_rows(rank_parts, plan.weights, want_h or want_w,
                                               per_token[block_start : block_start + block_idx.numel()], block_idx, sums)
                if g is not None:
                    rows = torch.arange(block_idx.numel(), device=logits.device).unsqueeze(-1).expand_as(ids)
                    logits.index_put_((rows, ids), (g * plan.grad_scale).to(logits.dtype), accumulate=True)
            if want_h:
                grad_h.index_copy_(0, block_idx, logits @ head)
            if want_w:
                _add_weight_grad(grad_w.narrow(0, 0, vocab), logits, h_block)
            del logits, t_block, t_rows  # free this block before the next one is allocated
        plan.per_token = per_token
        plan.metrics = sums  # device tensors; read by the caller, once
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.grad_scale = plan.grad_scale
        return per_token.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("fused_distill_loss: a second backward through the same loss")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        factor = grad_out / ctx.grad_scale  # the gradients carry grad_scale already
        if grad_h is not None:
            grad_h = grad_h.mul_(factor.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(factor.to(grad_w.dtype))
        return grad_h, grad_w, None
