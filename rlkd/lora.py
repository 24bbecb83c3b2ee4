"""LoRA students through peft (`models.student_lora: {r, alpha, dropout, target_modules}`).

The student is wrapped with ``peft.get_peft_model`` after it has been loaded into ZeRO-3
partitions; only the adapter matrices require gradients, so only they enter the optimizer, and
DeepSpeed partitions them when the engine is built. The teacher is untouched.

Export writes two things from the consolidated (gathered) state dict, on rank 0:

* ``export/``: the merged model, ``W + scaling * B @ A`` for every adapted layer (``scaling`` is
  each layer's own, ``alpha / r``), saved as a plain transformers checkpoint, so ``rlkd eval``,
  the benchmarks and ``from_pretrained`` read it as they read any student;
* ``export/adapter/``: the adapter alone, in peft's format (``PeftModel.from_pretrained(base, path)``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

PEFT_PREFIX = "base_model.model."
ADAPTER_SUBDIR = "adapter"


class StudentLoraConfig(BaseModel):
    """The `models.student_lora` block; plain LoRA (no DoRA/rsLoRA), default peft initialisation."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="Rank of each adapter: more trainable parameters and capacity as it "
                   "grows.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling: the update is (alpha / r) x B x A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input during training.")
    # Module-name suffixes, "all-linear", or None for peft's default for the architecture
    # (q_proj, v_proj for Llama).
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module-name suffixes to adapt (e.g. [q_proj, v_proj]), all-linear, or None for "
        "peft's default for the architecture (q_proj, v_proj for Llama).")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if value is not None and not isinstance(value, str) and not value:
            raise ValueError("an empty list adapts nothing; name module-name suffixes (e.g. [q_proj, v_proj]), "
                             "write 'all-linear', or leave the key out for peft's default")
        return value

    @field_validator("r")
    @classmethod
    def _peft_installed(cls, value: int) -> int:
        if importlib.util.find_spec("peft") is None:
            raise ValueError("LoRA students need peft: pip install 'rlkd[lora]'")
        return value


def _meta_model(model_path: str):
    """The model at ``model_path`` built from its config.json on the meta device: no weights are read
    or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def check_target_modules(cfg: StudentLoraConfig, model_path: str) -> None:
    """Each named target module must match a module of the student (as peft matches: the whole name
    or its last dotted parts); raises ValueError listing the student's linear layers otherwise.
    Checked before the models load: peft fails only after both are in memory, and skips a typo
    silently when another name matched."""
    if not isinstance(cfg.target_modules, list):
        return
    modules = dict(_meta_model(model_path).named_modules())
    missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and isinstance(m, torch.nn.Linear)})
        raise ValueError(f"target_modules {missing} match no module of the student {model_path}; "
                         f"its linear layers: {', '.join(linear)}")


def wrap_student(model, cfg: StudentLoraConfig, gradient_checkpointing: bool = False):
    """The student as a peft model whose only trainable parameters are the adapters."""
    from peft import LoraConfig, TaskType, get_peft_model

    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                             lora_dropout=cfg.dropout, target_modules=cfg.target_modules)
    if gradient_checkpointing:
        # With the embeddings frozen, reentrant checkpointing (use_reentrant=True, the older
        # default) sees block inputs without grad and backpropagates nothing into the adapters;
        # marking the embedding outputs makes either checkpointing mode work.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def is_lora(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def merged_state_dict(peft_model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (keys as in the plain model)."""
    from peft.tuners.lora import LoraLayer

    merged = dict(state_dict)
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            a = merged.pop(f"{name}.lora_A.{adapter}.weight")
            b = merged.pop(f"{name}.lora_B.{adapter}.weight")
            key = f"{name}.base_layer.weight"
            delta = (b.double() @ a.double()) * layer.scaling[adapter]
            if layer.fan_in_fan_out:  # GPT-2-style Conv1D stores the weight transposed
                delta = delta.T
            merged[key] = (merged[key].double() + delta).to(merged[key].dtype)
    plain = {}
    for key, value in merged.items():
        if "lora_" in key:
            raise ValueError(f"LoRA export: adapter weight {key!r} belongs to no LoRA layer")
        key = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        plain[key] = value
    return plain


def save_lora_export(peft_model, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """Merged weights in ``directory`` and the adapter in ``directory/adapter`` (rank 0 only)."""
    peft_model.save_pretrained(str(directory / ADAPTER_SUBDIR), state_dict=state_dict, safe_serialization=True)
    peft_model.get_base_model().save_pretrained(str(directory), state_dict=merged_state_dict(peft_model, state_dict),
                                                safe_serialization=True)
