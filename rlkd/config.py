"""The validated run configuration of `rlkd train` (YAML file plus dotted key=value overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlkd.data.onpolicy import OnPolicyConfig
from rlkd.report_sinks import missing_packages
from rlkd.lora import StudentLoraConfig
from rlkd.objectives import LossConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsConfig(_Strict):
    teacher: str                      # Hub id or local path
    student: str
    tokenizer: str | None = None      # default: the student path, if it holds a tokenizer
    teacher_tokenizer: str | None = None  # default: the teacher path, if it holds a tokenizer
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # "shared": when the two vocab sizes differ only by padding rows, compare logits on the shared
    # prefix min(V_teacher, V_student); checked against both tokenizers before any compute.
    vocab_truncation: Literal["none", "shared"] = "none"
    student_lora: StudentLoraConfig | None = None  # train peft LoRA adapters only (rlkd.lora)


class DataConfig(_Strict):
    task: Literal["gsm8k", "dolly", "xsum", "selfinst", "vicuna", "sni", "unni", "pretrain", "tokenized"]
    split: str = "train"
    path: str | None = None           # explicit JSONL file; overrides data_dir/source
    data_dir: str | None = None       # default: RLKD_DATA_DIR or ../shared/data
    source: Literal["auto", "local", "hub"] = "auto"
    max_length: int = Field(512, ge=2)
    mask_convention: Literal["shifted", "official_off_by_one"] = "shifted"
    exclude_eval_overlap: bool = True  # Dolly: drop training rows that are in RLKD's test split
    skip: int = Field(0, ge=0)              # rows of the source passed over first
    limit: int | None = Field(None, ge=1)   # rows (pretrain: documents) read from the source
    max_samples: int | None = Field(None, ge=1)  # encoded samples kept (pretrain: packed sequences)
    # pretrain: each document's first N tokens only, so that no long document (a 34k-token arXiv
    # paper in the SlimPajama demo) makes up most of a small packed training set
    max_document_tokens: int | None = Field(None, ge=1)
    shuffle: bool = True
    # Micro-batches of samples of similar length (rlkd.data.loader): less padding, same samples per epoch.
    group_by_length: bool = False
    on_policy: OnPolicyConfig | None = None  # GKD-style student-sampled responses (rlkd.data.onpolicy)

    @model_validator(mode="after")
    def _document_cap_is_for_packing(self) -> "DataConfig":
        if self.max_document_tokens is not None and self.task != "pretrain":
            raise ValueError("max_document_tokens applies to task 'pretrain' (packed documents) only")
        return self

    @model_validator(mode="after")
    def _on_policy_is_shifted(self) -> "DataConfig":
        # Prompts are cut at the first supervised position, which only the shifted mask places
        # just before the response.
        if self.on_policy is not None and self.mask_convention != "shifted":
            raise ValueError("on_policy needs mask_convention 'shifted'")
        return self


class TrainSection(_Strict):
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)   # optimizer steps
    # Passes over the training samples; when set it replaces max_steps: the engine sets
    # max_steps = ceil(epochs * samples / (micro_batch_size * grad_accum * world_size)).
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    optimizer: Literal["torch_adamw", "deepspeed_adamw"] = "torch_adamw"


class DeepSpeedSection(_Strict):
    student_config: str | None = None  # JSON file; default ds_configs/zero3_bf16.json (GPU) or zero3_fp32_cpu.json
    teacher_config: str | None = None  # default ds_configs/teacher_zero3_inference.json
    teacher_offload_params: bool = False
    student_offload_optimizer: bool = False


class CheckpointSection(_Strict):
    every_steps: int = Field(0, ge=0)  # 0: only the final export
    keep_last: int = Field(2, ge=1)


class RunConfig(_Strict):
    output_dir: str
    # Modules or .py files that register extra objectives (rlkd.plugins); loaded before validation.
    plugins: list[str] = Field(default_factory=list)
    seed: int = 72
    models: ModelsConfig
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)  # validated by the objective library
    train: TrainSection = Field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    # Directory of cached teacher logits (rlkd.teacher_cache): the teacher runs once over the
    # training samples and every step, epoch and later run with the same teacher and data reads them.
    teacher_cache: str | None = None
    log_every: int = Field(1, ge=1)
    # Sinks besides metrics.jsonl, same rows (rlkd.engine.reporting), and the period in steps of
    # CR@1-5 of student vs teacher on the training batch (rlkd.engine.agreement; 0: never).
    report_to: list[Literal["tensorboard", "wandb", "csv"]] = Field(default_factory=list)
    agreement_every: int = Field(0, ge=0)
    progress_bar: bool = True
    export: bool = True

    @field_validator("report_to")
    @classmethod
    def _sinks_installed(cls, sinks: list[str]) -> list[str]:
        missing = missing_packages(sinks)
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed (pip install 'rlkd[{missing[0]}]')")
        return sinks

    @model_validator(mode="after")
    def _on_policy_needs_a_live_teacher(self) -> "RunConfig":
        if self.data.on_policy is not None and self.teacher_cache:
            raise ValueError("data.on_policy: student-sampled sequences are not in teacher_cache; "
                             "drop one of the two")
        return self

    @model_validator(mode="after")
    def _agreement_needs_logits(self) -> "RunConfig":
        if self.agreement_every and self.loss.fused_lm_head:
            raise ValueError("agreement_every: CR@k needs the logits, which loss.fused_lm_head never forms; "
                             "set agreement_every=0 or loss.fused_lm_head=false")
        return self


class ConfigError(ValueError):
    """Invalid run configuration; the message names the offending key."""


_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def validation_lines(error: ValidationError, prefix: str = "") -> list[str]:
    """One ``  key: message`` line per error, in the config's own terms: ``loss.terms[0].weight``,
    without pydantic's validator names (``function-after[...]``), union tags or "Value error, "."""
    lines = []
    for item in error.errors():
        key = ""
        for part in item["loc"]:
            if isinstance(part, int):
                key += f"[{part}]"
            elif "[" in part or part.endswith(" term"):  # a validator's or a union member's name
                continue
            else:
                key += ("." if key else "") + part
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        for noise in _PYDANTIC_PREFIXES:
            message = message.removeprefix(noise)
        lines.append(f"  {prefix}{key or '(top level)'}: {message}")
    return lines


def _format_validation(error: ValidationError, source: str) -> str:
    return "\n".join([f"{source}: invalid run config"] + validation_lines(error))


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None, plugins: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config. Plug-ins it names (and ``plugins``) are imported
    first, so their objectives validate; relative plug-in paths are read from the config's folder."""
    tree: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree.update(loaded)
    for assignment in overrides:
        apply_override(tree, assignment)
    prepare_plugins(tree, plugins, Path(path).parent if path is not None else None, source)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def prepare_plugins(tree: dict[str, Any], extra: list[str] | tuple[str, ...], base_dir: Path | None,
                    source: str) -> None:
    """Resolve ``tree['plugins']`` (plus ``extra``) to absolute paths / module names, store them back
    and import them, so a child process given the same tree loads the same plug-ins."""
    from rlkd.plugins import PluginError, load_plugins, resolve_plugin_names

    names = tree.get("plugins") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: invalid run config\n  plugins: expected a list of module names or .py paths")
    names = resolve_plugin_names(list(names), base_dir) + resolve_plugin_names(list(extra), Path.cwd())
    names = list(dict.fromkeys(names))
    if names:
        tree["plugins"] = names
    try:
        load_plugins(names)
    except PluginError as exc:
        raise ConfigError(f"{source}: plugins: {exc}") from None
