"""Task data: loaders, Alpaca prompts, response masks, packing and resumable batches."""

from rlkd.data.encode import IGNORE_INDEX, Encoded, encode_prompt_response, encode_token_row, logit_mask, pack_documents
from rlkd.data.jsonl import DataError, iter_jsonl
from rlkd.data.loader import Batch, ResumableBatches, collate
from rlkd.data.tasks import SFT_TASKS, TASKS, PromptResponse, TokenRow, load_rows

__all__ = ["IGNORE_INDEX", "Encoded", "encode_prompt_response", "encode_token_row", "logit_mask", "pack_documents",
           "DataError", "iter_jsonl", "Batch", "ResumableBatches", "collate", "SFT_TASKS", "TASKS",
           "PromptResponse", "TokenRow", "load_rows", "build_samples"]


def build_samples(data_cfg, tokenizer) -> list[Encoded]:
    """Load and encode the rows named by a `DataConfig` (see rlkd.config)."""
    rows = load_rows(data_cfg.task, data_cfg.split, path=data_cfg.path, data_dir=data_cfg.data_dir,
                     source=data_cfg.source, exclude_eval_overlap=data_cfg.exclude_eval_overlap,
                     limit=data_cfg.limit, skip=data_cfg.skip)
    convention = data_cfg.mask_convention
    if data_cfg.task == "tokenized":
        encoded = [encode_token_row(r, data_cfg.max_length, convention) for r in rows]
    else:
        if tokenizer is None:
            raise DataError(f"task {data_cfg.task!r} needs a tokenizer (models.tokenizer)")
        if data_cfg.task == "pretrain":
            return pack_documents(rows, tokenizer, data_cfg.max_length, convention)[: data_cfg.max_samples]
        encoded = [encode_prompt_response(r, tokenizer, data_cfg.max_length, convention) for r in rows]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise DataError(f"task {data_cfg.task!r}: no example has a response token within max_length={data_cfg.max_length}")
    return kept[: data_cfg.max_samples]
