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
    teacher: str = Field(description="The teacher: a Hub id or a local folder loadable by AutoModelForCausalLM. "
                         "It is frozen and never enters the optimizer or a checkpoint.")
    student: str = Field(description="The student to train: a Hub id or a local folder loadable by "
                         "AutoModelForCausalLM.")
    tokenizer: str | None = Field(None, description="The student's tokenizer, when it is not stored with the "
                                  "student (None: the student's folder or Hub id).")
    teacher_tokenizer: str | None = Field(None, description="The teacher's tokenizer, when it is not stored with "
                                          "the teacher (None: the teacher's folder or Hub id); it must agree "
                                          "with the student's, which is checked before any compute.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype of both models. auto: bf16 on a GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute the student's activations during "
                                         "backward: much less activation memory for extra compute (`rlkd plan` "
                                         "shows the memory with and without).")
    # "shared": when the two vocab sizes differ only by padding rows, compare logits on the shared
    # prefix min(V_teacher, V_student); checked against both tokenizers before any compute.
    vocab_truncation: Literal["none", "shared"] = Field(
        "none", description="shared: compare logits on the leading min(V_teacher, V_student) ids when the "
        "vocabularies differ only by padding rows (32000 vs 32001); none: any difference is an error.")
    student_lora: StudentLoraConfig | None = Field(
        None, description="Train peft LoRA adapters instead of the whole student (needs rlkd[lora]); "
        "None: full fine-tuning.")


class DataConfig(_Strict):
    task: Literal["gsm8k", "dolly", "xsum", "selfinst", "vicuna", "sni", "unni", "pretrain", "tokenized"] = Field(
        description="The training data's format and prompt template: a paper task, pretrain (documents packed "
        "with BOS/EOS) or tokenized (JSONL of input_ids and loss_mask).")
    split: str = Field("train", description="Which split of the task to read, locally (a known file "
                       "of the data folder) or on the Hub.")
    path: str | None = Field(None, description="An explicit JSONL file to read; overrides data_dir and source.")
    data_dir: str | None = Field(None, description="Folder laid out as ../shared/data (<task>/<split>.jsonl); "
                                 "None: RLKD_DATA_DIR, else ../shared/data.")
    source: Literal["auto", "local", "hub"] = Field(
        "auto", description="Where rows come from: local (the data folder), hub (download by name), auto "
        "(the local file when it exists, else the Hub).")
    max_length: int = Field(512, ge=2, description="Tokens per training sample (prompt + response, or one "
                            "packed sequence); longer samples are truncated.")
    mask_convention: Literal["shifted", "official_off_by_one"] = Field(
        "shifted", description="shifted: logit t is supervised when token t+1 is a response token; "
        "official_off_by_one reproduces the released RLKD code's mask, to measure the difference.")
    exclude_eval_overlap: bool = Field(True, description="Dolly: drop training rows that are in the paper's "
                                       "800-row test split, so that training never sees a test row.")
    skip: int = Field(0, ge=0, description="Rows (pretrain: documents) of the source passed over before reading, "
                      "e.g. to keep training and held-out documents apart.")
    limit: int | None = Field(None, ge=1, description="Rows (pretrain: documents) read from the source after "
                              "skip; None: all.")
    max_samples: int | None = Field(None, ge=1, description="Encoded samples kept (pretrain: packed sequences); "
                                    "None: all.")
    # pretrain: each document's first N tokens only, so that no long document (a 34k-token arXiv
    # paper in the SlimPajama demo) makes up most of a small packed training set
    max_document_tokens: int | None = Field(None, ge=1, description="pretrain only: pack each document's first N "
                                            "tokens, so that one long document cannot fill a small training "
                                            "set; None: whole documents.")
    shuffle: bool = Field(True, description="Shuffle the samples (seeded by `seed`); false keeps file order.")
    # Micro-batches of samples of similar length (rlkd.data.loader): less padding, same samples per epoch.
    group_by_length: bool = Field(False, description="Fill each micro-batch with samples of similar length, as "
                                  "Hugging Face's group_by_length: far less padding, the same samples per "
                                  "epoch, no length curriculum.")
    on_policy: OnPolicyConfig | None = Field(
        None, description="GKD-style on-policy training: some micro-batches get the student's own sampled "
        "responses; None: off-policy only.")

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
    micro_batch_size: int = Field(1, ge=1, description="Samples per process per forward pass; raise it until "
                                  "memory runs out (`rlkd plan` gives the largest that fits).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step; the global batch is "
                            "micro_batch_size x grad_accum x world size.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train; ignored when epochs is set.")
    # Passes over the training samples; when set it replaces max_steps: the engine sets
    # max_steps = ceil(epochs * samples / (micro_batch_size * grad_accum * world_size)).
    epochs: float | None = Field(None, gt=0, description="Passes over the training samples; when set, max_steps "
                                 "= ceil(epochs x samples / global batch).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW, reached after warmup_steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2).")
    eps: float = Field(1e-8, description="AdamW's epsilon.")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warmup: constant, or cosine decay to "
        "min_lr_ratio x lr at max_steps.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to lr.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the final learning rate as a fraction of "
                                "lr.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this value; 0 disables "
                             "clipping.")
    optimizer: Literal["torch_adamw", "deepspeed_adamw"] = Field(
        "torch_adamw", description="torch_adamw: torch's AdamW; deepspeed_adamw: DeepSpeed's own AdamW, "
        "configured in the engine's JSON from these settings.")


class DeepSpeedSection(_Strict):
    student_config: str | None = Field(None, description="The student engine's DeepSpeed JSON; None: "
                                       "ds_configs/zero3_bf16.json on a GPU, zero3_fp32_cpu.json on CPU. Batch "
                                       "sizes, clipping and the optimizer still come from train, precision "
                                       "from models.dtype.")
    teacher_config: str | None = Field(None, description="The frozen teacher's ZeRO-3 inference JSON; None: "
                                       "ds_configs/teacher_zero3_inference.json.")
    teacher_offload_params: bool = Field(False, description="Keep the teacher's parameters in host memory "
                                         "(ZeRO-3 offload): saves GPU memory at the cost of time.")
    student_offload_optimizer: bool = Field(False, description="Keep the student's optimizer states in host "
                                            "memory (ZeRO-3 offload): the largest saving of GPU memory, slower "
                                            "steps.")


class CheckpointSection(_Strict):
    every_steps: int = Field(0, ge=0, description="Write a resumable checkpoint every N optimizer steps; "
                             "0: none, only the final export.")
    keep_last: int = Field(2, ge=1, description="Checkpoints of this run's lineage kept; older ones are "
                           "deleted, the newest never.")


class RunConfig(_Strict):
    output_dir: str = Field(description="The run's folder: metrics.jsonl, checkpoints/, export/, manifest.json. "
                            "A folder with checkpoints is refused unless --resume is given.")
    # Modules or .py files that register extra objectives (rlkd.plugins); loaded before validation.
    plugins: list[str] = Field(default_factory=list, description="Modules or .py files (relative to the config "
                               "file) that register extra objectives; loaded before the loss is validated.")
    seed: int = Field(72, description="Seeds data order, torch's random state and on-policy sampling; the same "
                      "seed and config reproduce a run.")
    models: ModelsConfig = Field(description="Teacher, student, tokenizers and dtype.")
    data: DataConfig = Field(description="The training data and how it is encoded and batched.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The distillation loss: objective(s) and "
                             "the ranking term.")  # validated by the objective library
    train: TrainSection = Field(default_factory=TrainSection, description="Optimizer, schedule and batch "
                                "geometry.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed engine configs "
                                        "and offloading.")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="Resumable checkpoints.")
    # Directory of cached teacher logits (rlkd.teacher_cache): the teacher runs once over the
    # training samples and every step, epoch and later run with the same teacher and data reads them.
    teacher_cache: str | None = Field(None, description="Folder of cached teacher logits: the teacher runs once "
                                      "over the training samples and every later step, epoch and run on the "
                                      "same data reads them (exact). Worth it for several epochs; None: the "
                                      "teacher runs every step.")
    # A sparse teacher cache (rlkd.teacher_topk_cache): the top-K ids per position and their tail bucket.
    teacher_cache_top_k: int | None = Field(None, ge=1, description="Keep only the teacher's K most likely ids "
                                            "per position in teacher_cache: their log-probabilities at "
                                            "loss.temperature and the log of the remaining mass (K x (id + value) "
                                            "bytes + 4 a position instead of 4 x vocabulary). The loss then compares "
                                            "the K ids plus one tail bucket (mass-preserving; exact when K >= the "
                                            "vocabulary). None: every logit.")
    teacher_cache_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage dtype of the cached top-K log-probabilities (the tail log-mass stays "
        "float32); with teacher_cache_top_k only.")
    log_every: int = Field(1, ge=1, description="Write a metrics row every N optimizer steps.")
    # Sinks besides metrics.jsonl, same rows (rlkd.engine.reporting), and the period in steps of
    # CR@1-5 of student vs teacher on the training batch (rlkd.engine.agreement; 0: never).
    report_to: list[Literal["tensorboard", "wandb", "csv"]] = Field(
        default_factory=list, description="Sinks that get the same rows as metrics.jsonl (their packages are "
        "extras, e.g. rlkd[tensorboard]).")
    agreement_every: int = Field(0, ge=0, description="Log the student's CR@1-5 against the teacher on the "
                                 "training batch every N steps (a multiple of log_every); 0: never. Needs the "
                                 "logits path.")
    progress_bar: bool = Field(True, description="Show a progress bar on rank 0.")
    export: bool = Field(True, description="Save a consolidated save_pretrained checkpoint to export/ at the end.")

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
    def _sparse_teacher_cache(self) -> "RunConfig":
        if self.teacher_cache_top_k is None:
            if self.teacher_cache_dtype != "float32":
                raise ValueError("teacher_cache_dtype: the exact cache stores float32 logits; a storage dtype needs "
                                 "teacher_cache_top_k")
            return self
        if not self.teacher_cache:
            raise ValueError("teacher_cache_top_k: set teacher_cache (the folder of the cache) too")
        from rlkd.objectives.sparse_loss import sparse_teacher_refusal

        refusal = sparse_teacher_refusal(self.loss, self.teacher_cache_top_k)
        if refusal:
            raise ValueError(f"teacher_cache_top_k={self.teacher_cache_top_k}: {refusal}")
        if self.agreement_every:
            raise ValueError("agreement_every: CR@k compares full teacher logits, which teacher_cache_top_k does "
                             "not keep; set agreement_every=0")
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
