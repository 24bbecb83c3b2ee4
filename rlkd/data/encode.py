"""Token ids plus the mask of supervised logit positions.

A sequence x_0..x_{n-1} gives logits at positions 0..n-1, and the logit at t predicts x_{t+1}.
`is_target[i]` marks tokens the model should learn to produce (the response and its EOS).

- "shifted" (correct): position t is supervised when x_{t+1} is a target.
- "official_off_by_one": position t is supervised when x_t is a target, as the official RLKD
  code does with `mask[len_query:len_input]`; it skips predicting the first response token and
  supervises the prediction that follows EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from rlkd.data.jsonl import DataError
from rlkd.data.tasks import PromptResponse, TokenRow

MaskConvention = Literal["shifted", "official_off_by_one"]
IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    supervised: list[bool]  # per logit position
    labels: list[int]       # next-token id at supervised positions that have one, else IGNORE_INDEX


def logit_mask(is_target: Sequence[bool], convention: MaskConvention) -> list[bool]:
    n = len(is_target)
    if convention == "shifted":
        return [bool(is_target[t + 1]) if t + 1 < n else False for t in range(n)]
    if convention == "official_off_by_one":
        return [bool(v) for v in is_target]
    raise ValueError(f"unknown mask_convention {convention!r}")


def from_targets(input_ids: list[int], is_target: Sequence[bool], convention: MaskConvention) -> Encoded:
    supervised = logit_mask(is_target, convention)
    n = len(input_ids)
    labels = [input_ids[t + 1] if supervised[t] and t + 1 < n else IGNORE_INDEX for t in range(n)]
    return Encoded(list(input_ids), supervised, labels)


def encode_prompt_response(item: PromptResponse, tokenizer, max_length: int,
                           convention: MaskConvention) -> Encoded | None:
    """Tokenise prompt+response (joined as the official code joins them) and append EOS.

    The prompt length is the length of the prompt tokenised alone, as in the official code.
    Returns None when truncation to `max_length` leaves no response token.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; SFT targets end with EOS")
    prompt_ids = tokenizer(item.prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(item.prompt + item.response, add_special_tokens=True)["input_ids"]
    full_ids = full_ids + [tokenizer.eos_token_id]
    n_prompt = len(prompt_ids)
    full_ids = full_ids[:max_length]
    if n_prompt >= len(full_ids):
        return None
    is_target = [i >= n_prompt for i in range(len(full_ids))]
    return from_targets(full_ids, is_target, convention)


def encode_token_row(row: TokenRow, max_length: int, convention: MaskConvention) -> Encoded | None:
    ids, mask = row.input_ids[:max_length], row.loss_mask[:max_length]
    if not any(mask[1:] if convention == "shifted" else mask):
        return None
    return from_targets(ids, mask, convention)


def pack_documents(texts: Sequence[str], tokenizer, seq_len: int, convention: MaskConvention,
                   max_document_tokens: int | None = None) -> list[Encoded]:
    """Tokenise each document with BOS, append EOS, concatenate and cut into `seq_len` blocks.

    ``max_document_tokens`` keeps only a document's first N text tokens (BOS and EOS still frame
    it). The incomplete tail block is dropped. Every token but a block's first is a target.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; packing separates documents with EOS")
    stream: list[int] = []
    bos = tokenizer.bos_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_document_tokens]
        stream.extend(([bos] if bos is not None else []) + ids + [tokenizer.eos_token_id])
    blocks = []
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        block = stream[start:start + seq_len]
        blocks.append(from_targets(block, [i > 0 for i in range(seq_len)], convention))
    return blocks
