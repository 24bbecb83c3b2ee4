"""Checks of a run config that need no weights, run before any model loads.

Each failure is one line naming the config key or the file (PreflightError, a ConfigError, so
`rlkd train` exits 2): model folders that do not exist, the ranking k against the vocabulary the
models' config.json files declare (read with AutoConfig, no weights), DeepSpeed config files, and an
output folder that cannot be created or written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlkd.config import ConfigError, RunConfig


class PreflightError(ConfigError):
    """The run cannot start; the message names the key or file."""


# A Hugging Face Hub repo id: "name" or "owner/name" (letters, digits, '-', '_', '.'), at most 96 chars.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(value: str) -> bool:
    return (len(value) <= 96 and bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value
            and not value.startswith((".", "~")))


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model_path(key: str, value: str | None, *, model: bool) -> None:
    """A local-looking path must exist (and, for a model, hold a config.json); a Hub id passes."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if model and not (path / "config.json").is_file():
            raise PreflightError(f"{key}: {value} has no config.json (not a saved model folder)")
        return
    if path.exists():
        raise PreflightError(f"{key}: {value} is a file, not a model folder")
    if not looks_like_hub_id(value):
        raise PreflightError(f"{key}: {value}: no such folder")
    # "owner/name" that is not a local folder: a Hub id, resolved (or refused) by its config read below.


def vocab_size(key: str, value: str) -> int:
    from rlkd.models import config_vocab_size

    try:
        return config_vocab_size(value)
    except Exception as exc:  # noqa: BLE001 - whatever the Hub or the folder says, in one line
        raise PreflightError(f"{key}: cannot read the model config of {value!r} "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None


def check_output_dir(value: str) -> None:
    """The folder exists and is writable, or the nearest existing parent is a writable folder."""
    path = Path(value).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise PreflightError(f"output_dir: {value} {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"output_dir: {value} cannot be written: {probe} is not writable")
    checkpoints = path / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise PreflightError(f"output_dir: {checkpoints} is a file, not a folder")


def check_deepspeed_files(cfg: RunConfig) -> None:
    from rlkd.engine.ds_config import DS_CONFIG_DIR

    for key in ("student_config", "teacher_config"):
        value = getattr(cfg.deepspeed, key)
        if value is None:
            continue
        path = Path(value)
        if not path.is_file() and not (not path.is_absolute() and (DS_CONFIG_DIR / path).is_file()):
            raise PreflightError(f"deepspeed.{key}: {value}: DeepSpeed config file not found")


def check_optimizer_build(cfg: RunConfig) -> None:
    """DeepSpeed's CPUAdam (deepspeed_adamw with optimizer offload) is JIT-built unless the installed
    DeepSpeed ships it compiled: without a C++ compiler and ninja that fails only after the models load."""
    import shutil

    from rlkd.engine.ds_config import prebuilt_op

    if cfg.train.optimizer != "deepspeed_adamw" or not cfg.deepspeed.student_offload_optimizer:
        return
    if prebuilt_op("cpu_adam"):
        return
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        raise PreflightError(f"train.optimizer=deepspeed_adamw with deepspeed.student_offload_optimizer needs "
                             f"DeepSpeed's CPUAdam built at start-up, and {' and '.join(missing)} is not on PATH; "
                             "use train.optimizer=torch_adamw (torch's AdamW on the host)")


def check(cfg: RunConfig) -> None:
    """Everything about `cfg` that can be known without loading weights; raises PreflightError."""
    models = cfg.models
    check_model_path("models.teacher", models.teacher, model=True)
    check_model_path("models.student", models.student, model=True)
    check_model_path("models.tokenizer", models.tokenizer, model=False)
    check_model_path("models.teacher_tokenizer", models.teacher_tokenizer, model=False)
    check_deepspeed_files(cfg)
    check_optimizer_build(cfg)
    check_output_dir(cfg.output_dir)
    teacher_vocab = vocab_size("models.teacher", models.teacher)
    student_vocab = vocab_size("models.student", models.student)
    if models.student_lora is not None:
        from rlkd.lora import check_target_modules

        try:
            check_target_modules(models.student_lora, models.student)
        except ValueError as exc:
            raise PreflightError(f"models.student_lora.{exc}") from None
    ranking = cfg.loss.ranking
    shared = min(teacher_vocab, student_vocab)
    if ranking.enabled and ranking.k > shared:
        sizes = (f"{shared}" if teacher_vocab == student_vocab
                 else f"{shared} (teacher {teacher_vocab}, student {student_vocab})")
        raise PreflightError(f"loss.ranking.k={ranking.k} is larger than the models' vocabulary of {sizes} tokens "
                             f"(vocab_size in the config.json of {models.teacher} and {models.student})")
