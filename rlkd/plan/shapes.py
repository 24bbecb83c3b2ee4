"""A model's sizes from its config alone: the model is built on the meta device (no memory, no weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelConfigNotFound(FileNotFoundError):
    """Neither a local path, the config directory nor the Hub cache has the model's config."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int               # distinct parameters (tied embeddings counted once)
    largest_layer_params: int  # the largest single module's own parameters (what ZeRO-3 gathers at once)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    plain_head: bool = True   # logits are hidden @ head.T (what the fused loss computes; rlkd.engine.heads)


def resolve_config(name: str, config_dir: str | Path | None = None):
    """The transformers config of ``name``: a local folder or config.json, ``config_dir/<name>/config.json``,
    or the Hub (its cache when offline); a benchmark's model reference (``@smollm2/layers-0.1.29``,
    ``@tiny/student``) as the config it stands for."""
    from transformers import AutoConfig

    if name.startswith("@"):
        from rlkd.factory import ModelRefError, ref_config_source

        try:
            source, overrides = ref_config_source(name)
        except ModelRefError as err:
            raise ModelConfigNotFound(str(err)) from None
        if source is None:
            return AutoConfig.for_model(**overrides)
        config = resolve_config(source, config_dir)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    local = Path(name)
    if local.is_file():
        return AutoConfig.for_model(**json.loads(local.read_text(encoding="utf-8")))
    if local.is_dir():
        return AutoConfig.from_pretrained(local)
    if config_dir is not None and (Path(config_dir) / name / "config.json").is_file():
        return resolve_config(str(Path(config_dir) / name / "config.json"))
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        raise ModelConfigNotFound(f"no config for model {name!r}: not a local path, not under --config-dir "
                                  f"({config_dir}), and not on the Hub or in its cache ({err.__class__.__name__})") from None


def model_shape(name: str, config_dir: str | Path | None = None) -> ModelShape:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = resolve_config(name, config_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    tied = bool(getattr(text, "tie_word_embeddings", False))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and head is not None and head.weight is not embed.weight:
        params -= head.weight.numel()  # on the meta device transformers 5 leaves tying to weight loading
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = text.num_attention_heads
    # Soft-capped (Gemma 2), scaled (Cohere, Granite) or biased heads: the fused path refuses them.
    plain_head = (head is not None and getattr(head, "bias", None) is None
                  and not getattr(text, "final_logit_softcapping", None)
                  and getattr(text, "logit_scale", None) in (None, 1, 1.0)
                  and getattr(text, "logits_scaling", None) in (None, 1, 1.0))
    return ModelShape(name=name, params=params, largest_layer_params=largest, hidden=text.hidden_size,
                      intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=heads,
                      kv_heads=getattr(text, "num_key_value_heads", None) or heads, vocab=text.vocab_size,
                      tied=tied, plain_head=plain_head)
