"""DistillLoss: a base objective and the ranking term over the supervised positions, in chunks.

Memory: only the selected positions are touched, ``chunk_size`` rows at a time. For each chunk the
per-token losses *and* their gradient with respect to the student's logits are computed at once
(the gradient of token i's loss involves row i only) and written into the buffer that becomes the
logits' gradient, in the logits' dtype. Backward scales that buffer in place by the incoming
per-token gradients and hands it over. Working memory is O(chunk x V) beyond the logits'
gradient itself, instead of the several N x V fp32 softmaxes a plain autograd graph keeps alive.
Because the buffer is handed over, backward runs once per forward; ``retain_gradient=True``
keeps an unscaled copy (one more logits-sized tensor) for repeated backward, as gradcheck does.

Ranking term: with logit scores (the default) it depends on each row only through <= 2k logits.
A chunk therefore only finds the top-k ids and gathers those logits (while the chunk is in cache);
the soft ranks, the correlation and its sparse gradient are then computed once for all rows
(``rank_rows``), which removes their fixed per-chunk cost. With probability scores the gradient
is dense (through each row's logsumexp) and the term is computed inside the chunk.

Reduction: the result is a *sum* over positions; the caller divides by the global number of
supervised tokens (all micro-batches, all ranks), so gradient accumulation and data parallelism
leave the loss scale unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rlkd.objectives.common import compute_dtype
from rlkd.objectives.compiled import compile_wanted, compiled, give_up, usable
from rlkd.objectives.compiled import pad_rows as pad
from rlkd.objectives.config import LossConfig
from rlkd.objectives.ranking import gather_scores, official_batch_union, rank_loss_from_scores, topk_ids, union_ids_for
from rlkd.objectives.registry import get_objective, is_builtin, objective_origin
from rlkd.objectives.sparse_teacher import SparseTeacher
from rlkd.objectives.stored_gradient import stored_gradient_backward

CHUNK_ELEMENT_BUDGET = 2**22


class LossOutput:
    """``loss_sum`` (a scalar tensor), ``n_tokens``, ``per_token`` and the logged sums.

    ``device_metrics`` holds those sums as they were computed: 0-dim tensors on the logits' device.
    Reading ``metrics`` turns them into floats, all in one host-device sync; the engine never reads
    it and packs ``device_metrics`` into its one sync a step instead. ``finite`` is a device flag:
    whether every per-token loss is finite (None when already checked).
    """

    def __init__(self, loss_sum: torch.Tensor, n_tokens: int, metrics: dict | None = None,
                 per_token: torch.Tensor | None = None, finite: torch.Tensor | None = None):
        self.loss_sum, self.n_tokens, self.per_token, self.finite = loss_sum, n_tokens, per_token, finite
        self.device_metrics: dict[str, torch.Tensor | float] = dict(metrics or {})
        self._metrics: dict[str, float] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            self._metrics = host_values(self.device_metrics)
        return self._metrics


def host_values(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Floats of a dict of 0-dim tensors and numbers, with one device-to-host copy for all tensors."""
    names = [name for name, value in values.items() if isinstance(value, torch.Tensor)]
    out = {name: float(value) for name, value in values.items() if not isinstance(value, torch.Tensor)}
    if names:
        packed = torch.stack([values[n].detach().reshape(()).to(torch.float64) for n in names]).tolist()
        out.update(zip(names, packed))
    return {name: out[name] for name in values}


@dataclass
class RankRows:
    """What the ranking term needs from some rows when its scores are logits: the union's ids and
    validity, the exact top-k overlap, the student's *raw* logits there (the gradient's leaf) and
    the teacher's scores (after the temperature). All [rows, u] but ``overlap`` [rows]; detached."""

    ids: torch.Tensor
    valid: torch.Tensor
    overlap: torch.Tensor
    student: torch.Tensor
    teacher: torch.Tensor

    @staticmethod
    def cat(parts: list["RankRows"]) -> "RankRows":
        if len(parts) == 1:
            return parts[0]
        return RankRows(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("ids", "valid", "overlap", "student", "teacher")))


@dataclass
class ChunkWeights:
    """The weights of the ranking term and of the base objectives for one batch (``DistillLoss.batch_level``);
    ``rank_fallback``: the official fidelity fell back to the base objectives (a NaN rank)."""

    rank: float
    base: float
    rank_fallback: bool = False


@dataclass
class ChunkResult:
    """One chunk's per-token ``total`` [rows], its logged ``terms`` and ``grad``: ``grad_scale`` x the
    gradient of ``total.sum()`` with respect to the chunk's student logits, in the compute dtype (fp32
    or wider; None when not asked for). ``rank_rows``: what the ranking term of logit scores needs,
    for :meth:`DistillLoss.finish_rank_rows` (that term is then not in ``total`` yet). All detached."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad: torch.Tensor | None
    rank_rows: RankRows | None


class DistillLoss:
    """Callable ``(student_logits, teacher_logits, mask, labels=None) -> LossOutput``."""

    def __init__(self, config: LossConfig | dict | None = None, *, retain_gradient: bool = False,
                 defer_finite_check: bool = False, **overrides):
        if config is None or isinstance(config, dict):
            config = LossConfig(**{**(config or {}), **overrides})
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        self.retain_gradient = retain_gradient
        # A call checks that its loss is finite (one host sync) unless the caller does it for many
        # calls at once (rlkd.engine.train: in its one sync a step) from ``LossOutput.finite``.
        self.defer_finite_check = defer_finite_check
        self.ranking = config.ranking if config.ranking.enabled else None
        # (declaration, params, weight) of each weighted objective; empty for Rank-only.
        self.objectives = [(get_objective(t.objective), dict(t.params), t.weight)
                           for t in config.objective_terms()] if config.uses_base else []

    # ---- the per-chunk computation -----------------------------------------------------------
    def chunk_loss_and_grad(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor | None,
                            labels: torch.Tensor | None, union_ids: torch.Tensor | None, weights: ChunkWeights, *,
                            want_grad: bool = True, grad_scale=1.0, pad_rows: int | None = None) -> ChunkResult:
        """The loss of one chunk of supervised rows and its gradient with respect to those rows' logits:
        the public per-chunk seam that the logits path (``__call__``) and the fused path
        (:mod:`rlkd.objectives.fused`) both run, chunk by chunk.

        ``student_rows``/``teacher_rows``: ``[rows, V]`` logits (teacher None when no term needs it);
        ``labels``: their next tokens or None; ``union_ids`` and ``weights``: this chunk's slice of
        :meth:`batch_level`'s result. The gradient is taken in fp32 (or wider) and multiplied by
        ``grad_scale`` before the caller stores it in the logits' dtype, so that fp16 does not round
        small gradients to zero. A separate call, so the chunk's autograd graph is gone on return.
        ``pad_rows``: the caller's chunk size; with ``loss.compile`` on, a shorter (last) chunk is padded
        to it for the compiled objectives, so that every chunk has one shape (one compile).
        """
        def run(compile_: bool) -> ChunkResult:
            leaf = student_rows.detach().to(compute_dtype(student_rows))
            with torch.enable_grad():
                leaf.requires_grad_(want_grad)
                total, terms, rank_rows = self._chunk(leaf, teacher_rows, labels, union_ids, weights,
                                                      compile_=compile_, pad_rows=pad_rows)
                grad = None
                if want_grad:
                    # (a rank-only total with logit scores does not depend on the chunk at all)
                    grad = torch.autograd.grad(total.sum(), leaf, allow_unused=True)[0] if total.requires_grad else None
                    grad = grad * grad_scale if grad is not None else torch.zeros_like(leaf)
            return ChunkResult(total.detach(), {name: value.detach() for name, value in terms.items()}, grad,
                               rank_rows)

        return self._compiled_or_eager(student_rows.device.type, run)

    # ---- loss.compile ---------------------------------------------------------------------------------
    def compiles_on(self, device_type: str) -> bool:
        """Whether ``loss.compile`` runs this loss's built-in maths compiled on ``device_type``."""
        return compile_wanted(self.config.compile, device_type) and any(usable(fn) for fn in self._compilable())

    def _compilable(self) -> list:
        """The functions ``loss.compile`` compiles: built-in objectives and the ranking term's."""
        fns = [spec.fn for spec, _, _ in self.objectives if is_builtin(spec)]
        return fns + ([rank_loss_from_scores] if self.ranking is not None else [])

    def _compiled_or_eager(self, device_type: str, run):
        """``run(True)`` (compiled) when ``loss.compile`` asks for it, else ``run(False)``. If the compiled
        run raises and the eager one does not, compiling is at fault (no compiler, an unsupported
        operation): one printed line, and this loss's functions run eagerly from then on. If the eager
        run raises too, the inputs are at fault and its error is raised."""
        if not self.compiles_on(device_type):
            return run(False)
        try:
            return run(True)
        except Exception as exc:  # noqa: BLE001 - decided by the eager run below
            result = run(False)
            give_up(self._compilable(), exc)
            return result

    def _objective(self, spec, compile_: bool):
        return compiled(spec.fn) if compile_ and is_builtin(spec) and usable(spec.fn) else spec.fn

    def _chunk(self, student, teacher, labels, union_ids, weights: ChunkWeights, *, compile_: bool = False,
               pad_rows: int | None = None):
        """Per-token totals and logged terms for one chunk of rows.

        Returns ``(total, terms, rank_rows)``. With logit scores the ranking term is left out of
        ``total`` and ``terms``: ``rank_rows`` carries what it needs, for :meth:`rank_rows` to compute
        it over many chunks at once. With probability scores it is computed here (``rank_rows`` None).
        """
        cfg = self.config
        s = student.to(compute_dtype(student))
        t = teacher.to(s.dtype) if teacher is not None else None
        if cfg.temperature != 1.0:
            s, t = s / cfg.temperature, (t / cfg.temperature if t is not None else None)
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        base_weight = torch.full_like(total, weights.base)
        rank_rows = None
        if self.ranking is not None:
            r = self.ranking
            ids, valid, overlap = union_ids_for(s, t, r.k, union_ids)
            if r.scores == "logits":
                rank_rows = RankRows(ids, valid, overlap, student.detach().gather(-1, ids).to(s.dtype),
                                     t.gather(-1, ids))
            else:
                rank, degenerate = self._rank_loss(gather_scores(t, ids, r.scores), gather_scores(s, ids, r.scores),
                                                   valid, compile_)
                terms.update(self._rank_terms(rank, degenerate, overlap, s.dtype))
                if weights.rank:
                    total = total + weights.rank * rank
            if r.mode == "dynamic":
                base_weight = base_weight * overlap.to(s.dtype) / r.k
        if self.objectives and weights.base:
            base = None
            rows = s.shape[0]
            for spec, params, weight in self.objectives:
                fn = self._objective(spec, compile_)
                if fn is spec.fn or pad_rows is None or rows >= pad_rows:
                    value = fn(s, t, labels, **params)
                else:  # the last, shorter chunk padded to the others' shape: no second compile
                    value = fn(pad(s, pad_rows), pad(t, pad_rows), pad(labels, pad_rows), **params)[:rows]
                if len(self.objectives) > 1:
                    terms[f"base_{spec.name}"] = value  # each term logged on its own
                base = weight * value if base is None else base + weight * value
            terms["base"] = base
            total = total + base_weight * base
        return total, terms, rank_rows

    def rank_rows(self, rows: RankRows, weights: ChunkWeights, want_grad: bool):
        """The ranking term of logit scores over many rows at once.

        Returns ``(total, terms, grad)``: ``weights.rank`` x the per-row loss, the logged terms, and
        the gradient of ``total.sum()`` with respect to ``rows.student`` (None without ``want_grad``
        or weight), to be scattered into the logits' gradient at ``rows.ids``.
        """
        temperature = self.config.temperature

        def run(compile_: bool):
            with torch.enable_grad():
                leaf = rows.student.detach().requires_grad_(want_grad and bool(weights.rank))
                q = leaf / temperature if temperature != 1.0 else leaf
                rank, degenerate = self._rank_loss(rows.teacher, q, rows.valid, compile_)
                total = weights.rank * rank if weights.rank else torch.zeros_like(rank)
                grad = torch.autograd.grad(total.sum(), leaf)[0] if leaf.requires_grad else None
            return total.detach(), self._rank_terms(rank.detach(), degenerate, rows.overlap, rank.dtype), grad

        return self._compiled_or_eager(rows.student.device.type, run)

    def _rank_loss(self, p, q, valid, compile_: bool = False):
        r = self.ranking
        # compiled with a dynamic row count: the rows are a batch's (or a block's), not a chunk's
        fn = compiled(rank_loss_from_scores, dynamic=True) if compile_ and usable(rank_loss_from_scores) \
            else rank_loss_from_scores
        return fn(p, q, valid, correlation=r.correlation, regularization_strength=r.regularization_strength,
                  backend=r.backend, official=r.fidelity == "official")

    def finish_rank_rows(self, parts: list[RankRows], weights: ChunkWeights, want_grad: bool, per_token, positions,
                         sums) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ranking term of the rows whose chunks gathered ``parts``: added to ``per_token`` (their
        slice of it, in place) and to the logged ``sums``, checked; returns ``(ids, grad)`` for the
        caller to scatter into its logits' gradient (``grad`` None without gradient or weight)."""
        rows = RankRows.cat(parts)
        total, terms, grad = self.rank_rows(rows, weights, want_grad)
        per_token += total  # (a rank-only loss sees non-finite logits only here; checked with the rest)
        add_terms(sums, terms)
        return rows.ids, grad

    def _rank_terms(self, rank, degenerate, overlap, dtype) -> dict[str, torch.Tensor]:
        return {"rank": rank, "rank_degenerate_rows": degenerate.to(dtype),
                "topk_overlap": overlap.to(dtype) / self.ranking.k}

    # ---- entry point ------------------------------------------------------------------------------
    def __call__(self, student_logits, teacher_logits, mask=None, labels=None, *, grad_scale=None) -> LossOutput:
        """``mask`` may live on the CPU (the engine passes the batch's host copy): then the loss reads
        nothing back from the device. ``grad_scale``: the factor the caller's backward will multiply
        ``loss_sum`` by (its normalisation times fp16's loss scale). The gradient is computed in fp32
        during forward and stored in the logits' dtype *after* this factor is applied, as autograd
        would, so that fp16 does not round small gradients to zero before the loss scale lifts them."""
        if isinstance(teacher_logits, SparseTeacher):  # a top-K teacher cache: rlkd.objectives.sparse_loss
            from rlkd.objectives.sparse_loss import sparse_distill_loss

            return sparse_distill_loss(self, student_logits, teacher_logits, mask, labels, grad_scale=grad_scale,
                                       output_type=LossOutput)
        student_flat, teacher_flat, positions, labels_sel, host_positions = self._select(
            student_logits, teacher_logits, mask, labels)
        n = positions.numel()
        if n == 0:
            # A micro-batch without supervised tokens is legal (e.g. a prompt filling the context):
            # it adds nothing, but stays connected to the graph so every rank runs backward.
            return LossOutput(student_flat.sum() * 0.0, 0, {"loss": 0.0})
        vocab = student_flat.shape[-1]
        chunk = self.config.chunk_size or max(1, CHUNK_ELEMENT_BUDGET // vocab)
        spans = functools.cache(lambda: chunk_spans(positions, host_positions, chunk))  # read by the official fidelity only
        union_ids, weights = self.batch_level(lambda i: _rows(student_flat, *spans()[i]),
                                              lambda i: _rows(teacher_flat, *spans()[i]), -(-n // chunk))
        metrics: dict[str, torch.Tensor | float] = {}
        per_token = _FusedChunkedLoss.apply(
            student_flat, teacher_flat, positions, labels_sel, union_ids, weights, chunk, self, metrics,
            (host_positions, 1.0 if grad_scale is None else grad_scale)
        )
        metrics["loss"] = per_token.detach().sum()
        metrics["rank_fallback"] = float(weights.rank_fallback)
        out = LossOutput(per_token.sum(), n, metrics, per_token, torch.isfinite(per_token.detach()).all())
        if not self.defer_finite_check:
            self.check_finite(out, positions, lambda at: (_rows(student_flat, at, None), _rows(teacher_flat, at, None)))
        return out

    def check_finite(self, out: LossOutput, positions: torch.Tensor, rows_at) -> None:
        """Raise, naming the first position, if ``out``'s loss is not finite (one host sync).
        ``rows_at(idx)``: the ``(student, teacher)`` logits of the flattened positions ``idx`` (teacher
        may be None), read only when the loss is not finite, to say which logits are to blame."""
        finite, out.finite = out.finite, None
        if finite is None or bool(finite):
            return
        _check_finite(out.per_token.detach(), positions, rows_at, self._blame)

    def _blame(self, student_row, teacher_row) -> str:
        """The terms to blame for a non-finite loss at one position whose logits are finite: each
        objective that needs no labels is recomputed on that row, and named (with its source file
        and line, so a plug-in is found) if it is not finite there; otherwise every term is named."""
        s = student_row.to(compute_dtype(student_row))
        t = teacher_row.to(s.dtype) if teacher_row is not None else None
        if self.config.temperature != 1.0:
            s, t = s / self.config.temperature, (t / self.config.temperature if t is not None else None)
        culprits, every = [], []
        for spec, params, _ in self.objectives:
            named = f"{spec.name!r} ({objective_origin(spec.fn)})"
            every.append(named)
            if not spec.needs_labels and (t is not None or not spec.needs_teacher):
                with torch.no_grad():
                    if not torch.isfinite(spec.fn(s, t, None, **params)).all():
                        culprits.append(named)
        if self.ranking is not None:
            every.append("the ranking term")
        return f"objective {', '.join(culprits)}" if culprits else f"one of: {', '.join(every)}"

    # What the loss needs and how it is normalised, read from the objectives' declarations.
    @property
    def needs_teacher(self) -> bool:
        return self.ranking is not None or any(spec.needs_teacher for spec, _, _ in self.objectives)

    @property
    def needs_labels(self) -> bool:
        return any(spec.needs_labels for spec, _, _ in self.objectives)

    @property
    def counts_labelled_only(self) -> bool:
        """True when every term averages over labelled positions only (e.g. plain cross-entropy):
        the engine then counts only positions whose next token is known."""
        return (self.ranking is None and bool(self.objectives)
                and all(spec.counts == "labelled" for spec, _, _ in self.objectives))

    def _select(self, student_logits, teacher_logits, mask, labels):
        vocab = student_logits.shape[-1]
        needs_teacher = self.needs_teacher
        if needs_teacher:
            if teacher_logits is None:
                raise ValueError("this loss needs teacher logits, got None")
            if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
                raise ValueError(
                    f"teacher logits shape {tuple(teacher_logits.shape)} does not match student logits "
                    f"{tuple(student_logits.shape)} in the leading (batch, position) dimensions"
                )
            if teacher_logits.shape[-1] != vocab:
                raise ValueError(
                    f"vocabulary mismatch: student logits have {vocab} entries, teacher logits "
                    f"{teacher_logits.shape[-1]}; truncate both to the shared vocabulary first "
                    "(models.vocab_truncation: shared in the run config)"
                )
        if self.ranking is not None and self.ranking.k > vocab:
            raise ValueError(f"ranking.k={self.ranking.k} exceeds the vocabulary size {vocab}")
        positions, labels_sel, host_positions = self.select_positions(student_logits.shape[:-1], student_logits.device,
                                                                      mask, labels, "logits'")
        student_flat = student_logits.reshape(-1, vocab)
        teacher_flat = teacher_logits.reshape(-1, vocab) if teacher_logits is not None and needs_teacher else None
        return student_flat, teacher_flat, positions, labels_sel, host_positions

    def select_positions(self, lead, device, mask, labels, what: str):
        """``(positions on device, their labels, positions on the host)``: the flattened supervised
        positions (all when ``mask`` is None), shapes checked against the inputs' leading shape
        ``lead`` (``what`` names those inputs). The host copy lets the chunk loop slice without
        reading the device; a mask on the CPU costs no sync at all."""
        if mask is None:
            mask = torch.ones(lead, dtype=torch.bool)
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match {what} leading shape {tuple(lead)}")
        host_positions = mask.reshape(-1).cpu().nonzero().squeeze(-1)
        positions = host_positions.to(device, non_blocking=True)
        labels_sel = None
        if labels is not None:
            if labels.shape != lead:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match {what} leading shape {tuple(lead)}")
            labels_sel = labels.reshape(-1)[positions]
        elif self.needs_labels:
            names = [spec.name for spec, _, _ in self.objectives if spec.needs_labels]
            raise ValueError(f"objective {', '.join(map(repr, names))} needs labels")
        return positions, labels_sel, host_positions

    def batch_level(self, student_chunk, teacher_chunk, n_chunks: int) -> tuple[torch.Tensor | None, ChunkWeights]:
        """``(union_ids, weights)`` of a batch whose supervised rows come in ``n_chunks`` chunks:
        ``student_chunk(i)``/``teacher_chunk(i)`` return chunk ``i``'s ``[rows, V]`` logits (read only
        by the official fidelity). Weights, and for the official mode the batch-level union and its
        NaN fallback (the released code's choice between two losses: one host sync, official
        fidelity only); ``union_ids`` [N, u] is sliced like the rows, chunk by chunk."""
        r = self.ranking
        if r is None:
            return None, ChunkWeights(rank=0.0, base=1.0)
        if r.fidelity == "paper":
            return None, ChunkWeights(rank=r.rank_weight, base=r.base_weight if self.objectives else 0.0)
        with torch.no_grad():
            t_ids = torch.cat([topk_ids(teacher_chunk(i), r.k) for i in range(n_chunks)])
            s_ids = torch.cat([topk_ids(student_chunk(i), r.k) for i in range(n_chunks)])
            union_ids = official_batch_union(t_ids, s_ids)
            parts, start = [], 0
            for i in range(n_chunks):
                s_rows = student_chunk(i)
                parts.append(self._chunk(s_rows, teacher_chunk(i), None, union_ids[start : start + s_rows.shape[0]],
                                         ChunkWeights(1.0, 0.0)))
                start += s_rows.shape[0]
            if r.scores == "logits":
                nan = bool(torch.isnan(self.rank_rows(RankRows.cat([p[2] for p in parts]), ChunkWeights(1.0, 0.0),
                                                      False)[0]).any())
            else:
                nan = any(bool(torch.isnan(p[0]).any()) for p in parts)
        # Released code: loss = rank + base / magnification, or base alone if rank is NaN.
        weights = ChunkWeights(rank=0.0, base=1.0, rank_fallback=True) if nan else ChunkWeights(rank=1.0, base=1.0 / 2.0)
        return union_ids, weights


class _FusedChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_flat, teacher_flat, positions, labels_sel, union_ids, weights, chunk, loss, metrics,
                host_and_scale):
        host_positions, grad_scale = host_and_scale
        needs_grad = student_flat.requires_grad
        n = positions.numel()
        per_token = torch.empty(n, dtype=compute_dtype(student_flat), device=student_flat.device)
        grad_flat = None
        if needs_grad:  # rows outside the mask need zeros only when there are such rows
            alloc = torch.empty_like if n == student_flat.shape[0] else torch.zeros_like
            grad_flat = alloc(student_flat, memory_format=torch.contiguous_format)
        sums: dict[str, torch.Tensor] = {}
        rank_parts: list[RankRows] = []
        for start, first in zip(range(0, n, chunk), contiguous_starts(host_positions, chunk)):
            idx = positions[start : start + chunk]
            s_rows, t_rows = _rows(student_flat, idx, first), _rows(teacher_flat, idx, first)
            lab = labels_sel[start : start + chunk] if labels_sel is not None else None
            ids = union_ids[start : start + chunk] if union_ids is not None else None
            part = loss.chunk_loss_and_grad(s_rows, t_rows, lab, ids, weights, want_grad=needs_grad,
                                            grad_scale=grad_scale, pad_rows=chunk)
            if needs_grad:
                grad_flat.index_copy_(0, idx, part.grad.to(grad_flat.dtype))
            per_token[start : start + chunk] = part.total
            if part.rank_rows is not None:
                rank_parts.append(part.rank_rows)
            add_terms(sums, part.terms)
        if rank_parts:
            ids, grad = loss.finish_rank_rows(rank_parts, weights, needs_grad, per_token, positions, sums)
            if grad is not None:
                grad_flat.index_put_((positions.unsqueeze(-1).expand_as(ids), ids),
                                     (grad * grad_scale).to(grad_flat.dtype), accumulate=True)
        ctx.save_for_backward(positions)
        ctx.grad_flat, ctx.retain, ctx.grad_scale = grad_flat, loss.retain_gradient, grad_scale
        metrics.update(sums)  # device tensors; read by the caller, once
        return per_token

    @staticmethod
    def backward(ctx, grad_per_token):
        return (stored_gradient_backward(ctx, grad_per_token), *(None,) * 9)


def contiguous_starts(host_positions: torch.Tensor, chunk: int) -> list[int | None]:
    """For each chunk of ``chunk`` positions (a CPU tensor): its first row when its rows are
    consecutive (the chunk is then a view), else None. Computed on the host, for all chunks at
    once, so that the chunk loop never reads the device."""
    values = host_positions.tolist()
    starts = []
    for begin in range(0, len(values), chunk):
        part = values[begin : begin + chunk]
        starts.append(part[0] if part[-1] - part[0] + 1 == len(part) else None)
    return starts


def chunk_spans(positions: torch.Tensor, host_positions: torch.Tensor, chunk: int) -> list[tuple[torch.Tensor, int | None]]:
    """``(positions of the chunk, its first row when consecutive else None)`` for each chunk of ``chunk``
    supervised positions: how both paths cut a batch (see :func:`contiguous_starts`)."""
    starts = contiguous_starts(host_positions, chunk)
    return [(positions[i : i + chunk], first) for i, first in zip(range(0, positions.numel(), chunk), starts)]


def _rows(flat, idx, first: int | None):
    """The rows ``idx`` of ``flat``: a view from ``first`` when they are consecutive (no copy)."""
    if flat is None:
        return None
    if first is not None:
        return flat.detach().narrow(0, first, idx.numel())
    return flat.detach().index_select(0, idx)


def add_terms(sums: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
    """Add a chunk's logged per-token terms to the running sums (a NaN rank of the official mode's
    fallback counts as 0)."""
    for name, value in terms.items():
        value = value.detach()
        if name == "rank":
            value = torch.where(value.isnan(), torch.zeros_like(value), value)
        sums[name] = sums.get(name, 0.0) + value.sum()


def _check_finite(total, idx, rows_at, blame=None):
    """Raise, naming the first position whose loss is not finite and which logits are to blame
    (read with ``rows_at`` at that position only), or, with finite logits, ``blame(student_row,
    teacher_row)``: which terms."""
    if torch.isfinite(total).all():
        return
    bad = int((~torch.isfinite(total)).nonzero()[0, 0])
    where = f"flattened position {int(idx[bad])}"
    s_rows, t_rows = rows_at(idx[bad : bad + 1])
    if s_rows is not None and not torch.isfinite(s_rows[0]).all():
        raise ValueError(f"student logits contain NaN/Inf at {where}")
    if t_rows is not None and not torch.isfinite(t_rows[0]).all():
        raise ValueError(f"teacher logits contain NaN/Inf at {where}")
    culprit = f": {blame(s_rows, t_rows)} is not finite there" if blame is not None else ""
    raise FloatingPointError(f"the loss is not finite at {where} although the logits are{culprit}")
