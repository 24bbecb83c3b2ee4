"""The typed records of a benchmark cell: what a cell is (:class:`Cell`) and what running it left
(:class:`CellResult`: status, metrics, per-example scores, provenance).

These are the schema of a cell's files in a results folder; :mod:`rlkd.bench.store` alone reads and
writes those files and turns them into these models. ``SCHEMA_VERSION`` is the version of the cell
record; a record written before records carried one is version 0, and the store migrates it.

A cell's id and config hash are computed by :mod:`rlkd.bench.spec` from the cell's canonical config,
never from these models: adding a field here must not change an id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CellArm(_Record):
    """What a cell trains (or scores) within its task: the row of the tables, the objective and
    ranking variant a ±R comparison pairs by, the seed and the swept values."""

    method: str = Field(description="The row label in tables (KL, KL+R, Rank-5, Teacher, ...).")
    objective_label: str | None = Field(description="The objective row's label; None for Rank-only and "
                                        "reference cells.")
    variant: str | None = Field(description="The ranking variant (none, R, R_dynamic, ...); None for "
                                "reference cells.")
    seed: int | None = Field(description="Training seed; None for reference cells.")
    sweep: dict[str, Any] = Field(description="The swept values of this cell, by the last part of their path.")


class Cell(_Record):
    """One cell of a grid: its arm (method, objective label, variant, seed, sweep values), its run
    (the merged partial run config), its cached stages and its evaluation settings."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Version of the cell record's schema; "
                                       "records without one are version 0 and are migrated when read.")
    id: str = Field(description="Readable id: task, method, sweep values, seed, then the first 10 hex digits "
                    "of config_hash; the name of the cell's results folder.")
    spec: str = Field(description="Name of the spec the cell belongs to.")
    config_hash: str = Field(description="sha256 of the cell's canonical config (defaults left out).")
    task: str = Field(description="The spec task the cell belongs to.")
    kind: Literal["distill", "reference"] = Field(description="distill: a trained cell; reference: a model "
                                                  "scored without training (Teacher, Start, candidates).")
    arm: CellArm = Field(description="Method, objective label, variant, seed and sweep values.")
    reference: Literal["teacher", "student", "candidate"] | None = Field(
        description="Which model a reference cell scores; None for distill cells.")
    candidate: str | None = Field(description="The model an evaluation-only candidate row scores.")
    run: dict[str, Any] = Field(description="The merged partial run config (rlkd.config.RunConfig schema).")
    stages: dict[str, dict[str, Any]] = Field(description="{role: run tree} of the cached stages the cell "
                                              "starts from (student_heal, teacher, student).")
    teacher_generations: dict[str, Any] | None = Field(description="Decoding of the teacher's responses the "
                                                       "cell trains on (SeqKD, FD); None: the dataset's.")
    teacher_cache: bool = Field(description="Whether the cell reads the teacher's cached logits.")
    keep_checkpoints: bool = Field(description="Keep the cell's export and checkpoints after evaluation.")
    eval: dict[str, Any] = Field(description="The cell's evaluation settings (rlkd.bench.spec.EvalSpec keys).")

    @property
    def ranking(self) -> dict[str, Any]:
        """The cell's ``loss.ranking`` section as written in its run (empty when not set)."""
        loss = self.run.get("loss")
        ranking = loss.get("ranking") if isinstance(loss, dict) else None
        return ranking if isinstance(ranking, dict) else {}

    def record(self) -> dict[str, Any]:
        """The cell as its ``config.json`` holds it."""
        return self.model_dump(mode="json")


class CellStatus(_Record):
    """How a cell's run ended."""

    status: Literal["done", "failed"] = Field(description="done: metrics recorded; failed: error recorded.")
    config_hash: str = Field(description="The config hash of the cell that ran; must equal the cell's.")
    duration_s: float | None = Field(None, description="Seconds the run took, resumed runs included.")
    error: str | None = Field(None, description="failed: the exception line.")
    traceback: str | None = Field(None, description="failed: the full traceback.")
    staging: str | None = Field(None, description="failed: the staging folder kept for a resume.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Machine(BaseModel):
    """The machine a cell ran on: fp32 results on the CPU are bit-identical only on the same CPU kind."""

    model_config = ConfigDict(extra="allow", frozen=True)

    system: str | None = Field(None, description="platform.system() (Linux, ...).")
    arch: str | None = Field(None, description="platform.machine() (x86_64, ...).")
    cpus: int | None = Field(None, description="os.cpu_count().")
    cpu_model: str | None = Field(None, description="The CPU's model name (/proc/cpuinfo); absent in older records.")
    torch_cpu_capability: str | None = Field(None, description="The instruction set torch's CPU kernels use "
                                             "(AVX2, AVX512, ...); absent in older records.")
    kernel_isa_overrides: dict[str, str] | None = Field(
        None, description="The kernel instruction-set variables that were set (ATEN_CPU_CAPABILITY, "
                          "MKL_ENABLE_INSTRUCTIONS, ...: rlkd.provenance.KERNEL_ISA_VARIABLES); absent when none was.")


class Provenance(BaseModel):
    """What ran a cell, where and when. Written with only the fields that were set (older records
    lack some); unknown fields of a record are kept as recorded."""

    model_config = ConfigDict(extra="allow", frozen=True)

    git_sha: str | None = Field(None, description="The rlkd commit that ran the cell.")
    git_dirty: bool | None = Field(None, description="Whether the checkout had uncommitted changes.")
    versions: dict[str, str | None] = Field(default_factory=dict, description="{package: installed version}.")
    machine: Machine | None = Field(None, description="The machine's kind.")
    plugins: dict[str, str | None] = Field(default_factory=dict, description="{plug-in source: content hash}.")
    stages: dict[str, str | None] | None = Field(None, description="{stage role: content hash of the export "
                                                 "the cell started from}; None: not recorded.")
    started: str | None = Field(None, description="UTC start time, ISO 8601.")
    finished: str | None = Field(None, description="UTC end time, ISO 8601 (done cells).")
    duration_s: float | None = Field(None, description="Wall time of the cell's run in this attempt, seconds.")
    resumed: bool | None = Field(None, description="Whether the cell's run resumed a killed attempt.")

    def to_json(self) -> dict[str, Any]:
        """The record as written: the fields that were set, JSON types."""
        return self.model_dump(mode="json", exclude_unset=True)


class CellResult(_Record):
    """A published cell record, validated: the cell, its status and, for a done cell, its metrics."""

    cell: Cell
    status: CellStatus
    metrics: dict[str, float] | None = Field(None, description="Flat {metric: value}; done cells only.")
    per_example: dict[str, list[float]] = Field(default_factory=dict, description="{metric: [value per "
                                                "evaluation example, fixed example order]}; possibly empty.")
    provenance: Provenance = Field(default_factory=Provenance)
    folder: Path = Field(description="The cell's results folder (its name is normally the cell's id).")

    @field_validator("metrics", mode="before")
    @classmethod
    def _numbers(cls, metrics: Any) -> Any:
        if isinstance(metrics, dict):
            for name, value in metrics.items():
                if not _is_number(value):  # pydantic would take True or "1.0" as a float
                    raise ValueError(f"metric {name!r} must be a number, got {value!r}")
        return metrics

    @model_validator(mode="after")
    def _consistent(self) -> CellResult:
        if self.cell.config_hash != self.status.config_hash:
            raise ValueError(f"the cell's config_hash does not match its status's ({self.cell.config_hash} vs "
                             f"{self.status.config_hash})")
        if self.status.status == "done" and not self.metrics:
            raise ValueError("a done cell needs metrics")
        return self

    @property
    def done(self) -> bool:
        return self.status.status == "done"
