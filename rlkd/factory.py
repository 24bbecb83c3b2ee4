"""The one place rlkd makes model checkpoints: tiny random Llamas, layer-pruned copies, SmolLM2.

Model references in configs and specs:
    ``@tiny/teacher``, ``@tiny/student``   tiny random Llamas with the local Llama-2 tokenizer
                                           (teacher twice the student's width), for --tiny runs
    ``@smollm2/teacher``                   SmolLM2-135M-Instruct, prepared offline by
                                           ../shared/tools/prepare_smollm2.sh
    ``@smollm2/pruned-N``                  a copy of it keeping N of its 30 layers, evenly spaced
    ``@smollm2/layers-0.1.2.20.29``        a copy keeping exactly these layers (0-based, in order)
Anything else (a Hub id or a path) is returned unchanged by :func:`resolve_model`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SMOLLM2_SCRIPT = "prepare_smollm2.sh"
TINY_SIZES = {"teacher": dict(hidden=64, layers=2, heads=4), "student": dict(hidden=32, layers=2, heads=2)}
TINY_SEEDS = {"teacher": 1, "student": 2}


class ModelRefError(ValueError):
    """A model reference cannot be resolved; the message names it."""


def tiny_llama_settings(*, vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int = 512,
                        **config_overrides) -> dict:
    """The LlamaConfig fields of a tiny Llama (what :func:`tiny_llama_model` builds)."""
    settings = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                    max_position_embeddings=max_positions, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2)
    settings.update(config_overrides)
    return settings


def tiny_llama_model(*, vocab_size: int, hidden: int, layers: int, heads: int, seed: int = 0,
                     max_positions: int = 512, **config_overrides):
    """A randomly initialised Llama (weights drawn after ``torch.manual_seed(seed)``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = tiny_llama_settings(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                                   max_positions=max_positions, **config_overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings))


def save_tiny_llama(path: Path, *, tokenizer_dir: Path | None = None, **model_args) -> Path:
    """A tiny random Llama saved at ``path`` (made once, atomically; reused when present)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_llama_model(**model_args).save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir is not None:  # the tokenizer's files as they are, so the folder loads as one checkpoint
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def shared_tokenizer() -> Path | None:
    """The local Llama-2 tokenizer folder (``<data dir>/tokenizers/llama2``), if present."""
    from rlkd.paths import default_data_dir

    data = default_data_dir()
    candidate = data / "tokenizers" / "llama2" if data else None
    return candidate if candidate and candidate.is_dir() else None


def resolve_model(ref: str, cache_dir: Path, *, create: bool = True) -> str:
    """The local path a model reference stands for (built into ``cache_dir`` when ``create``);
    Hub ids and paths are returned unchanged."""
    if ref.startswith("@smollm2/"):
        return _smollm2(ref, cache_dir, create)
    if not ref.startswith("@tiny/"):
        return ref
    role = _tiny_role(ref)
    target = cache_dir / f"tiny-{role}"
    if not create:
        return str(target)
    tokenizer = shared_tokenizer()
    if tokenizer is None:
        raise ModelRefError(f"{ref}: needs the local Llama-2 tokenizer (RLKD_DATA_DIR/tokenizers/llama2)")
    return str(save_tiny_llama(target, tokenizer_dir=tokenizer, seed=TINY_SEEDS[role], **_tiny_settings(role)))


def _tiny_role(ref: str) -> str:
    """``@tiny/student`` -> ``student``; a ModelRefError for an unknown one."""
    role = ref.removeprefix("@tiny/")
    if role not in TINY_SIZES:
        raise ModelRefError(f"unknown tiny model {ref!r}; use @tiny/teacher or @tiny/student")
    return role


def _tiny_settings(role: str) -> dict:
    """What ``@tiny/<role>`` is built with: the shared Llama-2 tokenizer's 32000 ids, pad id 0."""
    return dict(vocab_size=32000, pad_token_id=0, **TINY_SIZES[role])


def _smollm2_keep(ref: str) -> int | list[int] | None:
    """The layers ``@smollm2/...`` keeps of the teacher's (a count, or the indices), None for the
    teacher itself; a ModelRefError for a name that is neither."""
    name = ref.removeprefix("@smollm2/")
    if name == "teacher":
        return None
    if name.startswith("pruned-") and name.removeprefix("pruned-").isdigit():
        return int(name.removeprefix("pruned-"))
    if name.startswith("layers-") and (layer_list := _layer_list(name)) is not None:
        return layer_list
    raise ModelRefError(f"unknown SmolLM2 model {ref!r}; use @smollm2/teacher, @smollm2/pruned-N or "
                        "@smollm2/layers-I.J.K (layer indices, increasing)")


def _smollm2(ref: str, cache_dir: Path, create: bool) -> str:
    teacher = cache_dir / "smollm2-135m-instruct"
    keep = _smollm2_keep(ref)  # the layers a pruned copy keeps
    target = teacher if keep is None else cache_dir / f"smollm2-{ref.removeprefix('@smollm2/')}"
    if not create:
        return str(target)
    if not (teacher / "model.safetensors").is_file():
        from rlkd.paths import REPO_ROOT

        script = REPO_ROOT.parent / "shared" / "tools" / SMOLLM2_SCRIPT
        if not script.is_file():
            raise ModelRefError(f"{ref}: {script} not found; prepare the checkpoint and place it at {teacher}")
        subprocess.run(["bash", str(script), str(teacher)], check=True)
    if keep is not None and not (target / "config.json").is_file():
        prune_layers(teacher, target, keep)
    return str(target)


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what prepare_smollm2.sh converts (its config's sizes)


def ref_config_source(ref: str) -> tuple[str | None, dict]:
    """Where the config of the model ``ref`` names comes from, without building it (``rlkd plan``):
    ``(Hub id, fields to override)`` for ``@smollm2/...`` (a pruned copy keeps fewer layers), ``(None,
    every field)`` for ``@tiny/...``; a Hub id or path is returned as ``(ref, {})``."""
    if ref.startswith("@tiny/"):
        return None, {"model_type": "llama", **tiny_llama_settings(**_tiny_settings(_tiny_role(ref)))}
    if not ref.startswith("@smollm2/"):
        return ref, {}
    keep = _smollm2_keep(ref)
    if keep is None:
        return SMOLLM2_HUB_ID, {}
    return SMOLLM2_HUB_ID, {"num_hidden_layers": keep if isinstance(keep, int) else len(keep)}


def _layer_list(name: str) -> list[int] | None:
    """``layers-0.1.5`` -> [0, 1, 5]; None unless the indices are distinct and increasing."""
    parts = name.removeprefix("layers-").split(".")
    if not all(p.isdigit() for p in parts):
        return None
    indices = [int(p) for p in parts]
    return indices if all(a < b for a, b in zip(indices, indices[1:])) else None


def prune_layers(source: Path, target: Path, keep: int | list[int]) -> Path:
    """Save a copy of a Llama-style model with ``keep`` of its decoder layers, evenly spaced (first
    and last kept), or exactly the layers listed in ``keep``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layers = model.model.layers
    if isinstance(keep, list):
        if not keep or keep[-1] >= len(layers):
            raise ModelRefError(f"cannot keep layers {keep} of a {len(layers)}-layer model")
        chosen = keep
    elif not 1 <= keep <= len(layers):
        raise ModelRefError(f"cannot keep {keep} of {len(layers)} layers")
    else:
        chosen = sorted({round(i * (len(layers) - 1) / max(keep - 1, 1)) for i in range(keep)})
    model.model.layers = torch.nn.ModuleList(layers[i] for i in chosen)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(chosen)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in chosen]
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    os.replace(tmp, target)
    return target
