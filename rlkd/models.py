"""Loading teacher and student causal LMs and checking that their vocabularies line up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class VocabMismatchError(ValueError):
    """Teacher and student cannot be compared token by token."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        from rlkd.device import default_dtype

        return default_dtype()
    return DTYPES[name]


def load_tokenizer(path: str | None):
    """The tokenizer stored at `path`, or None when there is none (a bare model folder)."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / name).exists() for name in
                                  ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


def config_vocab_size(path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = config.get_text_config().vocab_size
    return int(vocab)


def _extra_tokens_are_special(tokenizer, start: int) -> list[str]:
    """Tokens with id >= start that are NOT added special tokens (i.e. real vocabulary that would be cut)."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    return [tokenizer.convert_ids_to_tokens(i) for i in range(start, len(tokenizer)) if i not in special]


@dataclass(frozen=True)
class VocabPlan:
    teacher_size: int
    student_size: int
    shared_size: int  # logits are compared on ids [0, shared_size)


def plan_vocab(teacher_size: int, student_size: int, teacher_tokenizer, student_tokenizer,
               truncation: str) -> VocabPlan:
    """Check the two vocabularies agree and decide the logit width both sides are cut to.

    Raises VocabMismatchError before any model weights are loaded when they cannot agree.
    """
    shared = min(teacher_size, student_size)
    if teacher_size != student_size and truncation != "shared":
        raise VocabMismatchError(
            f"teacher vocab size {teacher_size} != student vocab size {student_size}; if the extra rows "
            "are padding, set models.vocab_truncation=shared to compare logits on the shared prefix")
    if teacher_tokenizer is not None and student_tokenizer is not None:
        common = min(len(teacher_tokenizer), len(student_tokenizer), shared)
        t_tokens = teacher_tokenizer.convert_ids_to_tokens(list(range(common)))
        s_tokens = student_tokenizer.convert_ids_to_tokens(list(range(common)))
        for index, (t, s) in enumerate(zip(t_tokens, s_tokens)):
            if t != s:
                raise VocabMismatchError(f"tokenizers disagree at id {index}: teacher {t!r} vs student {s!r}; "
                                         "teacher and student must share a vocabulary")
        for role, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
            cut = _extra_tokens_are_special(tok, shared)
            if cut:
                raise VocabMismatchError(f"{role} tokenizer has {len(cut)} real tokens beyond the shared vocab size "
                                         f"{shared} (first: {cut[0]!r}); truncation would drop them")
        if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
            raise VocabMismatchError(f"EOS ids differ: teacher {teacher_tokenizer.eos_token_id} "
                                     f"vs student {student_tokenizer.eos_token_id}")
    return VocabPlan(teacher_size, student_size, shared)


def load_causal_lm(path: str, dtype: torch.dtype, *, gradient_checkpointing: bool = False):
    """`AutoModelForCausalLM.from_pretrained`; under an active HfDeepSpeedConfig (ZeRO-3) the weights
    are loaded straight into partitions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if gradient_checkpointing:
        # transformers 5 renamed the method; keep working on 4.x
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model
