"""Benchmark grid specs: YAML -> validated spec -> the list of cells it describes.

A spec is tasks x objectives x ranking variants x seeds x parameter sweeps, with shared training
defaults. Objectives are referenced by their registry name (``rlkd.objectives.list_objectives()``),
so an objective registered by a plug-in appears in a grid without touching this module.

Every cell is a plain dict; its id is readable (task, method, sweep values, seed) and ends with a
hash of the cell's semantic config, so a cell's results directory is found again after a restart
and a changed config never reuses stale results.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Ranking settings of each built-in variant, overlaid on the spec's `ranking` defaults.
BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"enabled": False},
    "R": {"enabled": True, "mode": "fixed", "correlation": "spearman"},
    "R_dynamic": {"enabled": True, "mode": "dynamic", "correlation": "spearman"},
    "rank_only": {"enabled": True, "mode": "rank_only", "correlation": "spearman"},
    "pearson": {"enabled": True, "mode": "fixed", "correlation": "pearson"},
    "rank_only_pearson": {"enabled": True, "mode": "rank_only", "correlation": "pearson"},
}
# Sweep shorthands: `k: [5, 15]` means the ranking range.
SWEEP_ALIASES = {"k": "loss.ranking.k", "ranking.k": "loss.ranking.k"}
SWEEP_ROOTS = ("loss.", "train.", "eval.")
RANKING_DEFAULTS = {
    "k": 5,
    "rank_weight": 2.0,
    "base_weight": 1.0,
    "scores": "logits",
    "fidelity": "paper",
}


class SpecError(ValueError):
    """A spec file is invalid; the message names the file and the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectiveRef(_Strict):
    name: str
    params: dict[str, float] = Field(default_factory=dict)
    label: str | None = None  # row label in tables; default: the upper-cased name
    train: dict[str, Any] = Field(default_factory=dict)  # training overrides for this row (SeqKD/FD data)


class VariantSpec(_Strict):
    name: str
    ranking: dict[str, Any] = Field(default_factory=dict)
    objectives: list[str] | None = None  # restrict to these objective names/labels
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] | None = None  # replaces the spec's seeds for this variant (e.g. extra seeds for KL)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in BUILTIN_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(BUILTIN_VARIANTS)}")
        return name


class TaskSpec(_Strict):
    name: str
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise ValueError(f"task name {name!r} must be letters, digits, '_' or '.'")
        return name


class GridSpec(_Strict):
    name: str
    description: str = ""
    layout: str | None = None  # table layout in rlkd.bench.layouts; default: generic
    defaults: dict[str, Any] = Field(default_factory=dict)  # training config shared by all cells
    eval: dict[str, Any] = Field(default_factory=dict)  # evaluation settings shared by all cells
    ranking: dict[str, Any] = Field(default_factory=dict)
    temperature: float = 1.0
    tasks: list[TaskSpec] = Field(min_length=1)
    objectives: list[ObjectiveRef] = Field(default_factory=list)
    variants: list[VariantSpec] = Field(default_factory=lambda: [VariantSpec(name="none"), VariantSpec(name="R")])
    rank_only_objective: str = "kl"  # the base loss slot of Rank-only cells (unused by the loss)
    seeds: list[int] = Field(default_factory=lambda: [72], min_length=1)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    references: list[Literal["teacher", "student"]] = Field(default_factory=list)
    # Evaluation-only rows: {row label: model}, each scored against the teacher (the paper's Table 3
    # scores Llama-2 and OpenELM models against Llama-2-70B).
    candidates: dict[str, str] = Field(default_factory=dict)
    tiny: dict[str, Any] = Field(default_factory=dict)  # deep-merged over the spec by --tiny
    paper: dict[str, Any] = Field(default_factory=dict)  # the paper's setup, for the preset test

    @field_validator("objectives", "variants", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        """A bare string in either list is shorthand for ``{name: <string>}``."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep_paths(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in sweep.items():
            _sweep_path(key)
            if not values:
                raise ValueError(f"sweep {key!r} has no values")
        return sweep

    @model_validator(mode="after")
    def _variant_sweeps(self) -> "GridSpec":
        for variant in self.variants:
            for key in variant.sweep:
                _sweep_path(key)
        unknown = set(self.ranking) - set(RANKING_DEFAULTS)
        if unknown:
            raise ValueError(f"ranking: unknown key(s) {sorted(unknown)}; known: {sorted(RANKING_DEFAULTS)}")
        return self


def _sweep_path(key: str) -> str:
    path = SWEEP_ALIASES.get(key, key)
    if not path.startswith(SWEEP_ROOTS):
        raise ValueError(f"sweep key {key!r} must be 'k' or start with one of {', '.join(SWEEP_ROOTS)}")
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: nested dicts merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid benchmark spec"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse_spec(
    raw: Any,
    *,
    source: str = "<spec>",
    default_name: str | None = None,
    tiny: bool = False,
    registry: Callable[[], list[str]] | None = None,
) -> GridSpec:
    """Validate a spec mapping (as read from YAML); ``tiny`` applies its ``tiny:`` override."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a benchmark spec must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    if tiny:
        if not raw.get("tiny"):
            raise SpecError(f"{source}: --tiny given but the spec has no 'tiny:' section")
        raw = deep_merge(raw, raw["tiny"])
    try:
        spec = GridSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(source, exc)) from None
    _check_objectives(spec, source, registry)
    return spec


def load_spec(path: str | Path, *, tiny: bool = False, registry: Callable[[], list[str]] | None = None) -> GridSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: benchmark spec not found")
    raw = _read_with_extends(path, seen=())
    return parse_spec(raw, source=str(path), default_name=path.stem, tiny=tiny, registry=registry)


# Sections an `extends:` child merges into its base; every other key replaces the base's value.
_MERGED_SECTIONS = ("defaults", "eval", "ranking", "tiny")


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> Any:
    if path.resolve() in seen:
        raise SpecError(f"{path}: 'extends' cycle through {', '.join(str(p) for p in seen)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    raw = dict(raw)
    base_path = path.parent / str(raw.pop("extends"))
    if not base_path.is_file():
        raise SpecError(f"{path}: extends: {base_path} not found")
    base = _read_with_extends(base_path, seen + (path.resolve(),))
    if not isinstance(base, dict):
        raise SpecError(f"{base_path}: a benchmark spec must be a mapping")
    merged = {k: v for k, v in base.items() if k != "name"}
    for key, value in raw.items():
        if key in _MERGED_SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _registered_objectives() -> list[str]:
    from rlkd.objectives import list_objectives

    return list(list_objectives())


def _check_objectives(spec: GridSpec, source: str, registry: Callable[[], list[str]] | None) -> None:
    known = (registry or _registered_objectives)()
    names = [(f"objectives.{i}.name", ref.name) for i, ref in enumerate(spec.objectives)]
    if any(v.name.startswith("rank_only") for v in spec.variants):
        names.append(("rank_only_objective", spec.rank_only_objective))
    for where, name in names:
        if name not in known:
            raise SpecError(f"{source}: {where}: unknown objective {name!r}; registered: {', '.join(known)}")
    if registry is None:
        from rlkd.objectives import get_objective

        for i, ref in enumerate(spec.objectives):
            try:
                get_objective(ref.name).resolve_params(ref.params)
            except (ValueError, TypeError) as exc:
                raise SpecError(f"{source}: objectives.{i}.params: {exc}") from None
    labels = [objective_label(ref) for ref in spec.objectives]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SpecError(f"{source}: objectives: duplicate row label(s) {duplicates}; give each a distinct 'label'")


# ---------------------------------------------------------------------------------------------
# Expansion


def objective_label(ref: ObjectiveRef) -> str:
    """The row label: the given one, else the name upper-cased plus every non-default
    hyperparameter (e.g. ``JSD(beta=0.1)``), so rows with different conventions never merge."""
    if ref.label:
        return ref.label
    from rlkd.objectives import get_objective

    try:
        defaults = get_objective(ref.name).defaults
    except KeyError:  # a name known only to an injected test registry
        defaults = {}
    changed = {k: v for k, v in sorted(ref.params.items()) if float(v) != defaults.get(k)}
    suffix = ",".join(f"{k}={v:g}" for k, v in changed.items())
    return ref.name.upper() + (f"({suffix})" if suffix else "")


def method_label(objective: str | None, variant: str, ranking: dict[str, Any]) -> str:
    """The paper's row names: KL, KL+R, KL+R (Dynamic), Rank-5, KL+R (Pearson), Rank-5 (Pearson)."""
    k = ranking.get("k")
    return {
        "none": f"{objective}",
        "R": f"{objective}+R",
        "R_dynamic": f"{objective}+R (Dynamic)",
        "pearson": f"{objective}+R (Pearson)",
        "rank_only": f"Rank-{k}",
        "rank_only_pearson": f"Rank-{k} (Pearson)",
    }[variant]


def config_hash(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"sweep path {dotted!r} crosses non-mapping {part!r}")
    node[leaf] = value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.=_-]+", "_", text).strip("_")


def _sweep_value_slug(key: str, value: Any) -> str:
    short = key.rsplit(".", 1)[-1]
    return f"{short}={value}"


def _make_cell(spec: GridSpec, task: TaskSpec, semantic: dict[str, Any], method: str, sweep: dict[str, Any],
               objective_label: str | None = None, variant: str | None = None) -> dict[str, Any]:
    digest = config_hash(semantic)
    parts = [task.name, _slug(method)]
    parts += [_slug(_sweep_value_slug(k, v)) for k, v in sorted(sweep.items())]
    parts += [f"s{semantic['seed']}" if semantic.get("seed") is not None else "ref", digest[:10]]
    return {
        "id": "-".join(p for p in parts if p),
        "spec": spec.name,
        "method": method,
        # Tables pair X with X+R by these fields, never by parsing labels (a user label may hold "+R").
        "objective_label": objective_label,
        "variant": variant,
        "sweep": {k.rsplit(".", 1)[-1]: v for k, v in sweep.items()},
        "config_hash": digest,
        **semantic,
    }


def expand(spec: GridSpec) -> list[dict[str, Any]]:
    """Every cell of the grid, in a stable order, duplicates (same config hash) removed."""
    cells: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(cell: dict[str, Any]) -> None:
        if cell["config_hash"] not in seen:
            seen.add(cell["config_hash"])
            cells.append(cell)

    ranking_base = {**RANKING_DEFAULTS, **spec.ranking}
    for task in spec.tasks:
        train = deep_merge(spec.defaults, task.train)
        evaluation = deep_merge(spec.eval, task.eval)
        # A reference row scores the base models, unless a fine-tuning stage makes them or it is
        # scored on the training sequences: then the training keys define it too.
        whole = any(k in train for k in ("teacher_sft", "student_sft")) or evaluation.get("source") == "train"
        reference_train = dict(train) if whole else {k: train[k] for k in ("teacher", "student") if k in train}
        for reference in spec.references:
            semantic = {"task": task.name, "kind": "reference", "reference": reference, "seed": None, "loss": None,
                        "train": reference_train, "eval": evaluation}
            add(_make_cell(spec, task, semantic, "Teacher" if reference == "teacher" else "Start", {}))
        for label, model in spec.candidates.items():
            semantic = {"task": task.name, "kind": "reference", "reference": "candidate", "seed": None, "loss": None,
                        "train": {**reference_train, "candidate": model}, "eval": evaluation}
            add(_make_cell(spec, task, semantic, label, {}))
        for variant in spec.variants:
            rank_only = variant.name.startswith("rank_only")
            if rank_only:
                targets = [(spec.rank_only_objective, {}, None, {})]
            else:
                # A row with its own label (e.g. FD = kl on teacher generations) is selected only by that label.
                targets = [
                    (ref.name, ref.params, objective_label(ref), ref.train)
                    for ref in spec.objectives
                    if variant.objectives is None or objective_label(ref) in variant.objectives
                    or (ref.label is None and ref.name in variant.objectives)
                ]
            ranking = {**ranking_base, **BUILTIN_VARIANTS[variant.name], **variant.ranking}
            sweep = {_sweep_path(k): v for k, v in {**spec.sweep, **variant.sweep}.items()}
            if not ranking["enabled"]:
                # k and friends mean nothing without the ranking loss: do not multiply such cells.
                ranking = {"enabled": False}
                sweep = {k: v for k, v in sweep.items() if not k.startswith("loss.ranking.")}
            keys = list(sweep)
            for objective, params, label, train_override in targets:
                row_train = deep_merge(train, train_override)
                for combo in itertools.product(*(sweep[k] for k in keys)):
                    for seed in (variant.seeds or spec.seeds):
                        semantic = {
                            "task": task.name,
                            "kind": "distill",
                            "reference": None,
                            "seed": seed,
                            "loss": {"objective": objective, "params": dict(params),
                                     "temperature": spec.temperature, "ranking": dict(ranking)},
                            "train": copy.deepcopy(row_train),
                            "eval": copy.deepcopy(evaluation),
                        }
                        chosen = dict(zip(keys, combo))
                        for path, value in chosen.items():
                            _set_path(semantic, path, value)
                        method = method_label(label, variant.name, semantic["loss"]["ranking"])
                        add(_make_cell(spec, task, semantic, method, chosen,
                                       None if rank_only else label, variant.name))
    return cells


def filter_cells(cells: list[dict[str, Any]], pattern: str | None) -> list[dict[str, Any]]:
    """``--only``: comma-separated terms, a cell is kept when any term selects it. A term that is a
    method label or task name of the grid (``KL+R``, ``Rank-15``, ``gsm8k``) selects exactly those
    cells; ``re:PATTERN`` is a regex searched in the cell id; anything else is a glob on the id
    (``*-s72-*``) or, without glob characters, a substring of it."""
    if not pattern:
        return cells
    labels = {c["method"] for c in cells} | {c["task"] for c in cells}
    matchers = []
    for term in (t.strip() for t in pattern.split(",")):
        if not term:
            continue
        if term in labels:
            matchers.append(lambda c, t=term: t in (c["method"], c["task"]))
        elif term.startswith("re:"):
            try:
                rx = re.compile(term[3:])
            except re.error as exc:
                raise SpecError(f"--only: bad regex {term[3:]!r}: {exc}") from None
            matchers.append(lambda c, rx=rx: rx.search(c["id"]) is not None)
        elif any(ch in term for ch in "*?["):
            matchers.append(lambda c, t=term: fnmatch.fnmatchcase(c["id"], t))
        else:
            matchers.append(lambda c, t=term: t in c["id"])
    return [c for c in cells if any(m(c) for m in matchers)]
