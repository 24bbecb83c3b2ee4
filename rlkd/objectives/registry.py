"""Registry of per-token KD objectives.

An objective is a pure function ``fn(student_logits, teacher_logits, labels, **params) -> loss[N]``
over N selected positions (rows of already temperature-scaled fp32 logits). Registering it with
``@register_objective`` makes it available by name everywhere: configs, grids, tables, the CLI.
Hyperparameters are the function's keyword-only arguments; their defaults are the declared
defaults and ``bounds`` gives their valid closed intervals.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

ObjectiveFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: ObjectiveFn
    defaults: Mapping[str, float]
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    needs_teacher: bool = True
    needs_labels: bool = False
    # Which positions the per-token mean runs over: "supervised" (every supervised position) or
    # "labelled" (only those whose next token is known; cross-entropy has nothing to learn elsewhere).
    counts: str = "supervised"
    summary: str = ""
    # A divergence of the two next-token distributions that stays one between coarser distributions:
    # applied to the top-K-plus-tail buckets of a sparse teacher (rlkd.objectives.sparse_teacher) it
    # is the mass-preserving sparse loss.
    sparse_teacher: bool = False

    @property
    def supports_sparse_teacher(self) -> bool:
        """Whether it can train against a top-K teacher cache (one that reads no teacher always can)."""
        return self.sparse_teacher or not self.needs_teacher

    def resolve_params(self, params: Mapping[str, object] | None) -> dict[str, float]:
        """Defaults overlaid with ``params``, each checked against its declared bounds."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"objective {self.name!r}: unknown parameter(s) {unknown}; allowed: {allowed}")
        resolved = dict(self.defaults)
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"objective {self.name!r}: parameter {key!r} must be a number, got {value!r}")
            value = float(value)
            lo, hi = self.bounds.get(key, (-math.inf, math.inf))
            if not (lo <= value <= hi) or math.isnan(value):
                raise ValueError(f"objective {self.name!r}: parameter {key!r}={value} outside [{lo}, {hi}]")
            resolved[key] = value
        return resolved


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    *,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    needs_teacher: bool = True,
    needs_labels: bool = False,
    counts: str = "supervised",
    sparse_teacher: bool = False,
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``fn`` under ``name``; its keyword-only arguments are its hyperparameters.

    The declaration tells the engine what the objective needs: ``needs_teacher`` (teacher logits),
    ``needs_labels`` (the next token at each position) and ``counts`` (which positions its mean is
    over: ``"supervised"`` or ``"labelled"``) and ``sparse_teacher`` (its function, given the
    log-probabilities of a sparse teacher's top-K ids plus one tail bucket and the student's on the same
    buckets, computes the loss against that teacher: true of a divergence between two distributions
    that reads nothing but their probabilities)."""
    if counts not in ("supervised", "labelled"):
        raise ValueError(f"objective {name!r}: counts must be 'supervised' or 'labelled', got {counts!r}")

    def decorate(fn: ObjectiveFn) -> ObjectiveFn:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered by {_REGISTRY[name].fn.__module__}")
        signature = inspect.signature(fn)
        defaults = {}
        for param in signature.parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                if param.default is inspect.Parameter.empty:
                    raise TypeError(f"objective {name!r}: hyperparameter {param.name!r} needs a default")
                defaults[param.name] = float(param.default)
        unknown_bounds = set(bounds or {}) - set(defaults)
        if unknown_bounds:
            raise TypeError(f"objective {name!r}: bounds for unknown parameters {sorted(unknown_bounds)}")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        spec = ObjectiveSpec(name, fn, defaults, dict(bounds or {}), needs_teacher, needs_labels, counts, summary,
                             sparse_teacher=sparse_teacher)
        spec.resolve_params({})  # the defaults themselves must satisfy the bounds
        if not is_builtin(spec):
            check_objective(spec)
        _REGISTRY[name] = spec
        return fn

    return decorate


def is_builtin(spec: ObjectiveSpec) -> bool:
    """rlkd's own objectives, whose values and gradients tests/objectives/ checks; only plug-ins are
    probed (a probe at import would also warm up autograd before the memory probes' baselines)."""
    return spec.fn.__module__.startswith("rlkd.objectives.")


class ObjectiveCheckError(ValueError):
    """An objective does not return one finite, differentiable loss per position."""


PROBE_ROWS, PROBE_VOCAB = 4, 7


def objective_origin(fn: ObjectiveFn) -> str:
    """Where an objective's function is defined (file:line), to name a plug-in in messages."""
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return fn.__module__


def check_objective(spec: ObjectiveSpec, params: Mapping[str, float] | None = None) -> None:
    """Call the objective on a tiny random input (4 positions x 7 logits): it must return a tensor of
    shape [4], finite, with a finite gradient reaching the student logits. A plug-in that returns a
    scalar would be broadcast to every position (the loss multiplied by their number), one that
    returns [N, V] would fail deep in training, and a NaN would stop it at step 1: all are refused
    here, at a plug-in's registration (defaults) and at config time (the configured parameters)."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(PROBE_ROWS, PROBE_VOCAB, generator=generator).requires_grad_(True)
    teacher = torch.randn(PROBE_ROWS, PROBE_VOCAB, generator=generator) if spec.needs_teacher else None
    labels = torch.randint(0, PROBE_VOCAB, (PROBE_ROWS,), generator=generator)
    resolved = dict(spec.defaults) | dict(params or {})
    shown = f" with {resolved}" if params else ""
    where = f"objective {spec.name!r} ({objective_origin(spec.fn)}){shown}"
    with torch.enable_grad():
        try:
            value = spec.fn(student, teacher, labels, **resolved)
        except Exception as exc:  # noqa: BLE001 - any failure on a valid input is the objective's
            raise ObjectiveCheckError(f"{where}: fails on a random input of {PROBE_ROWS} positions x {PROBE_VOCAB} "
                                      f"logits: {type(exc).__name__}: {exc}") from None
        if not isinstance(value, torch.Tensor):
            raise ObjectiveCheckError(f"{where}: returns {type(value).__name__}, not a tensor of one loss per position")
        if tuple(value.shape) != (PROBE_ROWS,):
            raise ObjectiveCheckError(f"{where}: returns shape {list(value.shape)} for logits of shape "
                                      f"[{PROBE_ROWS}, {PROBE_VOCAB}]; an objective returns one loss per position, "
                                      f"shape [N] ([{PROBE_ROWS}] here)")
        if not torch.isfinite(value).all():
            raise ObjectiveCheckError(f"{where}: returns {value.detach().tolist()} (not finite) on finite logits")
        if not value.requires_grad:
            raise ObjectiveCheckError(f"{where}: its value carries no gradient to the student logits")
        (grad,) = torch.autograd.grad(value.sum(), student, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        raise ObjectiveCheckError(f"{where}: its gradient with respect to the student logits is "
                                  f"{'missing' if grad is None else 'not finite'}")


def get_objective(name: str) -> ObjectiveSpec:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; registered objectives: {', '.join(list_objectives())}") from None


def list_objectives() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def _load_entry_points() -> None:
    # The built-ins are registered by the package's __init__, which Python runs before this module;
    # installed plug-ins (entry-point group rlkd.objectives) are imported on the first lookup.
    from rlkd.plugins import load_entry_points

    load_entry_points()
