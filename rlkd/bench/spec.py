"""Benchmark grid specs: YAML -> validated spec -> the list of cells it describes.

A spec is tasks x objectives x ranking variants x seeds x parameter sweeps. Every training setting
is written in the run-config schema of ``rlkd train`` (:class:`rlkd.config.RunConfig`): the spec's
``defaults``, each task's ``run``, each objective's and variant's ``run`` and each sweep path are
partial RunConfig trees, deep-merged in that order. Every cell's merged tree is validated by
RunConfig while the spec is parsed, so a bad value anywhere (``loss.ranking.k: 0``, an unknown key,
an unknown objective, a hyperparameter out of bounds, a sweep over a path that does not exist) stops
before any work, naming the spec file and the dotted field.

What is not a training setting is the benchmark's own: cached stages run once per task
(``stages: {teacher_sft: RUN, student_sft: RUN}``: cross-entropy fine-tuning of the teacher, or of the
student, overlaid on the task's run; ``student_heal: RUN``: a distillation of the student of its own,
run before those and shared across specs), ``teacher_cache``, teacher generations for SeqKD/FD rows,
``eval:`` and the reference/candidate rows.

Every cell is a :class:`rlkd.bench.records.Cell`; its id is readable (task, method, sweep values, seed) and ends with a
hash of the cell's canonical config (defaults left out), so a cell's results directory is found
again after a restart and a changed config never reuses stale results.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from rlkd.bench.layout_schema import LayoutDeclaration, shipped_layout_names
from rlkd.bench.records import Cell, CellArm
from rlkd.config import RunConfig

# Ranking settings of each built-in variant, laid over the spec's `loss.ranking` defaults.
BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"enabled": False},
    "R": {"enabled": True, "mode": "fixed", "correlation": "spearman"},
    "R_dynamic": {"enabled": True, "mode": "dynamic", "correlation": "spearman"},
    "rank_only": {"enabled": True, "mode": "rank_only", "correlation": "spearman"},
    "pearson": {"enabled": True, "mode": "fixed", "correlation": "pearson"},
    "rank_only_pearson": {"enabled": True, "mode": "rank_only", "correlation": "pearson"},
}
RANKED_VARIANTS = ("R", "R_dynamic", "pearson")
# Sweep shorthand: `k: [5, 15]` means the ranking range.
SWEEP_ALIASES = {"k": "loss.ranking.k"}
PLACEHOLDER_OUTPUT = "<cell>"
# A top-K teacher cache is validated against this folder: the benchmark fills in the cell's real
# cache folder (the spec's `teacher_cache: true`) only when the cell runs.
PLACEHOLDER_TEACHER_CACHE = "<teacher cache>"
# The training seed of a spec that names none, and of a cached stage (part of every stage's config
# hash, so of the cell ids that depend on it: never change it).
DEFAULT_SEED = 72


# A spec's layout: a shipped layout's name or a declaration of its own; the callable discriminator
# makes a bad declaration's errors name its fields (layout.declaration.headlines.0...), not the union.
NamedOrDeclaredLayout = Annotated[Union[Annotated[str, Tag("name")], Annotated[LayoutDeclaration, Tag("declaration")]],
                                  Discriminator(lambda value: "name" if isinstance(value, str) else "declaration")]


class SpecError(ValueError):
    """A spec file is invalid; the message names the file and the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlignmentSet(_Strict):
    source: Literal["text", "train"] = Field(
        "text", description="alignment: score on slices of a text file (text_path) or on the cell's own "
        "training sequences (train).")
    text_path: str | None = Field(None, description="alignment, source text: a JSONL file of documents, absolute "
                                  "or relative to data_dir.")
    text_field: str = Field("text", description="alignment: the JSONL key that holds each document's text.")
    data_dir: str | None = Field(None, description="Folder that relative data paths are read from; None: "
                                 "RLKD_DATA_DIR, else ../shared/data.")
    skip_rows: int = Field(0, ge=0, description="alignment: documents passed over first, e.g. those the run "
                           "trained on.")
    max_rows: int | None = Field(None, ge=1, description="alignment: documents read after skip_rows; None: to the "
                                 "end of the file.")   # documents read after skip_rows (None: to the end)
    slice_len: int = Field(128, ge=2, description="alignment: tokens per scored slice of text.")
    max_slices: int | None = Field(None, ge=1, description="alignment: slices scored at most; None: every slice "
                                   "of the documents read.")
    batch_size: int = Field(4, ge=1, description="alignment: slices per forward pass.")


class EvalSpec(AlignmentSet):
    """How a cell's model is scored (``eval:`` of a spec or task). ``kind``: ``task`` (an
    ``rlkd eval`` task), ``alignment`` (CR/MOR/PPL against the teacher) or ``synthetic`` (the
    embedded benchmark's known source)."""

    kind: Literal["task", "alignment", "synthetic"] = Field(
        "task", description="task: an `rlkd eval` task's score; alignment: CR@k, MOR@k and perplexity against "
        "the teacher; synthetic: the embedded benchmark's scores against its known source.")
    task: str | None = Field(None, description="task: which `rlkd eval` task scores the cell; None: the spec "
                             "task's name.")
    data_path: str | None = Field(None, description="task: an explicit JSONL file of test rows instead of the "
                                  "task's own.")
    limit: int | None = Field(None, ge=1, description="task: score the first N test rows only; None: all.")
    max_new_tokens: int | None = Field(None, ge=1, description="task: longest generated answer, in tokens; None: "
                                       "the task's default.")
    batch_size: int = Field(8, ge=1, description="Prompts (task) or slices (alignment) per forward pass (memory, "
                            "not results).")
    protocol: str | None = Field(None, description="task: greedy (the paper's) or minillm (sampling over seeds); "
                                 "None: the task's default.")
    rouge_pkg: bool = Field(False, description="task: also score ROUGE with the `rouge` package the paper used "
                            "(rouge_pkg_* metrics, shown untested beside rouge-score's).")
    extra_sets: dict[str, AlignmentSet] = Field(default_factory=dict, description="alignment: further sets to "
                                                "score, by name; their metrics are prefixed with it (e.g. heldout_).")
    heldout: str | None = Field(None, description="synthetic: the file of held-out sequences.")
    downstream: str | None = Field(None, description="synthetic: the file of prompt/answer rows (exact match).")
    synthetic_source: dict[str, int] | None = Field(None, description="synthetic: the Markov source's settings "
                                                    "(rlkd.data.synthetic.SourceConfig).")


class Decoding(_Strict):
    max_new_tokens: int = Field(256, ge=1, description="Longest teacher response generated for SeqKD/FD rows, in "
                                "tokens.")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")


class Stages(_Strict):
    """Cross-entropy stages run once per task and cached; each is a partial run config laid over
    the task's run (defaults + task ``run``). ``teacher_sft`` fine-tunes the teacher (the paper's
    Dolly/XSum teachers); ``student_sft`` the student (e.g. healing a layer-pruned copy)."""

    teacher_sft: dict[str, Any] | None = Field(None, description="A partial run config: cross-entropy "
                                               "fine-tuning of the teacher on the task before any cell (the "
                                               "paper's Dolly/XSum teachers); None: the teacher as given.")
    student_sft: dict[str, Any] | None = Field(None, description="A partial run config: cross-entropy "
                                               "fine-tuning of the student before distillation; None: none.")
    # A complete run config of its own (teacher, data, loss) that distils the task's student before
    # anything else, e.g. healing a layer-pruned copy on general text. Keyed by its config alone, it
    # runs once for every spec that names the same healing (kept in <results>/../.stages).
    student_heal: dict[str, Any] | None = Field(None, description="A complete run config that distils the "
                                                "student first (e.g. healing a layer-pruned copy), shared by "
                                                "every spec naming the same one; None: none.")


class ObjectiveRef(_Strict):
    name: str | None = Field(None, description="A registered objective's name; omit when run.loss.terms "
                             "composes the row's loss.")
    params: dict[str, float] = Field(default_factory=dict, description="The objective's hyperparameters; "
                                     "left-out ones take its declared defaults.")
    label: str | None = Field(None, description="The row's label in tables and cell ids; None: the upper-cased "
                              "name (with its non-default params).")
    run: dict[str, Any] = Field(default_factory=dict, description="A partial run config for this row, laid over "
                                "the defaults and the task's run.")
    teacher_generations: bool = Field(False, description="Train on the teacher's greedy responses instead of the "
                                      "dataset's (SeqKD, FD); generation sets their decoding.")


class VariantSpec(_Strict):
    name: str = Field(description="How the ranking loss is used: none, R, R_dynamic, rank_only, pearson or "
                      "rank_only_pearson.")
    run: dict[str, Any] = Field(default_factory=dict, description="A partial run config for this variant's "
                                "cells (e.g. loss.ranking.k), laid over the objective's.")
    objectives: list[str] | None = Field(None, description="Run this variant for these objective names or "
                                         "labels only; None: every objective row.")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted run-config paths and their "
                                        "values swept for this variant only (k is short for loss.ranking.k).")
    seeds: list[int] | None = Field(None, description="Seeds for this variant's cells instead of the spec's "
                                    "(e.g. extra seeds for one pair); None: the spec's seeds.")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in BUILTIN_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(BUILTIN_VARIANTS)}")
        return name


class TaskSpec(_Strict):
    name: str = Field(description="The task's name in cell ids and result columns (letters, digits, _ and .); "
                      "also the default eval task.")
    run: dict[str, Any] = Field(default_factory=dict, description="A partial run config for this task's cells "
                                "(data, models, train), laid over the spec's defaults.")
    stages: Stages | None = Field(None, description="Stages for this task instead of the spec's; None: the "
                                  "spec's stages.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Evaluation settings for this task (the eval "
                                 "section's keys), laid over the spec's eval.")

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise ValueError(f"task name {name!r} must be letters, digits, '_' or '.'")
        return name


class GridSpec(_Strict):
    name: str = Field(description="The spec's name: results go to results/<name>/; a spec file's name defaults "
                      "to its file name.")
    description: str = Field("", description="Free text describing the spec.")
    layout: NamedOrDeclaredLayout | None = Field(
        None, description="The table layout `rlkd table` uses: a shipped layout's name (generic, table1 ... "
        "table8, mini_table1, mini_table2, default: rlkd/bench/table_layouts/) or a declaration of the spec's own "
        "(columns, headlines, paper table, row order); None: generic, every metric tabulated.")
    plugins: list[str] = Field(default_factory=list, description="Modules or .py files (relative to the spec) "
                               "that register extra objectives.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="A partial run config shared by every "
                                     "cell; tasks, objectives and variants are laid over it.")
    stages: Stages = Field(default_factory=Stages, description="Cached stages run once before the cells that "
                           "need them (teacher/student SFT, student healing).")
    teacher_cache: bool = Field(False, description="Compute the teacher's logits over the training samples once "
                                "and let every cell read them (exact; saves a teacher forward per step).")
    generation: Decoding = Field(default_factory=Decoding, description="Decoding of the teacher's responses for "
                                 "rows with teacher_generations (SeqKD, FD).")
    keep_checkpoints: bool = Field(False, description="Keep each cell's export and checkpoints after it is "
                                   "evaluated; false deletes them to save disk.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Evaluation settings shared by every cell "
                                 "(the eval section's keys); a task's eval is laid over them.")
    tasks: list[TaskSpec] = Field(min_length=1, description="The grid's tasks; each cell belongs to one.")
    objectives: list[ObjectiveRef] = Field(default_factory=list, description="The objective rows; each runs "
                                           "under every variant. A bare string is a registry name.")
    variants: list[VariantSpec] = Field(default_factory=lambda: [VariantSpec(name="none"), VariantSpec(name="R")],
                                        description="Ranking variants each objective row runs under; the verdict "
                                        "pairs none with each ranked one. A bare string is a name.")
    rank_only_objective: str = Field("kl", description="The base-loss slot written in Rank-only cells' configs; "
                                     "their loss does not use it.")
    seeds: list[int] = Field(default_factory=lambda: [DEFAULT_SEED], min_length=1, description="Training seeds of every "
                             "cell; the seed tests of the verdict need ≥ 3 per pair.")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted run-config paths (eval.* for "
                                        "evaluation settings; k for loss.ranking.k) and the values to sweep; "
                                        "cells are the product.")
    references: list[Literal["teacher", "student"]] = Field(default_factory=list, description="Rows scored "
                                                             "without distillation: the teacher (Teacher) and "
                                                             "the student as the cells start from it (Start).")
    # Evaluation-only rows: {row label: model}, each scored against the teacher (the paper's Table 3
    # scores Llama-2 and OpenELM models against Llama-2-70B).
    candidates: dict[str, str] = Field(default_factory=dict, description="Evaluation-only rows, {label: model}, "
                                       "each scored against the teacher (the paper's Table 3).")
    tiny: dict[str, Any] = Field(default_factory=dict, description="Overrides deep-merged over the spec by "
                                 "--tiny: small local models and few rows, for a CPU check.")
    paper: dict[str, Any] = Field(default_factory=dict, description="The paper's setup for this preset, checked "
                                  "by the preset tests; not used to run cells.")

    @field_validator("layout")
    @classmethod
    def _shipped(cls, layout: str | LayoutDeclaration | None) -> str | LayoutDeclaration | None:
        if isinstance(layout, str) and layout not in shipped_layout_names():
            raise ValueError(f"unknown table layout {layout!r}; known: {', '.join(shipped_layout_names())}, or a "
                             "declaration (name, title, sections, headlines, ...)")
        return layout

    def with_seeds(self, seeds: list[int]) -> "GridSpec":
        """This spec with every cell on ``seeds`` (``rlkd bench --seeds``): the spec's own seeds and a
        variant's (e.g. mini Table 2's 5 seeds per ±R pair, 3 for SFT) alike, so ``--seeds 1`` runs
        seed 1 of every row; cells of seeds already finished are reused as always."""
        variants = [variant.model_copy(update={"seeds": None}) for variant in self.variants]
        return self.model_copy(update={"seeds": list(seeds), "variants": variants})

    @field_validator("objectives", "variants", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        """A bare string in either list is shorthand for ``{name: <string>}``."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


# ---------------------------------------------------------------------------------------------
# Small helpers


def tree_get(tree: dict[str, Any], *keys: str) -> Any:
    """``tree[k1][k2]...`` of a partial run tree, None where a level is missing or null (a spec may
    write ``models:`` with nothing under it)."""
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: nested dicts merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def config_hash(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise SpecError("--seeds: no seed given")
    return seeds


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X | Y]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is dict or annotation is dict or any(_is_mapping(a) for a in typing.get_args(annotation))


def check_path(model: type[BaseModel], dotted: str) -> None:
    """Raise ValueError unless ``dotted`` names a field of ``model`` (or a key inside a dict field)."""
    current: type[BaseModel] | None = model
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        fields = current.model_fields if current is not None else {}
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"{'.'.join(parts[:index + 1])!r} is not a setting (known here: {known})")
        annotation = fields[part].annotation
        if _is_mapping(annotation) and _model_of(annotation) is None:
            return  # e.g. loss.params.beta: a free-form mapping
        current = _model_of(annotation)
        if current is None and index < len(parts) - 1:
            raise ValueError(f"{'.'.join(parts[:index + 1])!r} is a value, not a section")


def sweep_path(key: str) -> str:
    """The full dotted path of a sweep key; raises ValueError if it names no setting."""
    path = SWEEP_ALIASES.get(key, key)
    if path.startswith("eval."):
        check_path(EvalSpec, path.removeprefix("eval."))
    else:
        check_path(RunConfig, path)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.=_-]+", "_", text).strip("_")


def _error_lines(error: ValidationError, prefix: str = "") -> list[str]:
    from rlkd.config import validation_lines

    return validation_lines(error, prefix)


# ---------------------------------------------------------------------------------------------
# Loading


def yaml_error_text(path, exc: Exception) -> str:
    """A YAML error as one line naming where the broken construct starts (an unclosed ``{`` or
    ``[``), not only where the parser gave up, which is often lines later."""
    problem, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    if problem is None:
        return f"{path}: not valid YAML ({exc})"
    at = f"line {problem.line + 1}, column {problem.column + 1}"
    if context is not None and getattr(exc, "context", None):
        start = f"line {context.line + 1}, column {context.column + 1}"
        return (f"{path}:{context.line + 1}: not valid YAML: {exc.problem} at {at} ({exc.context} that starts "
                f"at {start})")
    return f"{path}:{problem.line + 1}: not valid YAML: {exc.problem} at {at}"


def load_spec(path: str | Path, *, tiny: bool = False, plugins: list[str] | tuple[str, ...] = ()) -> GridSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: benchmark spec not found")
    raw = _read_with_extends(path, seen=())
    return parse_spec(raw, source=str(path), default_name=path.stem, tiny=tiny, base_dir=path.parent,
                      plugins=plugins)


def parse_spec(raw: Any, *, source: str = "<spec>", default_name: str | None = None, tiny: bool = False,
               base_dir: Path | None = None, plugins: list[str] | tuple[str, ...] = ()) -> GridSpec:
    """Validate a spec mapping (as read from YAML) and every cell it expands to."""
    from rlkd.config import ConfigError, prepare_plugins

    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a benchmark spec must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    if tiny:
        if not raw.get("tiny"):
            raise SpecError(f"{source}: --tiny given but the spec has no 'tiny:' section")
        raw = deep_merge(raw, raw["tiny"])
    try:
        prepare_plugins(raw, list(plugins), base_dir, source)  # their objectives must validate
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    try:
        spec = GridSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError("\n".join([f"{source}: invalid benchmark spec"] + _error_lines(exc))) from None
    for where, sweep in [("sweep", spec.sweep)] + [(f"variants.{i}.sweep", v.sweep) for i, v in enumerate(spec.variants)]:
        for key, values in sweep.items():
            try:
                sweep_path(key)
            except ValueError as exc:
                raise SpecError(f"{source}: {where}.{key}: {exc}") from None
            if not isinstance(values, list) or not values:
                raise SpecError(f"{source}: {where}.{key}: a sweep needs a non-empty list of values")
    labels = [objective_label(ref) for ref in spec.objectives]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SpecError(f"{source}: objectives: duplicate row label(s) {duplicates}; give each a distinct 'label'")
    cells = expand(spec, source=source)  # every cell's run config and evaluation settings must validate
    if not spec.teacher_cache:
        for cell in cells:
            if cell.run.get("teacher_cache_top_k") is not None and not cell.run.get("teacher_cache"):
                raise SpecError(f"{source}: {cell.id}: teacher_cache_top_k needs the spec's `teacher_cache: true` "
                                "(the benchmark builds and shares the cache)")
    return spec


# Sections an `extends:` child merges into its base; every other key replaces the base's value.
_MERGED_SECTIONS = ("defaults", "eval", "stages", "generation", "tiny")


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> Any:
    if path.resolve() in seen:
        raise SpecError(f"{path}: 'extends' cycle through {', '.join(str(p) for p in seen)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(yaml_error_text(path, exc)) from None
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


# ---------------------------------------------------------------------------------------------
# Expansion


def objective_label(ref: ObjectiveRef) -> str:
    """The row label: the given one, else the name upper-cased plus every non-default
    hyperparameter (e.g. ``JSD(beta=0.1)``), so rows with different conventions never merge."""
    if ref.label:
        return ref.label
    from rlkd.objectives import LossConfig, get_objective

    if ref.name is None:
        terms = tree_get(ref.run, "loss", "terms") or []
        try:
            return LossConfig(terms=terms).base_label()
        except (ValueError, TypeError):
            return "+".join(str(t.get("objective", "?")).upper() for t in terms if isinstance(t, dict))
    try:
        defaults = get_objective(ref.name).defaults
    except KeyError:  # reported with the field path when the cell is validated
        defaults = {}
    changed = {k: v for k, v in sorted(ref.params.items()) if float(v) != defaults.get(k)}
    suffix = ",".join(f"{k}={v:g}" for k, v in changed.items())
    return ref.name.upper() + (f"({suffix})" if suffix else "")


def method_label(objective: str | None, variant: str, k: int | None) -> str:
    """The paper's row names: KL, KL+R, KL+R (Dynamic), Rank-5, KL+R (Pearson), Rank-5 (Pearson)."""
    return {
        "none": f"{objective}",
        "R": f"{objective}+R",
        "R_dynamic": f"{objective}+R (Dynamic)",
        "pearson": f"{objective}+R (Pearson)",
        "rank_only": f"Rank-{k}",
        "rank_only_pearson": f"Rank-{k} (Pearson)",
    }[variant]


def run_config(tree: dict[str, Any]) -> RunConfig:
    """A partial run tree validated as RunConfig (its output folder a placeholder, and so is the
    teacher cache's folder where the tree asks for a top-K cache without naming one)."""
    placeholders = {"output_dir": PLACEHOLDER_OUTPUT}
    if tree.get("teacher_cache_top_k") is not None and not tree.get("teacher_cache"):
        placeholders["teacher_cache"] = PLACEHOLDER_TEACHER_CACHE
    return RunConfig.model_validate({**tree, **placeholders})


def canonical_dump(config: RunConfig) -> dict[str, Any]:
    """A run config with every default left out: equal configs hash equally whether or not a
    default was spelled out, and a setting added to RunConfig later (with a default) does not
    change existing hashes."""
    dumped = config.model_dump(mode="json", exclude_defaults=True)
    dumped.pop("output_dir", None)
    if dumped.get("teacher_cache") == PLACEHOLDER_TEACHER_CACHE:
        del dumped["teacher_cache"]
    return dumped


def canonical_run(tree: dict[str, Any]) -> dict[str, Any]:
    """A run tree as RunConfig sees it, with every default left out (:func:`canonical_dump`)."""
    return canonical_dump(run_config(tree))


def _validated_config(tree: dict[str, Any], source: str, what: str) -> RunConfig:
    try:
        return run_config(tree)
    except ValidationError as exc:
        raise SpecError("\n".join([f"{source}: {what}: invalid run config"] + _error_lines(exc))) from None


def _validated_run(tree: dict[str, Any], source: str, what: str) -> dict[str, Any]:
    return canonical_dump(_validated_config(tree, source, what))


def _validated_eval(settings: dict[str, Any], source: str, what: str) -> None:
    try:
        EvalSpec.model_validate(settings)
    except ValidationError as exc:
        raise SpecError("\n".join([f"{source}: {what}: invalid eval settings"] + _error_lines(exc, "eval."))) from None


def stage_run(task_run: dict[str, Any], role: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run tree of a ``<role>_sft`` stage: the task's run with the stage's overrides, training
    the ``role`` model with cross-entropy (no teacher is loaded), DEFAULT_SEED unless given."""
    base = {k: v for k, v in task_run.items() if k not in ("loss", "seed")}
    tree = deep_merge(base, overrides)
    models = tree.setdefault("models", {})
    model = tree_get(task_run, "models", role)
    models["student"] = model  # the model being fine-tuned (cross-entropy loads no teacher)
    tree["loss"] = {"objective": "ce"}
    tree.setdefault("seed", DEFAULT_SEED)
    return tree


HEAL = "student_heal"  # the key of a cell's healing stage in ``Cell.stages`` (the others: "teacher", "student")


def stage_key(role: str) -> str:
    """The spec key of a cell's stage: ``student_heal``, ``teacher_sft`` or ``student_sft``."""
    return role if role == HEAL else f"{role}_sft"


def heal_run(task_run: dict[str, Any], heal: dict[str, Any]) -> dict[str, Any]:
    """The run tree of a ``student_heal`` stage: its own complete run (data, teacher, loss), training
    the task's student, DEFAULT_SEED unless given. Nothing of the task's run but the student enters it."""
    tree = copy.deepcopy(heal)
    tree.setdefault("models", {})["student"] = tree_get(task_run, "models", "student")
    tree.setdefault("seed", DEFAULT_SEED)
    return tree


def _make_cell(spec: GridSpec, task: TaskSpec, body: dict[str, Any], semantic: dict[str, Any], method: str,
               sweep: dict[str, Any]) -> Cell:
    """The cell of ``body``; its id ends with the hash of ``semantic``, the cell's canonical config
    (the hash of exactly this JSON is in every results folder's cell ids: never change it)."""
    digest = config_hash(semantic)
    parts = [task.name, _slug(method)]
    parts += [_slug(f"{k.rsplit('.', 1)[-1]}={v}") for k, v in sorted(sweep.items())]
    parts += [f"s{body['seed']}" if body["seed"] is not None else "ref", digest[:10]]
    arm = CellArm(method=method, objective_label=body["objective_label"], variant=body["variant"], seed=body["seed"],
                  sweep={k.rsplit(".", 1)[-1]: v for k, v in sweep.items()})
    rest = {k: v for k, v in body.items() if k not in CellArm.model_fields}
    return Cell(id="-".join(p for p in parts if p), spec=spec.name, config_hash=digest, arm=arm, **rest)


def expand(spec: GridSpec, *, source: str = "<spec>") -> list[Cell]:
    """Every cell of the grid, in a stable order, duplicates (same config hash) removed.

    Each is a :class:`rlkd.bench.records.Cell` (its fields are described there); a Rank-only row's
    label takes its ``k`` from the validated run config, so the default lives in RankingConfig alone."""
    cells: list[Cell] = []
    seen: set[str] = set()

    def add(cell: Cell) -> None:
        if cell.config_hash not in seen:
            seen.add(cell.config_hash)
            cells.append(cell)

    plugins = {"plugins": spec.plugins} if spec.plugins else {}
    for task in spec.tasks:
        where = f"tasks[{task.name}]"
        task_run = deep_merge(deep_merge(spec.defaults, plugins), task.run)
        evaluation = deep_merge(spec.eval, task.eval)
        _validated_eval(evaluation, source, where)
        stage_settings = task.stages or spec.stages
        stages = {role: stage_run(task_run, role, overrides)
                  for role, overrides in (("teacher", stage_settings.teacher_sft), ("student", stage_settings.student_sft))
                  if overrides is not None}
        if stage_settings.student_heal is not None:
            stages[HEAL] = heal_run(task_run, stage_settings.student_heal)
        stage_hashes = {role: _validated_run(tree, source, f"{where}: stages.{stage_key(role)}")
                        for role, tree in stages.items()}
        common = {"task": task.name, "stages": stages, "teacher_cache": spec.teacher_cache,
                  "keep_checkpoints": spec.keep_checkpoints, "eval": evaluation}

        # A reference row scores the base models, unless a stage makes them or it is scored on the
        # training sequences: then the run's data (or the stage) defines it too.
        on_train = evaluation.get("source") == "train"
        models = task_run.get("models") or {}
        reference_run = task_run if (stages or on_train) else {"models": {k: v for k, v in models.items()
                                                                          if k in ("teacher", "student")}}
        rows = [(ref, None) for ref in spec.references] + [("candidate", (label, model))
                                                           for label, model in spec.candidates.items()]
        for reference, candidate in rows:
            semantic = {"task": task.name, "kind": "reference", "reference": reference, "run": reference_run,
                        "stages": stage_hashes, "candidate": candidate[1] if candidate else None,
                        "teacher_cache": spec.teacher_cache if on_train else False, "eval": evaluation}
            method = candidate[0] if candidate else ("Teacher" if reference == "teacher" else "Start")
            add(_make_cell(spec, task, {**common, "kind": "reference", "reference": reference, "seed": None,
                                        "objective_label": None, "variant": None, "run": reference_run,
                                        "candidate": candidate[1] if candidate else None,
                                        "teacher_generations": None}, semantic, method, {}))

        for variant in spec.variants:
            rank_only = variant.name.startswith("rank_only")
            if rank_only:
                targets = [(ObjectiveRef(name=spec.rank_only_objective), None)]
            else:
                # A row with its own label (e.g. FD = kl on teacher generations) is selected only by that label.
                targets = [(ref, objective_label(ref)) for ref in spec.objectives
                           if variant.objectives is None or objective_label(ref) in variant.objectives
                           or (ref.label is None and ref.name in variant.objectives)]
            sweep = {sweep_path(k): v for k, v in {**spec.sweep, **variant.sweep}.items()}
            ranked = BUILTIN_VARIANTS[variant.name]["enabled"]
            if not ranked:
                # k and friends mean nothing without the ranking loss: do not multiply such cells.
                sweep = {k: v for k, v in sweep.items() if not k.startswith("loss.ranking.")}
            keys = list(sweep)
            for ref, label in targets:
                for combo in itertools.product(*(sweep[k] for k in keys)):
                    for seed in (variant.seeds or spec.seeds):
                        run = deep_merge(task_run, ref.run)
                        loss = run.setdefault("loss", {})
                        if ref.name is not None and not loss.get("terms"):
                            loss["objective"] = ref.name
                            if ref.params:
                                loss["params"] = dict(ref.params)
                        if ranked:
                            loss["ranking"] = deep_merge(loss.get("ranking") or {}, BUILTIN_VARIANTS[variant.name])
                        else:
                            loss["ranking"] = {"enabled": False}
                        run = deep_merge(run, variant.run)
                        run["seed"] = seed
                        chosen = dict(zip(keys, combo))
                        evaluation_cell = copy.deepcopy(evaluation)
                        for path, value in chosen.items():
                            if path.startswith("eval."):
                                _set_path(evaluation_cell, path.removeprefix("eval."), value)
                            else:
                                _set_path(run, path, value)
                        config = _validated_config(run, source, f"{where}: {label or variant.name} (seed {seed})")
                        canonical = canonical_dump(config)
                        method = method_label(label, variant.name, config.loss.ranking.k)
                        generations = spec.generation.model_dump() if ref.teacher_generations else None
                        semantic = {"task": task.name, "kind": "distill", "run": canonical, "stages": stage_hashes,
                                    "teacher_generations": generations, "teacher_cache": spec.teacher_cache,
                                    "eval": evaluation_cell}
                        _validated_eval(evaluation_cell, source, where)
                        add(_make_cell(spec, task, {**common, "kind": "distill", "reference": None, "seed": seed,
                                                    "objective_label": label, "variant": variant.name, "run": run,
                                                    "candidate": None, "teacher_generations": generations,
                                                    "eval": evaluation_cell},
                                       semantic, method, chosen))
    return cells


def filter_cells(cells: list[Cell], pattern: str | None) -> list[Cell]:
    """``--only``: comma-separated terms, a cell is kept when any term selects it. A term that is a
    method label or task name of the grid (``KL+R``, ``Rank-15``, ``gsm8k``) selects exactly those
    cells; ``re:PATTERN`` is a regex searched in the cell id; anything else is a glob on the id
    (``*-s72-*``) or, without glob characters, a substring of it."""
    if not pattern:
        return cells
    labels = {c.arm.method for c in cells} | {c.task for c in cells}
    matchers = []
    for term in (t.strip() for t in pattern.split(",")):
        if not term:
            continue
        if term in labels:
            matchers.append(lambda c, t=term: t in (c.arm.method, c.task))
        elif term.startswith("re:"):
            try:
                rx = re.compile(term[3:])
            except re.error as exc:
                raise SpecError(f"--only: bad regex {term[3:]!r}: {exc}") from None
            matchers.append(lambda c, rx=rx: rx.search(c.id) is not None)
        elif any(ch in term for ch in "*?["):
            matchers.append(lambda c, t=term: fnmatch.fnmatchcase(c.id, t))
        else:
            matchers.append(lambda c, t=term: t in c.id)
    return [c for c in cells if any(m(c) for m in matchers)]
